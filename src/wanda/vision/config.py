"""Validated settings of image-classifier pruning (the seed's ``image_classifiers`` flags).

The seed prunes with ``--prune_metric`` (magnitude or wanda) compared within ``--prune_granularity``
(``layer``: one threshold per matrix; ``row``: the same fraction of every output row). N:M patterns, which the
seed lacked, compare within groups of M consecutive inputs whatever the granularity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..masks.pattern import SparsityPattern
from ..errors import WandaError

__all__ = ["VisionPruneSettings", "VISION_METRICS", "GRANULARITIES"]

#: Metrics accepted by ``--prune_metric``.
VISION_METRICS = ("magnitude", "wanda")
#: ``--prune_granularity`` -> the scope the shared mask selection compares scores within.
GRANULARITIES = {"layer": "matrix", "row": "row"}


@dataclass
class VisionPruneSettings:
    """What to prune and how; ``validate()`` checks the combination and fills the implied ratio of N:M.

    ``sparsity=None`` means N/M for N:M patterns and 0.5 for unstructured.
    """

    metric: str = "wanda"
    granularity: str = "row"
    sparsity: float | None = None
    sparsity_type: str = "unstructured"
    #: Calibration images drawn from ``train/`` (the seed's default is 4096; its paper reports that a few
    #: hundred already suffice for Wanda, so the command's default is smaller, see ``wanda vision --help``).
    nsamples: int = 4096
    #: Images per forward pass, for calibration and evaluation alike.
    batch_size: int = 64
    #: Seed of the calibration sampling.
    seed: int = 0
    pattern: SparsityPattern = field(default_factory=SparsityPattern, init=False)

    def validate(self) -> "VisionPruneSettings":
        if self.metric not in VISION_METRICS:
            raise WandaError(f"--prune_metric must be one of {', '.join(VISION_METRICS)}; got {self.metric!r}")
        if self.granularity not in GRANULARITIES:
            raise WandaError(f"--prune_granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}")
        self.pattern = SparsityPattern.parse(self.sparsity_type)
        ratio = self.sparsity
        if ratio is not None and (math.isnan(ratio) or not 0.0 <= ratio < 1.0):
            raise WandaError(f"--sparsity must be in [0, 1), got {ratio}")
        if self.pattern.is_nm:
            if ratio is not None and not math.isclose(ratio, self.pattern.ratio, abs_tol=1e-9):
                raise WandaError(
                    f"--sparsity_type {self.pattern} prunes exactly {self.pattern.ratio:g} of the weights, but "
                    f"--sparsity is {ratio:g}; omit --sparsity or set it to {self.pattern.ratio:g}"
                )
            self.sparsity = self.pattern.ratio
        elif ratio is None:
            self.sparsity = 0.5
        for name in ("nsamples", "batch_size"):
            if getattr(self, name) < 1:
                raise WandaError(f"--{name} must be at least 1, got {getattr(self, name)}")
        return self

    @property
    def scope(self) -> str:
        """The scope that ``wanda.masks.select_mask`` compares unstructured scores within."""
        return GRANULARITIES[self.granularity]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["pattern"] = str(self.pattern)
        return out
