"""The zero pattern of a pruned model, captured once and re-applied after anything that could revive it.

A mask is a bool tensor shaped like its weight, True where the weight is pruned (exactly zero when captured).
Masks are keyed by the qualified name of their linear layer inside the decoder blocks, the matrices that
``wanda.prune`` prunes. The name resolves to the same weight in the plain model and in the model that
``peft`` wraps (a LoRA layer keeps its name and exposes its frozen base weight as ``.weight``). Fused expert
parameters (experts, out, in) are pruned per expert but kept as one mask, keyed by the parameter's name.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import WandaError
from ..models import find_decoder_layout

log = logging.getLogger(__name__)

__all__ = ["PrunedMasks", "capture_masks", "apply_masks", "mask_gradients", "masked_weight"]

#: Layer name -> bool tensor, True where the weight is pruned.
PrunedMasks = dict[str, torch.Tensor]


def masked_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight that the mask ``name`` covers: the plain linear's, or a LoRA wrapper's frozen base weight."""
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        try:  # a fused expert parameter
            return model.get_parameter(name)
        except AttributeError:
            pass
        raise WandaError(f"the model has no layer {name!r}; masks must come from the same architecture") from exc
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise WandaError(f"layer {name!r} ({type(module).__name__}) has no weight tensor")
    return weight


def capture_masks(model: nn.Module) -> PrunedMasks:
    """Masks of every prunable matrix in the decoder blocks of an unwrapped model (zeros in its weights)."""
    layout = find_decoder_layout(model)
    masks: PrunedMasks = {}
    for index in range(len(layout.blocks)):
        for name, matrix in layout.matrices(index).prunable.items():
            if matrix.expert is None:
                masks[name] = matrix.weight == 0
            else:  # one mask for the whole fused parameter
                qualified = name.split("[", 1)[0]
                masks[qualified] = getattr(matrix.module, matrix.parameter).detach() == 0
    pruned = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    if pruned == 0:
        log.warning("the model has no zero weights in its decoder blocks: is it pruned? (nothing to keep)")
    else:
        log.info(
            "captured the zero pattern of %d matrices: %.4f of %d weights are pruned", len(masks), pruned / total, total
        )
    return masks


def _check_shape(name: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
    if weight.shape != mask.shape:
        raise WandaError(f"mask of {name} has shape {tuple(mask.shape)} but the weight is {tuple(weight.shape)}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: PrunedMasks) -> None:
    """Set every pruned weight back to exactly zero, in place."""
    for name, mask in masks.items():
        weight = masked_weight(model, name)
        _check_shape(name, weight, mask)
        weight.masked_fill_(mask.to(weight.device), 0)


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: PrunedMasks) -> None:
    """Zero the gradient of every pruned weight (weights without a gradient are skipped)."""
    for name, mask in masks.items():
        weight = masked_weight(model, name)
        if weight.grad is not None:
            weight.grad.masked_fill_(mask.to(weight.grad.device), 0)
