"""Validated settings of image-classifier pruning (the original code's ``image_classifiers`` flags).

The original code prunes with ``--prune_metric`` (magnitude or wanda; RIA too, from the same method registry as the language models) compared within ``--prune_granularity``
(``layer``: one threshold per matrix; ``row``: the same fraction of every output row). N:M patterns, which the
the original code lacked, compare within groups of M consecutive inputs whatever the granularity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..masks.pattern import PatternField
from ..methods import SCORE_METHODS
from ..utils.declare import SettingsMixin, require, require_seed, setting

__all__ = ["VisionPruneSettings", "VISION_METRICS", "GRANULARITIES"]

#: Metrics accepted by ``--prune_metric``: the registry's methods that are a score of each weight (the
#: original code's magnitude and wanda, and RIA at its default exponent).
VISION_METRICS = SCORE_METHODS
#: ``--prune_granularity`` -> the scope the shared mask selection compares scores within.
GRANULARITIES = {"layer": "matrix", "row": "row"}


#: The largest --nsamples / --batch_size (a count the data loader can still slice by).
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class VisionPruneSettings(PatternField, SettingsMixin):
    """What to prune and how. ``sparsity=None`` means N/M for N:M patterns and 0.5 for unstructured; after
    construction it holds the resolved ratio."""

    _argument_group_name: ClassVar[str] = "pruning (the original code's flags)"

    prune_metric: str = setting("wanda", "score of a weight", choices=VISION_METRICS)
    prune_granularity: str = setting(
        "row",
        "layer (one threshold per matrix) or row (the same fraction of every output row)",
        choices=tuple(GRANULARITIES),
    )
    sparsity: float | None = setting(
        None, "fraction of weights to prune (default: 0.5 for unstructured, N/M for N:M, which it must equal)"
    )
    sparsity_type: str = setting(
        "unstructured",
        "'unstructured' or N:M such as 2:4, 4:8 (compared within groups of "
        "M consecutive inputs whatever the granularity)",
    )
    #: The original code's default is 4096; its paper reports that a few hundred already suffice for Wanda.
    nsamples: int = setting(4096, "calibration images from train/")
    batch_size: int = setting(64, "images per forward pass, for calibration and evaluation alike")
    seed: int = setting(0, "seed of the calibration sampling")

    def __post_init__(self) -> None:
        require_seed(self.seed)
        require(
            self.prune_metric in VISION_METRICS,
            f"--prune_metric must be one of {', '.join(VISION_METRICS)}; got {self.prune_metric!r}",
        )
        require(
            self.prune_granularity in GRANULARITIES,
            f"--prune_granularity must be one of {', '.join(GRANULARITIES)}; got {self.prune_granularity!r}",
        )
        self._set("sparsity", self.pattern.resolve_ratio(self.sparsity, "--sparsity"))
        for name in ("nsamples", "batch_size"):
            value = getattr(self, name)
            require(1 <= value <= MAX_COUNT, f"--{name} must be in [1, {MAX_COUNT}], got {value}")

    @property
    def metric(self) -> str:
        return self.prune_metric

    @property
    def granularity(self) -> str:
        return self.prune_granularity

    @property
    def scope(self) -> str:
        """The scope that ``wanda.masks.select_mask`` compares unstructured scores within."""
        return GRANULARITIES[self.granularity]
