"""A streamed run's progress on disk, so that a killed run continues where it stopped.

After block i the work folder holds ``block-000i.safetensors`` (the pruned block's tensors, its layer reports
in the file's metadata) and, unless it was the last block, ``hidden-000(i+1).safetensors`` (the hidden states
that enter block i+1, one tensor per calibration batch). Every file is written whole or not at all (temporary
name, fsync, rename, fsync of the folder), the block before the hidden states, so after a kill at any instant
the folder names a consistent point: resume at the first block k whose predecessors are all saved and whose
inputs are saved. ``fingerprint.json`` records what the run computes (model, method, ratio and pattern, seed,
calibration tokens, dtype, batch size, device type, number of ranks); a folder with another fingerprint is
refused, never reused.

Under torchrun every rank keeps the hidden states of its own share of the windows (``hidden-000k.rank-r-of-N``)
and one rank per machine writes the blocks. The ranks are at most one block apart (they meet at every block's
statistics reduction), so each keeps its last two hidden files, and ``agree_resume_point`` finds the latest
block that every rank can restart from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import WandaError
from ..export.shards import fsync_dir, write_safetensors

log = logging.getLogger(__name__)

__all__ = ["WorkFolder", "tensor_digest", "agree_resume_point"]

FINGERPRINT = "fingerprint.json"


def tensor_digest(tensor: torch.Tensor | None) -> str | None:
    """SHA-256 of a tensor's shape, dtype and bytes (the calibration set's identity)."""
    if tensor is None:
        return None
    digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
        write_safetensors(Path(tmp), specs, tensors.values(), metadata)  # fsynced
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def agree_resume_point(states: list[tuple[int | None, list[int]]], num_blocks: int, needs_hidden: bool) -> int:
    """Where every rank can continue: ``states`` holds each rank's ``WorkFolder.local_state()``. The blocks
    before it are saved by every block writer, and every rank holds its hidden states entering it (block 0 and
    the end need none)."""
    blocks = min((count for count, _ in states if count is not None), default=0)
    if not needs_hidden:
        return blocks
    for k in range(blocks, -1, -1):
        if k in (0, num_blocks) or all(k in hidden for _, hidden in states):
            return k
    return 0


class WorkFolder:
    """``rank``/``world_size``: whose hidden states this process keeps; ``writes_blocks``: whether it writes the
    pruned blocks (every rank in one process; one per machine under torchrun)."""

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        num_blocks: int,
        needs_hidden: bool,
        rank: int = 0,
        world_size: int = 1,
        writes_blocks: bool = True,
    ):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back from disk
        self.num_blocks = num_blocks
        self.needs_hidden = needs_hidden
        self.rank, self.world_size, self.writes_blocks = rank, world_size, writes_blocks
        #: the resume point the ranks agreed on (``agree_resume_point``); None: decide from this folder alone
        self.start: int | None = None
        stored = self.path / FINGERPRINT
        if stored.is_file():
            old = json.loads(stored.read_text())
            if old != self.fingerprint:
                differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise WandaError(
                    f"work folder {self.path} belongs to another run (differs in {', '.join(differ)}); "
                    "remove it or choose another --work_dir"
                )
        elif self.path.exists() and any(self.path.iterdir()):
            raise WandaError(
                f"work folder {self.path} exists and is not a wanda work folder; choose another --work_dir"
            )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".fingerprint.", suffix=".tmp", dir=self.path)
            with os.fdopen(fd, "w") as handle:
                json.dump(self.fingerprint, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, stored)
            fsync_dir(self.path)

    def block_file(self, index: int) -> Path:
        return self.path / f"block-{index:05d}.safetensors"

    @property
    def _rank_suffix(self) -> str:
        return f".rank-{self.rank}-of-{self.world_size}" if self.world_size > 1 else ""

    def hidden_file(self, index: int) -> Path:
        """This rank's hidden states entering block ``index``."""
        return self.path / f"hidden-{index:05d}{self._rank_suffix}.safetensors"

    def local_state(self) -> tuple[int | None, list[int]]:
        """(how many blocks from 0 on are saved, or None when this process writes none; the blocks whose
        inputs this rank holds)."""
        count = None
        if self.writes_blocks:
            count = 0
            while count < self.num_blocks and self.block_file(count).is_file():
                count += 1
        pattern = re.compile(rf"hidden-(\d{{5}}){re.escape(self._rank_suffix)}\.safetensors")
        hidden = sorted(int(m.group(1)) for p in self.path.iterdir() if (m := pattern.fullmatch(p.name)))
        return count, hidden

    def resume_point(self) -> int:
        """The first block not yet done: every block before it is saved, and so are its inputs (a kill between
        a block's file and its outputs' file redoes that block)."""
        if self.start is None:
            self.start = agree_resume_point([self.local_state()], self.num_blocks, self.needs_hidden)
        return self.start

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], layers: list[dict]) -> None:
        if self.writes_blocks:
            _atomic_save(self.block_file(index), tensors, {"layers": json.dumps(layers)})

    def save_hidden(self, index: int, hidden: list[torch.Tensor]) -> None:
        """The hidden states entering block ``index``. One process then needs the previous block's no more;
        a rank keeps them one block longer, since another rank may not have finished that block yet."""
        _atomic_save(self.hidden_file(index), {f"batch.{i}": h for i, h in enumerate(hidden)})
        spent = index - (1 if self.world_size == 1 else 2)
        if spent >= 0:
            self.hidden_file(spent).unlink(missing_ok=True)

    def load_hidden(self, index: int) -> list[torch.Tensor]:
        with safe_open(str(self.hidden_file(index)), framework="pt", device="cpu") as handle:
            keys = sorted(handle.keys(), key=lambda k: int(k.split(".")[1]))
            return [handle.get_tensor(k) for k in keys]

    def block_layers(self, index: int) -> list[dict]:
        with safe_open(str(self.block_file(index)), framework="pt", device="cpu") as handle:
            return json.loads(handle.metadata()["layers"])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
