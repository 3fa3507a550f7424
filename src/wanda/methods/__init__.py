"""Pruning methods: pure tensor code that turns a weight and its calibration statistic into a mask
(and, for the OBS methods, an updated weight). Nothing here knows about models, hooks or devices."""

from .registry import METHOD_SPECS, LayerResult, MethodSpec, get_method
from .obs import obs_prune
from .scores import magnitude_scores, wanda_scores

__all__ = ["METHOD_SPECS", "LayerResult", "MethodSpec", "get_method", "obs_prune", "magnitude_scores", "wanda_scores"]
