"""The one exception type that the command line turns into a plain message and exit code 2."""

from __future__ import annotations


class WandaError(Exception):
    """A problem the user can fix (a flag, a path, a model, a corpus); its message says how."""
