"""Streaming: the walk's blocks read from the checkpoint one at a time, saved to a work folder when done.

``OffloadSettings`` (``--offload``, ``--offload_activations``, ``--memory_fraction``) and ``StreamSettings``
(those plus ``--work_dir``) are the jobs' settings; ``StreamedBlocks`` is the ``BlockSource`` the one walk of ``wanda.engine.layerwise``
runs on. Per block it reads that block's tensors from the safetensors shards onto the compute device, lets the
walk visit and re-run it, writes the pruned tensors and the next block's inputs to the work folder
(``wanda.engine.resume``), and gives the memory back. ``choose_streaming`` is the automatic choice.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal, Sequence

import torch
from torch import nn

from ..models.streaming import StreamedModel
from ..utils.declare import SettingsMixin, require, setting
from ..utils.resources import trim_heap
from .activations import ActivationFile
from .capture import BlockInputs
from .resume import WorkFolder

log = logging.getLogger(__name__)

__all__ = [
    "OFFLOAD_CHOICES",
    "OffloadSettings",
    "StreamSettings",
    "StreamedBlocks",
    "choose_streaming",
    "available_memory",
    "activation_bytes",
]

OFFLOAD_CHOICES = ("auto", "none", "disk")


@dataclass(frozen=True)
class OffloadSettings(SettingsMixin):
    """Whether the model is streamed from disk block by block, and where the activations live."""

    _argument_group_name: ClassVar[str] = "streaming (models larger than memory)"

    offload: Literal["auto", "none", "disk"] = setting(
        "auto",
        "auto: stream the decoder blocks from disk, one at a time, when the checkpoint would not fit in "
        "--memory_fraction of the available memory (safetensors checkpoints); disk: always; none: load the whole model",
    )
    offload_activations: str | None = setting(
        None,
        "folder for a memory-mapped file of the activations between blocks (default: RAM, or the work folder "
        "when they would not fit)",
    )
    #: Headroom: the share of the available memory (RAM, or the GPU's free memory) a run may plan to fill.
    memory_fraction: float = setting(
        0.7, "share of the available memory (psutil; a GPU's free memory) a run may fill before --offload auto streams"
    )

    def __post_init__(self) -> None:
        require(
            self.offload in OFFLOAD_CHOICES,
            f"--offload must be one of {', '.join(OFFLOAD_CHOICES)}; got {self.offload!r}",
        )
        require(0 < self.memory_fraction <= 1, f"--memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True)
class StreamSettings(OffloadSettings):
    """``OffloadSettings`` plus where a streamed pruning run keeps its progress."""

    work_dir: str | None = setting(
        None,
        "folder keeping a streamed run's progress, so that the same command resumes it after a crash "
        "(default: <save_model>.work beside the output, else wanda-work-<hash> here); removed on success",
    )


def available_memory(device: torch.device) -> int:
    """Bytes the process can still use: free GPU memory on ``device``, else available RAM (psutil)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def activation_bytes(nsamples: int, seqlen: int, hidden_size: int, dtype: torch.dtype) -> int:
    """The hidden states the walk keeps between blocks: nsamples x seqlen x hidden values."""
    return nsamples * seqlen * hidden_size * torch.empty((), dtype=dtype).element_size()


def choose_streaming(settings: OffloadSettings, checkpoint_bytes: int, device: torch.device) -> bool:
    """``--offload``, or for ``auto`` whether ``checkpoint_bytes`` exceed the share of memory; one log line."""
    if settings.offload != "auto":
        return settings.offload == "disk"
    budget = int(available_memory(device) * settings.memory_fraction)
    stream = checkpoint_bytes > budget
    log.info(
        "%s: the checkpoint needs %.2f GB, %.0f%% of the available memory on %s is %.2f GB (--offload %s overrides)",
        "streaming the decoder blocks from disk" if stream else "loading the whole model",
        checkpoint_bytes / 1e9,
        100 * settings.memory_fraction,
        device,
        budget / 1e9,
        "none" if stream else "disk",
    )
    return stream


class StreamedBlocks:
    """The ``BlockSource`` of a streamed run.

    ``work``: where finished blocks and the next inputs go (None for a read-only walk such as evaluation);
    ``activations``: a folder for the activation file (None keeps them in RAM); ``report_rows(index)`` gives
    the layer reports of a finished block, stored with it so that a resumed run reports every layer.
    """

    def __init__(
        self,
        streamed: StreamedModel,
        device: torch.device,
        work: WorkFolder | None = None,
        activations: Path | None = None,
        report_rows=None,
        drop_outside: bool = False,
    ):
        self.streamed, self.device, self.work = streamed, torch.device(device), work
        self.activations = activations
        self.report_rows = report_rows
        #: release the embeddings once block 0's inputs are captured (pruning needs nothing outside the blocks)
        self.drop_outside = drop_outside
        self._file: ActivationFile | None = None
        self.resumed_from = 0
        #: set once this source's own walk starts: a read-only walk before it (a sparsity profile's dense
        #: pass) still needs the embeddings for the pruning walk's capture, so nothing outside is released
        self._walking = False

    def resume_point(self) -> tuple[int, list[torch.Tensor] | None]:
        self._walking = True
        if self.work is None:
            return 0, None
        k = self.work.resume_point()
        self.resumed_from = k
        if k == 0:
            return 0, None
        log.info("resuming from block %d of %d (work folder %s)", k, self.work.num_blocks, self.work.path)
        return k, self.work.load_hidden(k) if self.work.needs_hidden and k < self.work.num_blocks else None

    def place(self, hidden: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        if self.drop_outside and self._walking:
            self.streamed.release_outside()
        return self.store(hidden)

    def store(self, hidden: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Where hidden states are kept between blocks: RAM, or the activation file when one was asked for
        (also for a read-only walk before the pruning walk; a new walk's file replaces the last one's)."""
        if self.activations is None:
            return hidden
        self.close()
        self._file = ActivationFile(self.activations / f"activations-{os.getpid()}.bin", hidden, self.device)
        hidden.clear()
        return self._file

    @contextmanager
    def open(self, index: int) -> Iterator[nn.Module]:
        if self.drop_outside and self._walking:
            self.streamed.release_outside()
        block = self.streamed.load_block(index, self.device)
        try:
            yield block
        finally:
            self.streamed.release_block(index)
            # glibc keeps freed blocks of this size in its heap (its mmap threshold rises after the first
            # frees), so without a trim the resident size grows by about a block per block (SmolLM2: 610 MB
            # flat with it, 820 MB after 30 blocks without)
            trim_heap()

    def finish(self, index: int, block: nn.Module, inputs: BlockInputs | None) -> None:
        if self.work is None:
            return
        prefix = self.streamed.layout.block_name(index) + "."
        tensors = {
            prefix + name: tensor
            for name, tensor in block.state_dict().items()
            if prefix + name in self.streamed.checkpoint
        }
        rows = self.report_rows(index) if self.report_rows is not None else []
        self.work.save_block(index, tensors, rows, self.streamed.source_digests.get(index))
        if inputs is not None and index + 1 < self.work.num_blocks:
            self.work.save_hidden(index + 1, list(inputs.hidden))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
