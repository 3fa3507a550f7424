"""The sparsity pattern: unstructured, or exactly N pruned of every M consecutive inputs."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import WandaError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """Unstructured (``n == m == 0``) or N:M: exactly ``n`` of every ``m`` consecutive inputs are pruned."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def ratio(self) -> float:
        return self.n / self.m if self.is_nm else math.nan

    @classmethod
    def parse(cls, text: str) -> "SparsityPattern":
        """Accept ``unstructured`` or ``N:M`` with 0 < N < M."""
        if text.strip().lower() == "unstructured":
            return cls()
        match = _NM.match(text)
        if not match:
            raise WandaError(f"--sparsity_type must be 'unstructured' or N:M such as 2:4 or 4:8, got {text!r}")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise WandaError(f"--sparsity_type {text}: N:M needs 0 < N < M (e.g. 2:4 prunes 2 of every 4 weights)")
        return cls(n, m)

    def resolve_ratio(self, ratio: float | None, flag: str = "--sparsity_ratio") -> float:
        """The fraction to prune: ``ratio`` checked against the pattern (None: N/M, or 0.5 unstructured)."""
        if ratio is not None and (math.isnan(ratio) or not 0.0 <= ratio < 1.0):
            raise WandaError(f"{flag} must be in [0, 1), got {ratio}")
        if self.is_nm:
            if ratio is not None and not math.isclose(ratio, self.ratio, abs_tol=1e-9):
                raise WandaError(
                    f"--sparsity_type {self} prunes exactly {self.ratio:g} of the weights, but {flag} is "
                    f"{ratio:g}; omit {flag} or set it to {self.ratio:g}"
                )
            return self.ratio
        return 0.5 if ratio is None else ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


class PatternField:
    """For settings with a ``sparsity_type`` field: the parsed pattern, also written into ``to_dict()``."""

    sparsity_type: str

    @property
    def pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.sparsity_type)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "pattern": str(self.pattern)}  # type: ignore[misc]
