"""Sparsity profiles: how the requested ratio is spread over the pruned layers.

A profile maps each pruned layer's name to its own ratio before the first block is pruned; the methods then
prune every layer at its ratio. ``uniform`` (the paper's setting) gives every layer the requested ratio; ``owl``
(``wanda.methods.owl``) gives each decoder block a ratio from its share of activation outliers, measured on the
dense model in one extra forward walk over the calibration set; ``atp`` (``atp_ratios``) lets the ratio rise
linearly with depth, as ATP derives it, and needs no data at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..engine import BlockInputs, LayerwiseEngine
from ..masks import prune_count
from ..methods.owl import outlier_ratio, owl_ratios
from ..methods.scores import wanda_scores
from ..models import DecoderLayout
from ..stats import InputRecorder, SquaredNorm

if TYPE_CHECKING:
    from .prune_settings import PruneSettings

__all__ = ["PROFILES", "Profile", "atp_ratios", "exact_layer_ratios", "layer_ratios", "owl_outlier_ratios"]


@dataclass(frozen=True)
class Profile:
    name: str
    #: True when the profile itself reads calibration data (so even magnitude pruning needs it).
    needs_calibration: bool
    #: (model, layout, calibration ids, settings, engine) -> {layer name: ratio}; missing names get the
    #: target. Under torchrun every rank must return the same ratios.
    ratios: Callable[..., dict[str, float]]
    doc: str


def _uniform(
    model: nn.Module,
    layout: DecoderLayout,
    calibration_ids,
    settings: PruneSettings,
    engine: LayerwiseEngine | None,
) -> dict[str, float]:
    return {}


def owl_outlier_ratios(engine: LayerwiseEngine, calibration_ids: torch.Tensor, m: float) -> list[float]:
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
        engine.reduce(recorder.stats, SquaredNorm)
        # matrices that read no token (an expert never routed to) say nothing about outliers
        scores = [
            wanda_scores(matrix.weight, stat.squared_norm())
            for name, matrix in recorder.layers.items()
            if (stat := recorder.stat(name)) is not None and stat.tokens > 0
        ]
        ratios.append(outlier_ratio(scores, m))

    try:
        engine.walk(calibration_ids, visit, after)
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
) -> dict[str, float]:
    outliers = owl_outlier_ratios(engine, calibration_ids, settings.owl_m)
    block_ratios = owl_ratios(outliers, settings.sparsity_ratio, settings.owl_lambda)
    return {
        name: block_ratios[index] for index in range(len(layout.blocks)) for name in layout.matrices(index).prunable
    }


def atp_ratios(blocks: int, target: float, span: float) -> list[float]:
    """ATP (Huang et al., "Determining Layer-wise Sparsity for Large Language Models Through a Theoretical
    Perspective", ICML 2025): the per-block sparsity is an increasing arithmetic progression,
    s_l = s_0 + l beta (l = 0 .. L-1), averaging the target. The paper derives it from the growth of the
    reconstruction error along depth (errors of early blocks are amplified by every later one, so early blocks
    are pruned less) and searches its one hyperparameter beta per model; here beta = span / (L - 1), so that the
    setting is the spread between the last and the first block whatever the depth: s_l = target + span
    (l / (L - 1) - 1/2)."""
    if blocks == 1:
        return [target]
    return [target + span * (l / (blocks - 1) - 0.5) for l in range(blocks)]


def exact_layer_ratios(block_ratios: list[float], sizes: list[dict[str, int]], target: float) -> dict[str, float]:
    """{layer name: ratio} with each layer of block l near ``block_ratios[l]`` and the pruned counts summing to
    exactly floor(target * total weights). The block ratios are first shifted by one constant so that their
    mean weighted by the blocks' sizes is the target (a no-op where every block has the same layers, as in a
    dense decoder; a mixture of experts whose unobserved experts are left out may not). Every layer then gets
    floor(ratio * size), the weights still missing go one each to the layers with the largest remainders (ties:
    model order), and each layer's ratio is its count over its size, so that ``prune_count`` gives that count
    back. Deterministic (no data, no ties left to chance): every rank and the streamed engine compute the same
    ratios."""
    total = sum(size for block in sizes for size in block.values())
    if total == 0:
        return {}
    weighted = sum(block_ratios[l] * size for l, block in enumerate(sizes) for size in block.values())
    shift = target - weighted / total
    entries = [
        (name, size, min(max(block_ratios[l] + shift, 0.0), 1.0) * size)
        for l, block in enumerate(sizes)
        for name, size in block.items()
    ]
    counts = [min(math.floor(want), size) for _, size, want in entries]
    missing = prune_count(target, total) - sum(counts)
    order = sorted(range(len(entries)), key=lambda i: (counts[i] - entries[i][2], i))  # largest remainder first
    while missing:  # one pass settles it unless the clamping at 0 or 1 moved weights; each pass moves at least one
        step = 1 if missing > 0 else -1
        for i in order if missing > 0 else reversed(order):
            if missing and 0 <= counts[i] + step <= entries[i][1]:
                counts[i] += step
                missing -= step
    return {name: count / size for (name, size, _), count in zip(entries, counts)}


def _atp(
    model: nn.Module,
    layout: DecoderLayout,
    calibration_ids,
    settings: PruneSettings,
    engine: LayerwiseEngine | None,
) -> dict[str, float]:
    # the shapes only: a streamed skeleton's blocks hold no weights yet, and the profile reads none
    sizes = [
        {name: math.prod(matrix.shape) for name, matrix in layout.matrices(index).prunable.items()}
        for index in range(len(layout.blocks))
    ]
    block_ratios = atp_ratios(len(sizes), settings.sparsity_ratio, settings.atp_span)
    return exact_layer_ratios(block_ratios, sizes, settings.sparsity_ratio)


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("uniform", False, _uniform, "every layer at the requested ratio"),
        Profile("owl", True, _owl, "OWL: per-block ratios from the dense model's outlier ratios, within +-lambda"),
        Profile("atp", False, _atp, "ATP: per-block ratios rising linearly with depth, spread over --atp_span"),
    )
}


def layer_ratios(
    model: nn.Module,
    layout: DecoderLayout,
    calibration_ids: torch.Tensor | None,
    settings: PruneSettings,
    engine: LayerwiseEngine | None,
) -> dict[str, float]:
    """{layer name: ratio} for the layers the profile sets; the others are pruned at ``settings.sparsity_ratio``."""
    return PROFILES[settings.sparsity_profile].ratios(model, layout, calibration_ids, settings, engine)
