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

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from ..errors import WandaError
from ..export.shards import fsync_dir, write_safetensors
from ..models.checkpoint import Checkpoint, file_entries, read_header
from ..utils.space import os_reason

log = logging.getLogger(__name__)

__all__ = ["WorkFolder", "tensor_digest", "agree_resume_point"]

FINGERPRINT = "fingerprint.json"
LOCK = ".lock"


def tensor_digest(tensor: torch.Tensor | None) -> str | None:
    """SHA-256 of a tensor's shape, dtype and bytes (the calibration set's identity)."""
    if tensor is None:
        return None
    digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_failed(folder: Path, exc: OSError, name: str) -> WandaError:
    """A work-folder write that the file system refused (full, read-only, over quota), as one line; the files
    already there stay, so the same command resumes once there is room."""
    return WandaError(f"could not write {folder}: {os_reason(exc)} (writing {name}); the finished blocks stay there")


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` written whole or not at all, with the SHA-256 of each one's bytes in the metadata, so that a
    resumed run can tell a file that was cut short or edited (``verify_file``)."""
    digests = {name: hashlib.sha256(_raw(t)).hexdigest() for name, t in tensors.items()}
    metadata = {**(metadata or {}), "digests": json.dumps(digests)}
    tmp = str(path.with_name(f".{path.name}.unborn"))  # nothing to remove until mkstemp succeeds
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
        write_safetensors(Path(tmp), specs, tensors.values(), metadata)  # fsynced
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path.parent, exc, path.name) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify_file(path: Path) -> str | None:
    """Why the work-folder file ``path`` cannot be trusted (not a valid safetensors file, a tensor whose bytes
    differ from the digest stored with it), or None when it verifies."""
    try:
        header, _ = read_header(path)
        digests = json.loads(header.get("__metadata__", {}).get("digests", "null"))
        entries = file_entries(path)
        if not isinstance(digests, dict) or set(digests) != set(entries):
            return "its tensors' digests are missing"
        found: dict[str, str] = {}
        Checkpoint(path.parent, entries).read(list(entries), digests=found)
        bad = next((k for k, info in entries.items() if found[_part_key(info)] != digests[k]), None)
    except (WandaError, ValueError) as exc:
        return str(exc)
    return None if bad is None else f"the bytes of {bad} differ from its digest"


def _part_key(info) -> str:
    return f"{info.file.name}:{info.key}:{list(info.shape)}:{info.dtype}"


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
        self._lock: int | None = None
        #: made by this run (not found on disk): ``abandon`` removes it while it holds no finished block
        self.created = not self.path.exists() and (rank == 0 or writes_blocks)
        try:
            self._refuse_foreign()
            if rank == 0:  # one lock per run (the other ranks of the same run share the folder)
                self._take_lock()
            self._check_or_create(self.created)
        except BaseException:
            self.abandon()
            raise

    def _refuse_foreign(self) -> None:
        """A folder that holds files but no fingerprint is someone else's (a model, a dataset): refused before
        the lock file is made in it, so that a refused run leaves it as it was."""
        if self.path.is_dir() and not (self.path / FINGERPRINT).exists():
            if any(p.name != LOCK for p in self.path.iterdir()):
                raise WandaError(
                    f"work folder {self.path} exists and is not a wanda work folder; choose another --work_dir"
                )

    def _take_lock(self) -> None:
        """An ``flock`` on ``.lock`` in the folder, held until the run ends (it dies with the process): a second
        run on the same work folder is refused instead of adopting or deleting the first one's progress."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_failed(self.path, exc, LOCK) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WandaError(
                f"another run is using work folder {self.path}; wait for it to finish or choose another --work_dir"
            ) from None
        self._lock = fd

    def release(self) -> None:
        """Let another run use the folder (the run stopped; its progress stays for a resume)."""
        self._release()

    def abandon(self) -> None:
        """A run that stops: a folder it made itself and that holds no finished block goes (a refused run
        leaves nothing behind); one with finished blocks, or one found on disk, stays for a resume."""
        if self.created and self.path.is_dir() and not any(self.path.glob("block-*.safetensors")):
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _check_or_create(self, created: bool) -> None:
        stored = self.path / FINGERPRINT
        if stored.is_file():
            old = self._stored_fingerprint(stored)
            if old != self.fingerprint:
                differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise WandaError(
                    f"work folder {self.path} belongs to another run (differs in {', '.join(differ)}); "
                    "remove it or choose another --work_dir"
                )
        elif self.path.exists() and any(p.name != LOCK for p in self.path.iterdir()):
            raise WandaError(
                f"work folder {self.path} exists and is not a wanda work folder; choose another --work_dir"
            )
        else:
            self._write_fingerprint(stored)

    def _stored_fingerprint(self, stored: Path) -> dict:
        """The fingerprint on disk. One that cannot be read says nothing about whose blocks these are, so the
        folder is refused (never adopted, never emptied: it may be another run's)."""
        try:
            old = json.loads(stored.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            reason = os_reason(exc) if isinstance(exc, OSError) else str(exc).splitlines()[0]
        else:
            if isinstance(old, dict):
                return old
            reason = f"it holds a JSON {type(old).__name__}, not an object"
        raise WandaError(
            f"work folder {self.path} cannot be resumed: its {FINGERPRINT} is damaged ({reason}); "
            "remove the work folder or choose another --work_dir"
        )

    def _write_fingerprint(self, stored: Path) -> None:
        tmp = str(stored.with_name(".fingerprint.unborn"))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".fingerprint.", suffix=".tmp", dir=self.path)
            with os.fdopen(fd, "w") as handle:
                json.dump(self.fingerprint, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, stored)
            fsync_dir(self.path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise write_failed(self.path, exc, stored.name) from exc

    def verify(self, source_digest: Callable[[int], str]) -> None:
        """Before resuming: every saved block's file must verify and must have been pruned from the bytes the
        checkpoint holds now (``source_digest(i)`` re-reads block i's source tensors). A file that does not
        verify is redone (it and the blocks after it are removed, with a line); a block whose source changed is
        refused, so that a resumed run never mixes blocks of two checkpoints."""
        if self.writes_blocks:
            for index in range(self.num_blocks):
                path = self.block_file(index)
                if not path.is_file():
                    break
                problem = verify_file(path)
                if problem is not None:
                    log.warning("work folder file %s does not verify (%s); block %d on is redone", path, problem, index)
                    for later in range(index, self.num_blocks):
                        self.block_file(later).unlink(missing_ok=True)
                    break
                recorded = read_header(path)[0]["__metadata__"].get("source")
                if recorded != source_digest(index):
                    raise WandaError(
                        f"the checkpoint changed since work folder {self.path} was written (block {index}'s "
                        "source tensors differ): remove the work folder to prune the weights as they are now"
                    )
        _, hidden = self.local_state()
        for index in hidden:
            path = self.hidden_file(index)
            problem = verify_file(path)
            if problem is not None:
                log.warning("work folder file %s does not verify (%s); it is computed again", path, problem)
                path.unlink()

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

    def save_block(
        self, index: int, tensors: dict[str, torch.Tensor], layers: list[dict], source: str | None = None
    ) -> None:
        """Block ``index``'s pruned tensors, its layer reports and ``source``, the digest of the checkpoint
        bytes it was pruned from (checked again on resume by ``verify``)."""
        if self.writes_blocks:
            metadata = {"layers": json.dumps(layers), "source": source or ""}
            _atomic_save(self.block_file(index), tensors, metadata)

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
        self._release()
