"""The one exception type that the command line turns into a plain message and an exit code (2 by default)."""

from __future__ import annotations


class WandaError(Exception):
    """A problem the user can fix (a flag, a path, a model, a corpus); its message says how."""

    #: The process's exit code when this error ends a command (argparse's 2 for usage and input errors).
    exit_code: int = 2
