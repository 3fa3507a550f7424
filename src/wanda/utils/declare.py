"""How a setting is declared: once, as a dataclass field carrying its default and its help.

Every job's settings are a frozen dataclass of such fields. The command-line parsers are generated from them
(``wanda.cli.parsing``, on transformers' ``HfArgumentParser``), the Python API builds the same objects, and
``__post_init__`` validates them, so a value is checked the same way however it arrives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, Field, asdict
from typing import Any

from ..errors import WandaError

__all__ = ["setting", "SettingsMixin", "require", "require_seed", "MAX_SEED"]


def setting(
    default: Any = MISSING, help: str = "", *, factory: Any = MISSING, aliases: list[str] | None = None, **argparse: Any
) -> Field:
    """A dataclass field with its help text (and optional argparse extras such as ``metavar`` or ``aliases``)."""
    metadata: dict[str, Any] = {"help": help, **argparse}
    if aliases:
        metadata["aliases"] = aliases
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def require(condition: bool, message: str) -> None:
    """Raise the user-facing error ``message`` unless ``condition`` holds (for ``__post_init__`` checks)."""
    if not condition:
        raise WandaError(message)


#: The largest seed every generator in use accepts (numpy's legacy seeding, torch, transformers' set_seed).
MAX_SEED = 2**32 - 1


def require_seed(seed: int, flag: str = "--seed") -> None:
    """A seed is an integer in [0, 2**32 - 1]; a larger one overflowed torch.manual_seed with a traceback."""
    require(0 <= seed <= MAX_SEED, f"{flag} must be in [0, {MAX_SEED}], got {seed}")


class SettingsMixin:
    """What every frozen settings class shares: a plain dict for results files, and a copy with changes."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field inside ``__post_init__`` of a frozen dataclass (e.g. an implied default)."""
        object.__setattr__(self, name, value)
