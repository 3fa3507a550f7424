"""Command-line parsers generated from settings dataclasses, and the boundary that turns errors into exit 2.

Each flag is a field of a frozen settings dataclass (``wanda.utils.declare.setting``): its name, type, default and
help are declared there once, and transformers' ``HfArgumentParser`` builds the parser from the fields.
Parsing constructs the dataclasses, so their ``__post_init__`` validation runs before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, NoReturn, Sequence

from transformers import HfArgumentParser

from ..errors import WandaError
from .recipe import CONFIG_FLAG, expand_config

__all__ = ["SettingsParser", "guarded", "setup_logging"]


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help when it has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})"


class SettingsParser(HfArgumentParser):
    """``HfArgumentParser`` whose usage errors are one plain line and exit code 2 (argparse's code)."""

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(list(dataclass_types), **kwargs)
        self.add_argument(
            CONFIG_FLAG,
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="read settings from a .json or .yaml mapping of setting names to values; flags given on the "
            "command line override the file",
        )

    def error(self, message: str) -> NoReturn:
        # raised, not printed and exited, so that under torchrun a bad flag on one rank reaches every rank
        # (wanda.parallel.ranks.Ranks.agreed); ``guarded`` prints it as one line with exit code 2
        exc = WandaError(f"{message} (see {self.prog} --help)")
        exc.prog = self.prog
        raise exc

    def parse_settings(self, argv: Sequence[str]) -> tuple:
        """The settings objects, in the order of the dataclasses; validation errors exit 2 like usage errors."""
        try:
            argv = expand_config(self, argv)
        except WandaError as exc:
            exc.prog = self.prog
            raise
        self._refuse_empty(self.parse_known_args(list(argv))[0])
        try:
            *settings, rest = self.parse_args_into_dataclasses(
                list(argv), return_remaining_strings=True, look_for_args_file=False
            )
        except WandaError as exc:
            exc.prog = self.prog
            raise
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return tuple(settings)

    def _refuse_empty(self, namespace: argparse.Namespace) -> None:
        """An empty (or blank) string is never a name, a path or a number: ``--model ""`` must not mean the
        bundled model, nor ``--save ""`` the current folder. Checked before the settings validate their values.
        A flag whose bare form means "" (``--merge``) may be given one."""
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if (
                action.option_strings
                and action.const != ""
                and any(isinstance(v, str) and not v.strip() for v in values)
            ):
                flag = max(action.option_strings, key=len)
                self.exit(2, f"{self.prog}: error: {flag} is an empty string; give a value or leave the flag out\n")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(run: Callable[[], int | None], prog: str) -> NoReturn:
    """Turn user errors into ``prog: error: ...`` and their exit code (2 unless said otherwise); Ctrl-C into 130."""
    try:
        code = run() or 0
    except WandaError as exc:
        print(f"{getattr(exc, 'prog', prog)}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
