"""What a prune run reports: per matrix (``LayerReport``) and for the whole model (``PruneReport``), the same
for a resident and a streamed run, and what the results files and the printed summary are made from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..export.compressed_tensors import QuantizedMatrix
from ..masks import overall_sparsity
from ..models import NotPruned

__all__ = ["NO_TOKEN_RULE", "LayerReport", "PruneReport"]


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    prune_seconds: float
    obs_loss: float | None = None
    #: the ratio this layer was asked for (the sparsity profile's; ``sparsity`` is what it got)
    ratio: float | None = None
    #: calibration tokens this matrix read (for an expert: the tokens routed to it); None without calibration
    tokens: int | None = None
    #: the rule that replaced the missing statistic, when ``tokens`` is 0
    rule: str | None = None
    #: the Hessian dampening finally used (fraction of its mean diagonal) by the methods that factorise it:
    #: ``--percdamp`` unless the factorisation had to escalate it
    damping: float | None = None
    #: GPTQ's OBS-predicted loss of quantizing the pruned weight (``--wbits``), None without quantization
    quant_loss: float | None = None


#: What a matrix that read no calibration token is pruned with (see ``InputStatistic.neutral``).
NO_TOKEN_RULE = "no calibration token: the method with a neutral statistic (magnitude in its own scope, no update)"


@dataclass
class PruneReport:
    """What ``prune`` did. ``prune_seconds`` is the original code's pruning speed: mask-and-update time summed over
    layers, without the forward passes; ``wall_seconds`` includes everything."""

    settings: dict
    layers: list[LayerReport] = field(default_factory=list)
    wall_seconds: float = 0.0
    calibration_tokens: int = 0
    #: seconds of the sparsity profile's own walk (OWL's dense pass), part of ``wall_seconds``
    profile_seconds: float = 0.0
    #: peak resident memory during this call (Linux; elsewhere the process's peak so far), MiB
    peak_rss_mb: float = 0.0
    #: every other parameter inside the decoder blocks, with the reason it was left alone
    not_pruned: list[NotPruned] = field(default_factory=list)
    #: ``--wbits``: each quantized matrix's grid parameters (what a quantized file stores beside the codes), by
    #: matrix; not in ``to_dict``
    quantized: dict[str, QuantizedMatrix] = field(default_factory=dict)

    @property
    def prune_seconds(self) -> float:
        return sum(layer.prune_seconds for layer in self.layers)

    @property
    def actual_sparsity(self) -> float:
        """Zeros over all pruned matrices, weighted by their size."""
        return overall_sparsity((l.shape, l.sparsity) for l in self.layers)

    @property
    def sparsity_over(self) -> str:
        """What ``actual_sparsity`` is computed over, in words."""
        pruned = sum(l.shape[0] * l.shape[1] for l in self.layers)
        left = sum(math.prod(n.shape) for n in self.not_pruned)
        return (
            f"the {len(self.layers)} pruned weight matrices inside the decoder blocks ({pruned} weights); "
            f"not counted: the {len(self.not_pruned)} block parameters listed in not_pruned ({left} values), "
            "the embeddings and the LM head"
        )

    def not_pruned_summary(self) -> str:
        """One line: the not-pruned parameters grouped by reason, with a count and the first name of each."""
        groups: dict[str, list[str]] = {}
        for item in self.not_pruned:
            groups.setdefault(item.reason, []).append(item.name)
        return "; ".join(f"{reason}: {len(names)} (e.g. {names[0]})" for reason, names in groups.items()) or "none"

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "actual_sparsity": self.actual_sparsity,
            "sparsity_over": self.sparsity_over,
            "prune_seconds": self.prune_seconds,
            "wall_seconds": self.wall_seconds,
            "calibration_tokens": self.calibration_tokens,
            "profile_seconds": self.profile_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "layers": [asdict(layer) for layer in self.layers],
            "not_pruned": [asdict(item) for item in self.not_pruned],
            "matrices_without_tokens": [l.name for l in self.layers if l.rule is not None],
        }
