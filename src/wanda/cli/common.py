"""What every sub-command shares: an argument parser whose errors are one line, and the error boundary."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn

from ..errors import WandaError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one plain line and exit code 2 (argparse's own code for usage errors)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(run: Callable[[], int | None], prog: str) -> NoReturn:
    """Turn user errors into ``prog: error: ...`` and exit code 2; Ctrl-C into 130."""
    try:
        code = run() or 0
    except WandaError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
