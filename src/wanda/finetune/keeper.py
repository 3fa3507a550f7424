"""Keeping pruned weights at exactly zero while ``transformers.Trainer`` updates every weight.

Two measures, both needed:
* the gradient of every pruned weight is zeroed, so the optimizer's moments never see it and gradient
  clipping measures only the live weights;
* after every optimizer step the mask is applied again. Zero gradients alone are not enough in general:
  optimizer state carried over from a dense run, L2-style weight decay folded into the gradient, or any
  optimizer whose update is not exactly zero for a zero gradient would move a pruned weight.

``MaskKeepingCallback`` does both and works with any ``Trainer`` (gradients are masked just before the
optimizer step, i.e. after clipping). ``MaskKeepingTrainer`` also masks them right after each backward pass,
before clipping, so that the clipped norm is that of the live weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from .checkpoints import CheckpointTrainer
from .masks import PrunedMasks, masked_weight

__all__ = ["MaskKeepingCallback", "MaskKeepingTrainer"]


class MaskKeepingCallback(TrainerCallback):
    """Masks gradients before, and weights after, every optimizer step of the masked matrices."""

    def __init__(self, masks: PrunedMasks):
        self.masks = masks
        self._bound: list[tuple[torch.Tensor, torch.Tensor]] = []

    def bind(self, model: nn.Module) -> None:
        """Pair each mask with its weight; masks move to their weight's device once, here."""
        bound = []
        for name, mask in self.masks.items():
            weight = masked_weight(model, name)
            if weight.shape != mask.shape:
                raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
            self.masks[name] = mask.to(weight.device)
            bound.append((weight, self.masks[name]))
        self._bound = bound

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for weight, mask in self._bound:
            if weight.grad is not None:
                weight.grad.masked_fill_(mask, 0)

    @torch.no_grad()
    def apply(self) -> None:
        for weight, mask in self._bound:
            weight.masked_fill_(mask, 0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("Trainer passed no model to the callback; cannot keep the pruned weights at zero")
        self.bind(model)
        # a resumed checkpoint was written after a masked step, so this changes nothing; it guards against
        # a model whose weights were replaced between capturing the masks and training
        self.apply()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mask_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply()

    def on_train_end(self, args, state, control, **kwargs):
        self._bound = []


class MaskKeepingTrainer(CheckpointTrainer):
    """A ``Trainer`` that keeps the weights under ``masks`` at exactly zero (full fine-tuning of a pruned model)."""

    def __init__(self, *args, masks: PrunedMasks, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_keeper = MaskKeepingCallback(masks)
        self.add_callback(self.mask_keeper)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.mask_keeper.mask_gradients()  # before clipping: the clipped norm is that of the live weights
        return loss
