"""``--config FILE.json|yaml``: a command's settings read from a file, the way recipes are shared.

The file is a mapping from setting names (the flags without their dashes) to values. It is turned into the flags
it stands for and put before the command line's own, so the one parser checks and converts both alike (a value
in the file is validated exactly as the same flag would be), and a flag given on the command line wins, since
argparse keeps the last value it reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import WandaError

__all__ = ["CONFIG_FLAG", "expand_config", "load_recipe", "recipe_flags"]

CONFIG_FLAG = "--config"
SUFFIXES = (".json", ".yaml", ".yml")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping in ``path``; anything else (missing, unreadable, not a mapping) is one line."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise WandaError(f"{CONFIG_FLAG} {path}: the file must end in {', '.join(SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WandaError(f"{CONFIG_FLAG} {path}: cannot read it ({exc.__class__.__name__}: {exc})") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WandaError(f"{CONFIG_FLAG} {path}: not valid {path.suffix[1:].upper()}: {first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise WandaError(f"{CONFIG_FLAG} {path}: the file must hold a mapping of setting names to values")
    return data


def _scalar(path: Path, key: str, value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        raise WandaError(f"{CONFIG_FLAG} {path}: {key} takes one value, got {json.dumps(value)[:80]}")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def recipe_flags(parser: argparse.ArgumentParser, data: dict[str, Any], path: str | Path) -> list[str]:
    """The flags that ``data`` stands for under ``parser``; an unknown name is one line naming it."""
    path = Path(path)
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # a field defaulting to True also has a --no_X flag of the same dest
        if action.option_strings and (action.dest not in actions or f"--{action.dest}" in action.option_strings):
            actions[action.dest] = action
    flags: list[str] = []
    for key, value in data.items():
        dest = key.lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            raise WandaError(f"{CONFIG_FLAG} {path}: {key!r} is not a setting of {parser.prog} (see --help)")
        if value is None:  # the setting's own default
            continue
        option = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if action.nargs == 0:  # store_true / store_const
            if not isinstance(value, bool):
                raise WandaError(f"{CONFIG_FLAG} {path}: {key} takes true or false, got {value!r}")
            flags += [option] if value else []
        elif action.nargs in ("+", "*"):
            if isinstance(value, dict):  # {REGEX: RATIO} for a flag of KEY=VALUE pairs
                value = [f"{k}={_scalar(path, key, v)}" for k, v in value.items()]
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if not values and action.nargs == "+":
                raise WandaError(f"{CONFIG_FLAG} {path}: {key} needs at least one value")
            flags += [option, *(_scalar(path, key, v) for v in values)]
        else:
            flags += [option, _scalar(path, key, value)]
    return flags


def expand_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's flags, placed first so that the rest override them."""
    argv = list(argv)
    rest: list[str] = []
    paths: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == CONFIG_FLAG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise WandaError(f"{CONFIG_FLAG} needs a file (see {parser.prog} --help)")
            paths.append(argv[i + 1])
            i += 2
            continue
        if token.startswith(CONFIG_FLAG + "="):
            paths.append(token.split("=", 1)[1])
        else:
            rest.append(token)
        i += 1
    if len(paths) > 1:
        raise WandaError(f"{CONFIG_FLAG} was given {len(paths)} times; merge the files into one")
    if not paths:
        return rest
    if not paths[0].strip():
        raise WandaError(f"{CONFIG_FLAG} is an empty string; give a file or leave the flag out")
    return recipe_flags(parser, load_recipe(paths[0]), paths[0]) + rest
