"""Pruning methods: pure tensor code that turns a weight and its calibration statistic into a mask
(and, for the OBS methods, an updated weight). Nothing here knows about models, hooks or devices."""

from .admm import AdmmSettings, AlpsSettings, SupportSettings
from .dsnot import DsnotSettings, dsnot
from .layer import LayerSettings
from .obs import DampingSettings, ObsSettings, obs_prune
from .owl import outlier_ratio, owl_ratios
from .registry import (
    DSNOT_BASES,
    METHOD_SETTINGS,
    METHOD_SPECS,
    PRUNERS,
    SCORE_METHODS,
    LayerResult,
    MethodSpec,
    get_method,
    prune_layer,
    settings_from,
    statistics_for,
)
from .ria import RiaSettings, ria_scores
from .scores import WandaSettings, magnitude_scores, wanda_scores

__all__ = [
    "DSNOT_BASES",
    "METHOD_SETTINGS",
    "METHOD_SPECS",
    "PRUNERS",
    "SCORE_METHODS",
    "LayerResult",
    "LayerSettings",
    "MethodSpec",
    "get_method",
    "prune_layer",
    "settings_from",
    "statistics_for",
    "AdmmSettings",
    "AlpsSettings",
    "DampingSettings",
    "DsnotSettings",
    "ObsSettings",
    "RiaSettings",
    "SupportSettings",
    "WandaSettings",
    "dsnot",
    "obs_prune",
    "outlier_ratio",
    "owl_ratios",
    "ria_scores",
    "magnitude_scores",
    "wanda_scores",
]
