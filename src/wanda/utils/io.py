"""Atomic writes: results appear whole or not at all, and an existing result is never silently replaced.

A result is written into a temporary file or folder beside its target (``.NAME.XXXXXXXX.tmp``), every file
and folder in it is fsynced, it is renamed into place and the parent folder is fsynced, so a crash or a power
cut at any moment leaves either no result or a complete one. While a target is written its lock file
(``.NAME.lock``, an ``flock``) is held: a second run writing the same target stops with an error instead of
racing the first. The lock dies with its process, so a run that was killed leaves at most a temporary
folder, which the next run writing the same target removes (and names in the log).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import WandaError

log = logging.getLogger(__name__)

__all__ = [
    "ensure_free",
    "check_writable",
    "claim",
    "atomic_directory",
    "atomic_write_text",
    "atomic_write_json",
    "fsync_tree",
]


def _occupied(path: Path) -> bool:
    """A file, a non-empty folder, or a symlink of any kind (taken: it is replaced, never followed)."""
    return path.is_symlink() or (path.exists() and (path.is_file() or any(path.iterdir())))


def _discard(old: Path) -> None:
    """Remove a parked old result: a file or a symlink itself (never what a link points to), or a folder."""
    if old.is_symlink() or not old.is_dir():
        old.unlink(missing_ok=True)
    else:
        shutil.rmtree(old, ignore_errors=True)


def ensure_free(path: str | Path, overwrite: bool, what: str = "output") -> None:
    """Refuse, before any long work starts, an existing non-empty target and one that could not be written."""
    path = Path(path)
    if _occupied(path) and not overwrite:
        raise WandaError(f"{what} {path} already exists and is not empty; choose another path or pass --overwrite")
    check_writable(path, what, folder=None)


def check_writable(path: str | Path, what: str = "output", folder: bool | None = True) -> None:
    """Refuse, before any long work, a target that could never be written: one below a file, one in a folder
    without write permission or on a read-only file system, a folder target that is a file (or the reverse;
    ``folder=None``: either kind). Creates nothing that stays."""
    path = Path(path).expanduser()
    if not str(path).strip():
        raise WandaError(f"{what}: an empty path")
    if folder is not None and path.exists() and folder != path.is_dir():
        kind = "a file" if path.is_file() else "a folder"
        raise WandaError(f"{what} {path} is {kind}; give a {'folder' if folder else 'file'} path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise WandaError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
    try:  # os.access is blind to read-only mounts and says yes to root: ask the file system itself
        fd, probe = tempfile.mkstemp(prefix=".wanda-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WandaError(f"{what} {path} cannot be written: {parent}: {exc.strerror or exc}") from exc


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_published(path: Path) -> None:
    """fsync the folder holding a result that was just renamed into place. The result is complete by then
    (its contents were synced before the rename), so a failure here is reported, not undone."""
    try:
        fsync_path(path.parent)
    except OSError as exc:
        log.warning(
            "%s is complete, but syncing its folder failed (%s): a power cut now may lose the rename",
            path,
            exc.strerror or exc,
        )


def fsync_tree(root: str | Path) -> None:
    """fsync every file below ``root``, then every folder bottom-up, then ``root``: the data and the names
    are on disk before the rename that publishes them."""
    root = Path(root)
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


# Which leftovers belong to a target NAME: mkstemp/mkdtemp names are ``.NAME.`` + 8 characters of [a-z0-9_]
# + ``.tmp`` (so ``.model.x.abcdefgh.tmp`` of a target ``model.x`` is not taken for one of ``model``), and an
# overwritten result parked while its replacement is renamed in, ``.NAME.old-PID``.
def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?:[a-z0-9_]{{8}}\.tmp|old-\d+)$")


_HELD: dict[Path, tuple[int, int]] = {}  # lock path -> (fd, depth): claims nest within one process


@contextmanager
def claim(target: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold ``target``'s lock file for the duration; another holder (another run) is a ``WandaError``, or,
    with ``wait`` (a shared cache that any run may fill), waited for.

    Nested claims of the same target in one process are fine (a job may claim its outputs up front, and
    the atomic writers claim them again). On the first claim, leftovers of killed runs are cleared.
    """
    target = Path(target).expanduser().absolute()
    lock = target.with_name(f".{target.name}.lock")
    if lock in _HELD:
        fd, depth = _HELD[lock]
        _HELD[lock] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[lock]
            _HELD[lock] = (fd, depth - 1)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock, target, wait)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    _HELD[lock] = (fd, 1)
    try:
        _clear_leftovers(target)
        yield
    finally:
        del _HELD[lock]
        lock.unlink(missing_ok=True)  # before unlocking: a waiter that opened it re-checks the inode (_lock)
        os.close(fd)


def _lock(lock: Path, target: Path, wait: bool) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WandaError(
                f"another run is writing {target} (it holds {lock}); wait for it to finish or choose another path"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file we locked: lock the new one


def _clear_leftovers(target: Path) -> None:
    """Temporary folders and files of killed runs beside ``target`` go; a parked old result whose
    replacement never arrived is put back."""
    pattern = _leftover_pattern(target.name)
    for path in sorted(target.parent.iterdir()):
        if not pattern.match(path.name):
            continue
        if ".old-" in path.name and not os.path.lexists(target):
            path.rename(target)
            log.warning("restored %s from %s, left by a run that was killed while replacing it", target, path.name)
            continue
        log.warning("removing %s, left beside %s by a run that was killed while writing it", path, target.name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_error(target: Path, exc: OSError) -> WandaError:
    reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    where = f" ({exc.filename})" if exc.filename else ""
    return WandaError(f"could not write {target}: {reason}{where}; nothing was written there")


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False, exist_ok: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it is synced and renamed into place.

    ``exist_ok``: if ``target`` appeared meanwhile (another process made it), keep that one silently.
    An ``OSError`` while writing (a full disk) becomes a one-line ``WandaError``; nothing is left behind.
    """
    target = Path(target)
    if not exist_ok:
        ensure_free(target, overwrite)
    with claim(target, wait=exist_ok):
        tmp = target.with_name(f".{target.name}.unborn")  # nothing to remove until mkdtemp succeeds
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
            yield tmp
            if _occupied(target) and exist_ok and not overwrite:
                shutil.rmtree(tmp)
                return
            fsync_tree(tmp)
            if _occupied(target):
                ensure_free(target, overwrite)  # it appeared while we worked (a run without the lock)
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(old)
                try:
                    tmp.rename(target)
                except OSError:
                    old.rename(target)  # the old result goes back where it was
                    raise
                _fsync_published(target)
                _discard(old)
            else:
                if target.exists():
                    target.rmdir()
                tmp.rename(target)
                _fsync_published(target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(target, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> None:
    path = Path(path)
    ensure_free(path, overwrite, "file")
    with claim(path):
        tmp = str(path.with_name(f".{path.name}.unborn"))  # nothing to remove until mkstemp succeeds
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            _fsync_published(path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise _write_error(path, exc) from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _finite_or_named(value: Any) -> Any:
    """NaN and Inf as the strings "nan", "inf", "-inf": JSON has no such numbers (``json.dumps`` would write
    ``NaN``, which strict readers reject), and a reader must never take them for a value."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_named(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_named(v) for v in value]
    return value


def atomic_write_json(path: str | Path, data: Any, overwrite: bool = False) -> None:
    text = json.dumps(_finite_or_named(data), indent=2, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n", overwrite)
