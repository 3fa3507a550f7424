"""Walking a model's decoder blocks one at a time.

Each block is moved to the compute device only while it is processed (unless accelerate already placed it),
so a model larger than the device can be pruned: what lives on the device is one block plus the calibration
activations of that block's inputs and outputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import default_batch_size
from ..models import DecoderLayout, find_decoder_layout
from .capture import BlockInputs, capture_block_inputs
from .numerics import check_finite_outputs

#: visit(index, block, inputs) is called with the block on the compute device, before it produces the next inputs.
Visitor = Callable[[int, nn.Module, BlockInputs], None]


def _dispatched(model: nn.Module) -> bool:
    """True when accelerate spread the model over devices (its hooks then move tensors themselves)."""
    device_map = getattr(model, "hf_device_map", None)
    return bool(device_map) and len(set(device_map.values())) > 1


class LayerwiseEngine:
    def __init__(self, model: nn.Module, device: torch.device | str | None = None, batch_size: int | None = None,
                 progress: bool = True, layout: DecoderLayout | None = None):
        self.model = model
        self.layout = layout or find_decoder_layout(model)
        first = next(self.layout.blocks[0].parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.batch_size = batch_size or default_batch_size(self.device)
        self.progress = progress

    @contextmanager
    def on_device(self, block: nn.Module) -> Iterator[torch.device]:
        """Bring ``block`` to the compute device for the duration, then put it back where it was."""
        home = next(block.parameters()).device
        if _dispatched(self.model) or home == self.device:
            yield home
            return
        block.to(self.device)
        try:
            yield self.device
        finally:
            block.to(home)

    @torch.no_grad()
    def run_block(self, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
        """One batched forward pass of ``block`` over all calibration batches; returns its hidden outputs."""
        outputs = []
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            out = block(hidden, *args, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.shape == hidden.shape and out.dtype == hidden.dtype and out.device == hidden.device:
                # this batch's inputs are spent: their buffer takes the outputs, so the calibration
                # activations are held once (32 x 1024 x 576 fp32 = 75 MB for SmolLM2), not twice
                outputs.append(hidden.copy_(out))
            else:
                outputs.append(out)
        return outputs

    @torch.no_grad()
    def walk(self, input_ids: torch.Tensor, visit: Visitor | None = None,
             after: Callable[[int, BlockInputs], None] | None = None) -> BlockInputs:
        """Capture block 0's inputs for ``input_ids``, then for each block: visit it, re-run it to get the
        next block's inputs. ``after(index, outputs)`` sees each block's outputs (used by tests)."""
        was_training = self.model.training
        self.model.eval()
        try:
            inputs = capture_block_inputs(self.model, self.layout.blocks[0], input_ids, self.batch_size, self.device)
            blocks = tqdm(self.layout.blocks, desc="blocks", unit="block", disable=not self.progress)
            for index, block in enumerate(blocks):
                with self.on_device(block):
                    if visit is not None:
                        visit(index, block, inputs)
                    inputs.hidden = self.run_block(block, inputs)
                check_finite_outputs(self.layout.block_name(index), inputs.hidden)
                if after is not None:
                    after(index, inputs)
            return inputs
        finally:
            self.model.train(was_training)
