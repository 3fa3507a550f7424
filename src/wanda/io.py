"""Atomic writes: results appear whole or not at all, and an existing result is never silently replaced."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import WandaError


def _occupied(path: Path) -> bool:
    return path.exists() and (path.is_file() or any(path.iterdir()))


def ensure_free(path: str | Path, overwrite: bool, what: str = "output") -> None:
    """Refuse an existing non-empty target before any long work starts."""
    path = Path(path)
    if _occupied(path) and not overwrite:
        raise WandaError(f"{what} {path} already exists and is not empty; choose another path or pass --overwrite")


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False, exist_ok: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it is renamed into place.

    ``exist_ok``: if ``target`` appeared meanwhile (another process made it), keep that one silently.
    """
    target = Path(target)
    if not exist_ok:
        ensure_free(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if _occupied(target):
            if exist_ok and not overwrite:
                shutil.rmtree(tmp)
                return
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.exists():
                target.rmdir()
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> None:
    path = Path(path)
    ensure_free(path, overwrite, "file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any, overwrite: bool = False) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n", overwrite)
