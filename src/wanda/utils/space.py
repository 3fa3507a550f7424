"""Free disk space: checked before long work starts, and claimed for real before a file is memory-mapped.

A run that finds the disk full only when it writes has already spent its time; a memory-mapped file whose
pages cannot be backed by blocks kills the process with SIGBUS, without a message. So the jobs add up what they
will write per file system (``check_space``) before the first block, and ``allocate`` reserves a mapped file's
blocks (``posix_fallocate``) before the mapping is touched: a full disk is one ``WandaError`` line either way.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import WandaError

__all__ = ["format_bytes", "free_bytes", "check_space", "allocate", "os_reason", "weights_bytes", "ZERO_CHUNK"]

#: The fallback allocation writes zeros in chunks of this many bytes (where ``posix_fallocate`` is missing or
#: the file system does not support it).
ZERO_CHUNK = 16 << 20

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EDQUOT: "disk quota exceeded",
}


def os_reason(exc: OSError) -> str:
    """An ``OSError``'s cause in the words the error lines use (``no space left on device``, ...)."""
    return _REASONS.get(exc.errno, exc.strerror or str(exc))


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where a file that does not exist yet will be made)."""
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system that ``path`` is (or will be) on."""
    return shutil.disk_usage(_existing(Path(path))).free


def check_space(needs: list[tuple[str | Path, int, str]]) -> None:
    """Refuse, with one line, outputs that cannot fit: ``needs`` holds (folder, bytes, what) and the bytes are
    summed per file system (outputs on one disk share its free space)."""
    devices: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, count, what in needs:
        if count > 0:
            folder = Path(folder).expanduser().absolute()
            devices.setdefault(os.stat(_existing(folder)).st_dev, []).append((folder, count, what))
    for group in devices.values():
        total = sum(count for _, count, _ in group)
        free = free_bytes(group[0][0])
        if total > free:
            parts = " + ".join(f"{what} {format_bytes(count)}" for _, count, what in group)
            folders = ", ".join(dict.fromkeys(str(folder) for folder, _, _ in group))
            raise WandaError(
                f"not enough space in {folders}: needs {format_bytes(total)} ({parts}), {format_bytes(free)} free"
            )


def weights_bytes(model) -> int:
    """What ``save_pretrained`` (or ``torch.save`` of the state dict) writes of a model's weights: every tensor
    of its state dict once (tied ones share their storage), at its own dtype."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _write_zeros(fd: int, size: int) -> None:
    chunk = bytes(min(ZERO_CHUNK, size))
    written = 0
    while written < size:
        written += os.pwrite(fd, chunk[: size - written], written)


def allocate(path: str | Path, size: int, what: str) -> None:
    """Create ``path`` with ``size`` bytes whose blocks the file system has really reserved (so a mapping of it
    never meets a full disk), after checking the free space; on failure nothing is left and one line says why."""
    path = Path(path)
    free = free_bytes(path.parent)
    if size > free:
        raise WandaError(f"not enough space for {what} {path}: needs {format_bytes(size)}, {format_bytes(free)} free")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise WandaError(f"could not write {what} {path}: {os_reason(exc)}") from exc
    try:
        if size:
            try:
                if not hasattr(os, "posix_fallocate"):
                    raise OSError(errno.EOPNOTSUPP, "posix_fallocate is not available")
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                _write_zeros(fd, size)  # a file system that cannot reserve blocks: write them
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise WandaError(
                f"not enough space for {what} {path}: needs {format_bytes(size)}, {format_bytes(free_bytes(path.parent))} free"
            ) from exc
        raise WandaError(f"could not write {what} {path}: {os_reason(exc)}") from exc
    os.close(fd)
