"""Pruning methods: pure tensor code that turns a weight and its calibration statistic into a mask
(and, for the OBS methods, an updated weight). Nothing here knows about models, hooks or devices."""

from .dsnot import dsnot
from .obs import obs_prune
from .owl import outlier_ratio, owl_ratios
from .registry import (
    DSNOT_BASES,
    METHOD_SPECS,
    LayerResult,
    MethodSpec,
    dsnot_applies,
    get_method,
    prune_layer,
    statistics_for,
)
from .ria import ria_scores
from .scores import magnitude_scores, wanda_scores

__all__ = [
    "DSNOT_BASES",
    "METHOD_SPECS",
    "LayerResult",
    "MethodSpec",
    "dsnot_applies",
    "get_method",
    "prune_layer",
    "statistics_for",
    "dsnot",
    "obs_prune",
    "outlier_ratio",
    "owl_ratios",
    "ria_scores",
    "magnitude_scores",
    "wanda_scores",
]
