"""Entry points: ``wanda``, ``wanda-opt`` and ``python -m wanda.main``.

``wanda [flags]`` runs the seed's pruning job; ``wanda SUBCOMMAND ...`` runs another tool
(``eval``, ``finetune``, ``vision``, ``speedup``) from the module ``wanda.cli.<subcommand>``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import NoReturn

from .common import guarded

SUBCOMMANDS = ("eval", "finetune", "vision", "speedup")


def main(argv: list[str] | None = None, prog: str | None = None) -> NoReturn:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    if prog in ("main.py", "__main__.py", "-c", ""):
        prog = "wanda"
    if argv and argv[0] in SUBCOMMANDS:
        name = argv.pop(0)
        try:
            module = importlib.import_module(f"wanda.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"wanda.cli.{name}":
                raise
            print(f"{prog}: error: the '{name}' command is not available in this version", file=sys.stderr)
            sys.exit(2)
        module.main(argv, f"{prog} {name}")
    from .prune import run

    guarded(lambda: run(argv, prog), prog)


def main_opt() -> NoReturn:
    """``wanda-opt``: the same tool (the architecture is detected), kept for the seed's OPT commands."""
    main(prog="wanda-opt")
