"""wanda: prune large language models by weights and activations (Sun et al., arXiv 2306.11695).

The Python API mirrors the command line::

    from wanda import PruneSettings, prune, perplexity
    report = prune(model, calibration_ids, PruneSettings(prune_method="wanda", sparsity_ratio=0.5))
    ppl = perplexity(model, eval_windows)
"""

from .errors import WandaError
from .eval import perplexity
from .models import StructureOverride
from .pruning.prune import LayerReport, PruneReport, model_sparsity, prune
from .pruning.prune_settings import METHODS, PruneSettings, SparsityPattern

__all__ = [
    "METHODS",
    "PruneSettings",
    "SparsityPattern",
    "WandaError",
    "perplexity",
    "prune",
    "model_sparsity",
    "PruneReport",
    "LayerReport",
    "StructureOverride",
]
__version__ = "0.1.0"
