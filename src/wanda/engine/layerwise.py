"""Walking a model's decoder blocks one at a time.

The walk is written once; where the blocks come from is a ``BlockSource``. The default, ``ResidentBlocks``,
moves a block that is already in memory to the compute device only while it is processed (unless accelerate
already placed it). ``wanda.engine.streaming.StreamedBlocks`` instead materialises each block from the
checkpoint's safetensors shards, hands the finished block to a sink and releases it, and can restart the walk
from a saved block. Either way what lives on the device is one block plus the activations of its inputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import DecoderLayout, find_decoder_layout
from ..parallel.ranks import SINGLE, Ranks
from ..utils.devices import default_batch_size
from .capture import BlockInputs, capture_block_inputs
from .numerics import check_finite_outputs

#: visit(index, block, inputs) is called with the block on the compute device, before it produces the next
#: inputs; ``inputs`` is None for a walk without calibration data (magnitude pruning).
Visitor = Callable[[int, nn.Module, "BlockInputs | None"], None]


def _dispatched(model: nn.Module) -> bool:
    """True when accelerate spread the model over devices (its hooks then move tensors themselves)."""
    device_map = getattr(model, "hf_device_map", None)
    return bool(device_map) and len(set(device_map.values())) > 1


class BlockSource(Protocol):
    """Where the walk's blocks come from and where finished ones go."""

    def resume_point(self) -> tuple[int, Sequence[torch.Tensor] | None]:
        """The first block still to process and, if it is not 0, the hidden states that enter it."""
        ...

    def open(self, index: int) -> ContextManager[nn.Module]:
        """Block ``index`` on the compute device for the duration of the context."""
        ...

    def finish(self, index: int, block: nn.Module, inputs: BlockInputs | None) -> None:
        """Block ``index`` is visited and ``inputs`` now holds its outputs (the next block's inputs)."""
        ...

    def place(self, hidden: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Where the captured hidden states are kept between blocks (RAM as they are, or a file)."""
        ...


class ResidentBlocks:
    """The blocks of a model held in memory; each is moved to ``device`` while the walk is on it."""

    def __init__(self, model: nn.Module, layout: DecoderLayout, device: torch.device):
        self.model, self.layout, self.device = model, layout, device

    def resume_point(self) -> tuple[int, None]:
        return 0, None

    @contextmanager
    def open(self, index: int) -> Iterator[nn.Module]:
        block = self.layout.blocks[index]
        home = next(block.parameters()).device
        if _dispatched(self.model) or home == self.device:
            yield block
            return
        block.to(self.device)
        try:
            yield block
        finally:
            block.to(home)

    def finish(self, index: int, block: nn.Module, inputs: BlockInputs | None) -> None:
        pass

    def place(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return hidden


class ReadOnlyBlocks:
    """Another source's blocks for a walk that must change nothing: always from block 0, nothing saved (a
    sparsity profile's statistics of the dense model, before the pruning walk)."""

    def __init__(self, source: BlockSource):
        self.source = source

    def resume_point(self) -> tuple[int, None]:
        return 0, None

    def open(self, index: int) -> ContextManager[nn.Module]:
        return self.source.open(index)

    def finish(self, index: int, block: nn.Module, inputs: BlockInputs | None) -> None:
        pass

    def place(self, hidden: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        # where the source keeps its own walk's activations (a streamed run's activation file, say)
        store = getattr(self.source, "store", None)
        return store(hidden) if store is not None else hidden


class LayerwiseEngine:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        progress: bool = True,
        layout: DecoderLayout | None = None,
        source: BlockSource | None = None,
        ranks: Ranks = SINGLE,
    ):
        self.model = model
        #: under torchrun: each rank walks its share of the windows, and ``reduce`` sums what they recorded
        self.ranks = ranks
        self.layout = layout or find_decoder_layout(model)
        if device is None:
            device = next(self.layout.blocks[0].parameters()).device
            if device.type == "meta":
                raise ValueError("the blocks are not loaded (meta device): pass the compute device")
        self.device = torch.device(device)
        self.batch_size = batch_size or default_batch_size(self.device)
        self.progress = progress
        self.source = source or ResidentBlocks(model, self.layout, self.device)
        #: whether the blocks return a tuple (hidden, ...) rather than the hidden states (seen on the last run)
        self.block_returns_tuple = False

    @torch.no_grad()
    def run_block(self, block: nn.Module, inputs: BlockInputs) -> Sequence[torch.Tensor]:
        """One batched forward pass of ``block`` over all calibration batches; returns its hidden outputs."""
        store = inputs.hidden
        outputs = []
        for index, (hidden, args, kwargs) in enumerate(zip(store, inputs.args, inputs.kwargs)):
            out = block(hidden, *args, **kwargs)
            self.block_returns_tuple = isinstance(out, (tuple, list))
            out = out[0] if self.block_returns_tuple else out
            if hasattr(store, "write"):  # activations kept outside the device (a file): store them back
                store.write(index, out)
            elif out.shape == hidden.shape and out.dtype == hidden.dtype and out.device == hidden.device:
                # this batch's inputs are spent: their buffer takes the outputs, so the calibration
                # activations are held once (32 x 1024 x 576 fp32 = 75 MB for SmolLM2), not twice
                outputs.append(hidden.copy_(out))
            else:
                outputs.append(out)
        return store if hasattr(store, "write") else outputs

    def reduce(self, stats: dict, factory: Callable | None = None) -> None:
        """Sum a block's recorded statistics over the ranks, in place (``Ranks.reduce``), before any mask."""
        self.ranks.reduce(stats, factory)

    @torch.no_grad()
    def walk(
        self,
        input_ids: torch.Tensor | None,
        visit: Visitor | None = None,
        after: Callable[[int, BlockInputs | None], None] | None = None,
    ) -> BlockInputs | None:
        """Capture block 0's inputs for ``input_ids``, then for each block: visit it, re-run it to get the
        next block's inputs. ``after(index, outputs)`` sees each block's outputs while the block is still open
        (OWL scores the block's dense weights there).

        ``input_ids``: all the windows; under torchrun each rank captures, and walks the blocks with, its own
        share (``Ranks.local_windows``). ``input_ids=None`` walks the blocks without activations (for methods that need no calibration). A
        source that resumes starts at its saved block, with the hidden states it saved; the other block
        arguments (masks, positions) are captured again, which costs only the embeddings."""
        was_training = self.model.training
        self.model.eval()
        try:
            start, hidden = self.source.resume_point()
            inputs = None
            if input_ids is not None:
                input_ids = self.ranks.local_windows(input_ids, self.batch_size)
                inputs = capture_block_inputs(
                    self.model, self.layout.blocks[0], input_ids, self.batch_size, self.device
                )
                if hidden is not None:  # saved on the CPU by the run that was interrupted
                    inputs.hidden = [h.to(self.device) for h in hidden]
                inputs.hidden = self.source.place(inputs.hidden)
            indices = range(start, len(self.layout.blocks))
            for index in tqdm(indices, desc="blocks", unit="block", disable=not self.progress):
                with self.source.open(index) as block:
                    if visit is not None:
                        visit(index, block, inputs)
                    if inputs is not None:
                        inputs.hidden = self.run_block(block, inputs)
                        # a broken block stops the walk before its outputs are saved or passed on
                        check_finite_outputs(self.layout.block_name(index), inputs.hidden)
                    self.source.finish(index, block, inputs)
                    if after is not None:  # the block is still loaded (a streamed one is released below)
                        after(index, inputs)
            return inputs
        finally:
            self.model.train(was_training)


def read_only(engine: LayerwiseEngine) -> LayerwiseEngine:
    """An engine over the same blocks whose walk saves nothing and starts at block 0."""
    return LayerwiseEngine(
        engine.model,
        engine.device,
        engine.batch_size,
        engine.progress,
        engine.layout,
        ReadOnlyBlocks(engine.source),
        engine.ranks,
    )
