"""Calibration (or evaluation) activations kept in a memory-mapped file instead of RAM.

The walk keeps one hidden-state tensor per batch between blocks: nsamples x seqlen x hidden values (128 x 2048 x
8192 bf16 = 4 GB for a 70B model). In a file the operating system pages them in while a block runs and may drop
them afterwards, so they cost page cache rather than the process's memory. Reading a batch on the CPU is a view
of the mapping (no copy); on a GPU it is copied to the device, and the block's outputs are written back.

The file's blocks are reserved (``wanda.utils.space.allocate``: ``posix_fallocate``) before it is mapped: a sparse
file on a disk that fills later would kill the process with SIGBUS at the first page it cannot back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..utils.space import allocate

__all__ = ["ActivationFile"]


class ActivationFile(Sequence[torch.Tensor]):
    """One file holding every batch's hidden states, in order; ``store[i]`` is batch i on ``device``."""

    def __init__(self, path: str | Path, hidden: list[torch.Tensor], device: torch.device):
        self.path = Path(path)
        self.device = device
        self.dtype = hidden[0].dtype
        total = sum(h.numel() for h in hidden)
        allocate(self.path, total * hidden[0].element_size(), "the activation file")
        flat = torch.from_file(str(self.path), shared=True, size=total, dtype=self.dtype)
        self._views, offset = [], 0
        for h in hidden:
            view = flat[offset : offset + h.numel()].view(h.shape)
            view.copy_(h)
            self._views.append(view)
            offset += h.numel()

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return self._views[index].to(self.device)

    def write(self, index: int, value: torch.Tensor) -> None:
        self._views[index].copy_(value)

    def close(self) -> None:
        self._views.clear()
        self.path.unlink(missing_ok=True)
