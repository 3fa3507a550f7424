"""Which matrices a run prunes, and at what ratio, chosen by regular expressions over their names.

The shape follows the recipes users know from llm-compressor: ``targets`` (prune only these), ``ignore``
(never these) and per-pattern ratios, each a Python regular expression searched (``re.search``) in the
matrix's full name as the reports print it (``model.layers.3.mlp.down_proj``, an expert slice
``model.layers.0.mlp.experts.gate_up_proj[5].up``). ``layers\\.0\\.`` skips block 0, ``down_proj`` every
down projection. A ratio pattern overrides the sparsity profile's ratio for the matrices it matches; the first
matching pattern wins, in the order given.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import WandaError

__all__ = ["MatrixTargets", "parse_ratio_pairs"]


def _compile(flag: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise WandaError(f"{flag} {pattern!r} is not a regular expression: {exc}") from exc


def parse_ratio_pairs(pairs: list[str] | tuple[str, ...] | None, flag: str = "--target_ratios") -> tuple:
    """``["REGEX=RATIO", ...]`` as ((regex, ratio), ...); the split is at the last ``=``, since a regular
    expression may hold one. Every ratio must be in [0, 1)."""
    out = []
    for pair in pairs or ():
        regex, sep, value = str(pair).rpartition("=")
        if not sep or not regex:
            raise WandaError(f"{flag} takes REGEX=RATIO pairs, got {pair!r}")
        try:
            ratio = float(value)
        except ValueError as exc:
            raise WandaError(f"{flag} {pair!r}: {value!r} is not a number") from exc
        if not (0 <= ratio < 1) or math.isnan(ratio):
            raise WandaError(f"{flag} {pair!r}: the ratio must be in [0, 1), got {value}")
        _compile(flag, regex)
        out.append((regex, ratio))
    return tuple(out)


@dataclass(frozen=True)
class MatrixTargets:
    """``targets`` / ``ignore`` regexes (None: no restriction) and (regex, ratio) overrides."""

    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    ratios: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for flag, patterns in (("--targets", self.targets or ()), ("--ignore", self.ignore)):
            for pattern in patterns:
                _compile(flag, pattern)
        for regex, _ in self.ratios:
            _compile("--target_ratios", regex)

    @property
    def restricts(self) -> bool:
        return self.targets is not None or bool(self.ignore)

    def selects(self, name: str) -> bool:
        if self.targets is not None and not any(re.search(p, name) for p in self.targets):
            return False
        return not any(re.search(p, name) for p in self.ignore)

    def ratio(self, name: str, default: float) -> float:
        """The ratio of the first pattern matching ``name``, else ``default`` (the profile's)."""
        return next((ratio for regex, ratio in self.ratios if re.search(regex, name)), default)
