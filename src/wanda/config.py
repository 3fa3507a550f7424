"""Validated settings shared by the command line and the Python API.

Every number the pruning uses lives here with its default, so that the CLI only turns flags into these
objects and the library never reads flags itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from .errors import WandaError

__all__ = ["SparsityPattern", "PruneSettings", "METHODS"]

#: Methods accepted by ``--prune_method`` (the seed's names).
METHODS = (
    "magnitude",
    "wanda",
    "sparsegpt",
    "ablate_mag_seq",
    "ablate_wanda_seq",
    "ablate_mag_iter",
    "ablate_wanda_iter",
)

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

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


@dataclass
class PruneSettings:
    """What to prune and how; ``validate()`` checks the combination and fills the implied ratio of N:M.

    ``sparsity_ratio=None`` means N/M for N:M patterns and 0.5 for unstructured.
    """

    method: str = "wanda"
    sparsity_ratio: float | None = None
    sparsity_type: str = "unstructured"
    use_variant: bool = False
    #: Calibration windows pushed through a block per forward pass.
    batch_size: int = 8
    #: Columns per lazy OBS update (SparseGPT's B = 128); also the re-selection period of the ``iter`` ablations.
    blocksize: int = 128
    #: Hessian dampening as a fraction of its mean diagonal (SparseGPT's 1%).
    percdamp: float = 0.01
    #: Relative tolerance of the Wanda variant's bisection on the achieved sparsity.
    variant_tolerance: float = 1e-3
    pattern: SparsityPattern = field(default_factory=SparsityPattern, init=False)

    def validate(self) -> "PruneSettings":
        if self.method not in METHODS:
            raise WandaError(f"--prune_method must be one of {', '.join(METHODS)}; got {self.method!r}")
        self.pattern = SparsityPattern.parse(self.sparsity_type)
        ratio = self.sparsity_ratio
        if ratio is not None and not (0.0 <= ratio < 1.0) or (ratio is not None and math.isnan(ratio)):
            raise WandaError(f"--sparsity_ratio must be in [0, 1), got {ratio}")
        if self.pattern.is_nm:
            if ratio is not None and not math.isclose(ratio, self.pattern.ratio, abs_tol=1e-9):
                raise WandaError(
                    f"--sparsity_type {self.pattern} prunes exactly {self.pattern.ratio:g} of the weights, "
                    f"but --sparsity_ratio is {ratio:g}; omit --sparsity_ratio or set it to {self.pattern.ratio:g}"
                )
            self.sparsity_ratio = self.pattern.ratio
        elif ratio is None:
            self.sparsity_ratio = 0.5
        if self.use_variant and (self.method != "wanda" or self.pattern.is_nm):
            raise WandaError("--use_variant applies to --prune_method wanda with unstructured sparsity only")
        for name in ("batch_size", "blocksize"):
            if getattr(self, name) < 1:
                raise WandaError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pattern.is_nm and self.blocksize % self.pattern.m:
            raise WandaError(f"blocksize {self.blocksize} must be a multiple of M={self.pattern.m}")
        if not 0 <= self.percdamp < 1:
            raise WandaError(f"percdamp must be in [0, 1), got {self.percdamp}")
        return self

    def to_dict(self) -> dict:
        out = asdict(self)
        out["pattern"] = str(self.pattern)
        return out
