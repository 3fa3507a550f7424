"""Pruning an image classifier in one shot, as the paper's ``image_classifiers`` does.

One calibration pass through the dense model records every pruned layer's input statistics at once (the
the original code ran its blocks in turn but fed each the *dense* output of the one before, which is the same thing);
then every layer is pruned from those statistics, with no layer-wise re-run. The scores are the method
registry's (``wanda.methods``: every method that is a score of each weight) and the mask selection is the
language models' own (``wanda.masks``), with the comparison group of ``--granularity``; only the loop is here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import WandaError
from ..masks import overall_sparsity, select_mask, zero_fraction
from ..methods import get_method
from ..stats import InputStatistic
from .config import VisionPruneSettings
from .layout import ClassifierLayout, find_layout, matrix_view
from .recorder import ClassifierInputRecorder

__all__ = [
    "layer_mask",
    "record_statistics",
    "prune_classifier",
    "VisionPruneReport",
    "VisionLayerReport",
]

log = logging.getLogger(__name__)

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def layer_mask(weight: torch.Tensor, stat: InputStatistic | None, settings: VisionPruneSettings) -> torch.Tensor:
    """The mask (True = pruned) of one (out_features, in_features) weight. Pure: no model, no hooks."""
    scores = get_method(settings.metric).score(weight, stat)
    return select_mask(scores, settings.sparsity, settings.pattern, settings.scope)


@dataclass
class VisionLayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float


@dataclass
class VisionPruneReport:
    settings: dict
    layers: list[VisionLayerReport] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    calibration_images: int = 0
    calibration_seconds: float = 0.0
    prune_seconds: float = 0.0

    @property
    def actual_sparsity(self) -> float:
        """Zeros over all pruned matrices, weighted by their size (the original code's ``check_sparsity``, head excluded)."""
        return overall_sparsity((l.shape, l.sparsity) for l in self.layers)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "actual_sparsity": self.actual_sparsity,
            "head": self.head,
            "calibration_images": self.calibration_images,
            "calibration_seconds": self.calibration_seconds,
            "prune_seconds": self.prune_seconds,
            "layers": [asdict(layer) for layer in self.layers],
        }


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def record_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[torch.Tensor],
    statistic: type[InputStatistic],
    forward: Forward,
) -> tuple[ClassifierInputRecorder, int]:
    """Run every calibration batch (images, 3, H, W) through ``model`` once; return the recorder and the count."""
    device, images = _device_of(model), 0
    with ClassifierInputRecorder(layers, statistic) as recorder:
        for batch in batches:
            forward(model, batch.to(device))
            recorder.end_batch()
            images += batch.shape[0]
    if images == 0:
        raise WandaError("no calibration images: --prune_metric wanda needs at least one image in train/")
    return recorder, images


@torch.no_grad()
def prune_classifier(
    model: nn.Module,
    calibration: Iterable[torch.Tensor] | None,
    settings: VisionPruneSettings,
    forward: Forward,
    layout: ClassifierLayout | None = None,
) -> VisionPruneReport:
    """Prune ``model``'s block layers in place (see the module docstring); the head is never touched.

    ``calibration``: batches of preprocessed images (only used by metrics that need statistics).
    ``forward(model, images) -> logits`` runs the model (its signature differs between libraries).
    """
    metric = get_method(settings.metric)
    layout = layout or find_layout(model)
    report = VisionPruneReport(settings=settings.to_dict(), head=list(layout.head))
    recorder = None
    if metric.statistic is not None:
        if calibration is None:
            raise WandaError(f"--prune_metric {settings.metric} needs calibration images")
        start = time.perf_counter()
        recorder, report.calibration_images = record_statistics(
            model, layout.prunable, calibration, metric.statistic, forward
        )
        report.calibration_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for name, layer in layout.prunable.items():
        weight = matrix_view(layer)  # (out, in), a view of the parameter
        mask = layer_mask(weight, recorder.stat(name) if recorder is not None else None, settings)
        weight.masked_fill_(mask.to(weight.device), 0)
        report.layers.append(VisionLayerReport(name, tuple(weight.shape), zero_fraction(weight)))
    report.prune_seconds = time.perf_counter() - start
    log.info(
        "pruned %d layers with %s per %s: sparsity %.4f",
        len(report.layers),
        settings.metric,
        settings.granularity if not settings.pattern.is_nm else f"{settings.pattern} group",
        report.actual_sparsity,
    )
    return report
