"""Sparsity profiles: how the requested ratio is spread over the pruned layers.

A profile maps each pruned layer's name to its own ratio before the first block is pruned; the methods then
prune every layer at its ratio. ``uniform`` (the paper's setting) gives every layer the requested ratio; ``owl``
(``wanda.methods.owl``) gives each decoder block a ratio from its share of activation outliers, measured on the
dense model in one extra forward walk over the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..engine import BlockInputs, LayerwiseEngine
from ..methods.owl import outlier_ratio, owl_ratios
from ..methods.scores import wanda_scores
from ..models import DecoderLayout
from ..parallel.ranks import SINGLE, Ranks
from ..stats import InputRecorder, SquaredNorm

if TYPE_CHECKING:
    from .prune_settings import PruneSettings

__all__ = ["PROFILES", "Profile", "layer_ratios", "owl_outlier_ratios"]


@dataclass(frozen=True)
class Profile:
    name: str
    #: True when the profile itself reads calibration data (so even magnitude pruning needs it).
    needs_calibration: bool
    #: (model, layout, calibration ids, settings, engine, ranks) -> {layer name: ratio}; missing names get the
    #: target. Under torchrun every rank must return the same ratios.
    ratios: Callable[..., dict[str, float]]
    doc: str


def _uniform(
    model: nn.Module,
    layout: DecoderLayout,
    calibration_ids,
    settings: PruneSettings,
    engine: LayerwiseEngine | None,
    ranks: Ranks = SINGLE,
) -> dict[str, float]:
    return {}


def owl_outlier_ratios(
    engine: LayerwiseEngine, calibration_ids: torch.Tensor, m: float, ranks: Ranks = SINGLE
) -> list[float]:
    """Each block's OWL outlier ratio on the dense model: its layers' input norms are recorded while the walk
    runs the block anyway (one block forward per block, no extra one), then scored with the dense weights.
    Under torchrun each rank walks its share of the windows and the norms are summed (exact fp64 sums, so the
    ratios are those of one process)."""
    layout = engine.layout
    recorders: dict[int, InputRecorder] = {}
    ratios: list[float] = []

    def visit(index: int, block: nn.Module, inputs: BlockInputs) -> None:
        recorder = InputRecorder(layout.matrices(index, block).prunable, SquaredNorm)
        recorders[index] = recorder.__enter__()  # its hooks see the engine's own forward of this block

    def after(index: int, outputs: BlockInputs) -> None:
        recorder = recorders.pop(index)
        recorder.remove()
        ranks.reduce(recorder.stats, SquaredNorm)
        # matrices that read no token (an expert never routed to) say nothing about outliers
        scores = [
            wanda_scores(matrix.weight, stat.squared_norm())
            for name, matrix in recorder.layers.items()
            if (stat := recorder.stat(name)) is not None and stat.tokens > 0
        ]
        ratios.append(outlier_ratio(scores, m))

    try:
        engine.walk(ranks.local_windows(calibration_ids, engine.batch_size), visit, after)
    finally:
        for recorder in recorders.values():  # an error inside the walk: no hook outlives it
            recorder.remove()
    return ratios


def _owl(
    model: nn.Module,
    layout: DecoderLayout,
    calibration_ids: torch.Tensor,
    settings: PruneSettings,
    engine: LayerwiseEngine,
    ranks: Ranks = SINGLE,
) -> dict[str, float]:
    outliers = owl_outlier_ratios(engine, calibration_ids, settings.owl_m, ranks)
    block_ratios = owl_ratios(outliers, settings.sparsity_ratio, settings.owl_lambda)
    return {
        name: block_ratios[index] for index in range(len(layout.blocks)) for name in layout.matrices(index).prunable
    }


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("uniform", False, _uniform, "every layer at the requested ratio"),
        Profile("owl", True, _owl, "OWL: per-block ratios from the dense model's outlier ratios, within +-lambda"),
    )
}


def layer_ratios(
    model: nn.Module,
    layout: DecoderLayout,
    calibration_ids: torch.Tensor | None,
    settings: PruneSettings,
    engine: LayerwiseEngine | None,
    ranks: Ranks = SINGLE,
) -> dict[str, float]:
    """{layer name: ratio} for the layers the profile sets; the others are pruned at ``settings.sparsity_ratio``."""
    return PROFILES[settings.sparsity_profile].ratios(model, layout, calibration_ids, settings, engine, ranks)
