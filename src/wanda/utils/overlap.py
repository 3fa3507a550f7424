"""Outputs against inputs: the check that no output can overwrite, replace or nest inside an input.

Every command runs it before anything loads, on every path it was given, after resolving symlinks; it also
refuses names the writers' temporary names (``wanda.utils.io``) would push past the file system's limit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import WandaError

__all__ = ["FILE_FOLDERS", "check_disjoint"]


#: Characters the writers add to a target's name: ``.NAME.XXXXXXXX.tmp`` (14), ``.NAME.old-PID`` (up to 16 with a
#: 7-digit pid), ``.NAME.lock`` (6), ``NAME.work`` (5); the longest decides.
_TEMP_NAME_EXTRA = 16


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


#: Output flags whose folder receives named files one by one and is never replaced as a whole: another output
#: may live inside it (``--save out --save_model out/model``; ``finetune --output_dir out --merge out/merged``),
#: though not be it or hold it.
FILE_FOLDERS = frozenset({"--save", "--output_dir"})


def check_disjoint(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Refuse, before anything loads, any output that could touch an input, and outputs that overlap.

    ``inputs`` and ``outputs`` map a flag (``--model``) to a path, a list of paths, or ``None``. Paths are
    compared after resolving symlinks (so a trailing slash, a relative or absolute spelling and a link all
    count as the same place): an output equal to an input, inside one or holding one is refused, whatever
    ``--overwrite`` says, since writing it (or replacing it atomically) would destroy the input. Inputs that
    do not exist on disk (hub ids, named corpora) cannot be destroyed and are skipped. Two outputs may not be
    the same place or nest either way, except inside a folder of result files (``FILE_FOLDERS``). An output whose name the temporary names (``.NAME.XXXXXXXX.tmp``,
    ``.NAME.old-PID``) would push past the file system's name limit is refused too.
    """

    def items(mapping: dict[str, Any]) -> list[tuple[str, str]]:
        out = []
        for flag, value in mapping.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is not None and str(item).strip():
                    out.append((flag, str(item)))
        return out

    def overlap(a: Path, b: Path) -> str | None:
        if a == b:
            return "is"
        if a.is_relative_to(b):
            return "is inside"
        if b.is_relative_to(a):
            return "holds"
        return None

    try:
        existing = [(flag, raw, _resolved(raw)) for flag, raw in items(inputs) if Path(raw).expanduser().exists()]
        targets = [(flag, raw, _resolved(raw)) for flag, raw in items(outputs)]
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an embedded NUL byte
        raise WandaError(f"a path given cannot be resolved: {exc}") from exc
    for out_flag, out_raw, out_path in targets:
        for in_flag, in_raw, in_path in existing:
            how = overlap(out_path, in_path)
            if how:
                raise WandaError(
                    f"{out_flag} {out_raw} {how} {in_flag} {in_raw} ({in_path}); writing it would destroy the "
                    "input, even with --overwrite: choose an output outside the inputs"
                )
        _check_name_length(out_flag, out_raw, out_path)
    for i, (flag_a, raw_a, path_a) in enumerate(targets):
        for flag_b, raw_b, path_b in targets[i + 1 :]:
            how = overlap(path_a, path_b)
            if (how == "is inside" and flag_b in FILE_FOLDERS) or (how == "holds" and flag_a in FILE_FOLDERS):
                continue
            if how:
                raise WandaError(f"{flag_a} {raw_a} {how} {flag_b} {raw_b}; give the outputs separate places")


def _check_name_length(flag: str, raw: str, path: Path) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts[1:]:
        if len(os.fsencode(part)) > limit:
            raise WandaError(f"{flag} {raw}: the name {part[:40]!r}... is longer than the file system allows ({limit})")
    if len(os.fsencode(path.name)) + _TEMP_NAME_EXTRA > limit:
        raise WandaError(
            f"{flag} {raw}: the name is {len(os.fsencode(path.name))} bytes; its temporary names would pass the "
            f"file system's limit of {limit}: choose a name of at most {limit - _TEMP_NAME_EXTRA} bytes"
        )
