"""Pruning a whole model: the engine walks the blocks, the chosen method prunes each linear layer."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import PruneSettings
from .distributed import SINGLE, Ranks
from .engine import BlockInputs, BlockSource, LayerwiseEngine, read_only
from .errors import WandaError
from .masks import overall_sparsity, zero_fraction
from .methods import get_method, prune_layer, statistics_for
from .models import check_seqlen, find_decoder_layout, find_linears
from .profiles import PROFILES, layer_ratios
from .resources import peak_rss_mb, release_memory, reset_peak_rss
from .stats import InputRecorder, statistic_factory

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    prune_seconds: float
    obs_loss: float | None = None
    #: the ratio this layer was asked for (the sparsity profile's; ``sparsity`` is what it got)
    ratio: float | None = None


@dataclass
class PruneReport:
    """What ``prune`` did. ``prune_seconds`` is the seed's pruning speed: mask-and-update time summed over
    layers, without the forward passes; ``wall_seconds`` includes everything."""

    settings: dict
    layers: list[LayerReport] = field(default_factory=list)
    wall_seconds: float = 0.0
    calibration_tokens: int = 0
    #: seconds of the sparsity profile's own walk (OWL's dense pass), part of ``wall_seconds``
    profile_seconds: float = 0.0
    #: peak resident memory during this call (Linux; elsewhere the process's peak so far), MiB
    peak_rss_mb: float = 0.0

    @property
    def prune_seconds(self) -> float:
        return sum(layer.prune_seconds for layer in self.layers)

    @property
    def actual_sparsity(self) -> float:
        """Zeros over all pruned matrices, weighted by their size."""
        return overall_sparsity((l.shape, l.sparsity) for l in self.layers)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "actual_sparsity": self.actual_sparsity,
            "prune_seconds": self.prune_seconds,
            "wall_seconds": self.wall_seconds,
            "calibration_tokens": self.calibration_tokens,
            "profile_seconds": self.profile_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "layers": [asdict(layer) for layer in self.layers],
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prune_linears(linears: dict[str, nn.Linear], settings: PruneSettings, ratios: dict[str, float],
                   recorder: InputRecorder | None, report: PruneReport, ranks: Ranks = SINGLE) -> None:
    # distributed hook: which rank prunes which layer (all of them here in one process, or for mask-only methods)
    owners = ranks.assign(linears, get_method(settings.method))
    done: dict[str, LayerReport] = {}
    with ranks.agreed("pruning a block"):
        for name, layer in linears.items():
            if owners[name] != ranks.rank:
                continue
            weight = layer.weight.data
            stat = recorder.stat(name) if recorder is not None else None
            ratio = ratios.get(name, settings.sparsity_ratio)
            layer_settings = settings if ratio == settings.sparsity_ratio else settings.replace(sparsity_ratio=ratio)
            _sync(weight.device)
            start = time.perf_counter()
            result = prune_layer(weight, stat, layer_settings, name)
            weight.copy_(result.weight.to(weight.dtype))
            _sync(weight.device)
            seconds = time.perf_counter() - start
            done[name] = LayerReport(name, tuple(weight.shape), zero_fraction(weight), seconds, result.obs_loss, ratio)
    # distributed hook: weights solved on another rank arrive here, with their reports
    done = ranks.share(linears, owners, done)
    report.layers.extend(done[name] for name in linears)


def needs_calibration(settings: PruneSettings) -> bool:
    """Whether ``prune`` needs calibration samples: the method's (or DSnoT's) statistics, or the profile's walk."""
    return bool(statistics_for(settings)) or PROFILES[settings.sparsity_profile].needs_calibration


def prune(model: nn.Module, calibration_ids: torch.Tensor | None, settings: PruneSettings,
          device: torch.device | str | None = None, progress: bool = True, batch_size: int | None = None,
          source: BlockSource | None = None, ranks: Ranks = SINGLE) -> PruneReport:
    """Prune every linear layer inside ``model``'s decoder blocks in place.

    ``calibration_ids``: (nsamples, seqlen) token ids; not needed for magnitude pruning.
    ``device``: where each block is processed (default: where block 0 lives).
    ``batch_size``: calibration windows per forward pass (default: 2 on a CPU, 8 on a GPU).
    ``source``: where the engine gets the blocks (default: ``model``'s own; ``wanda.engine.streaming`` streams
    them from disk and saves each pruned block).
    ``ranks``: under torchrun, ``wanda.distributed.init_ranks()``: every rank passes the same
    ``calibration_ids``, runs its share of them and ends with the same pruned weights.
    """
    get_method(settings.method)
    statistics = statistics_for(settings)
    progress = progress and ranks.is_main
    layout = find_decoder_layout(model)
    report = PruneReport(settings=settings.to_dict())
    release_memory()
    reset_peak_rss()
    start = time.perf_counter()
    calibrated = needs_calibration(settings)
    if calibrated:
        if calibration_ids is None or calibration_ids.numel() == 0:
            raise WandaError(f"--prune_method {settings.method} with --sparsity_profile {settings.sparsity_profile}"
                             f"{' --dsnot' if settings.dsnot else ''} needs calibration samples")
        check_seqlen(model, calibration_ids.shape[1])
        report.calibration_tokens = calibration_ids.numel()
    engine = LayerwiseEngine(model, device, batch_size, progress, layout, source)
    ratios = layer_ratios(model, layout, calibration_ids, settings, read_only(engine) if calibrated else None)
    report.profile_seconds = time.perf_counter() - start
    if not statistics:
        engine.walk(None, lambda index, block, inputs: _prune_linears(
            find_linears(block, layout.block_name(index)), settings, ratios, None, report, ranks))
    else:
        factory = statistic_factory(statistics)

        def visit(index: int, block: nn.Module, inputs: BlockInputs) -> None:
            linears = find_linears(block, layout.block_name(index))
            with ranks.agreed("calibrating a block"), InputRecorder(linears, factory) as recorder:
                for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
                    block(hidden, *args, **kwargs)
                    recorder.end_batch()
            ranks.reduce(recorder.stats)  # distributed hook: statistics summed over ranks before any mask
            _prune_linears(linears, settings, ratios, recorder, report, ranks)
            del recorder

        # distributed hook: each rank captures, and walks the blocks with, its own share of the windows
        engine.walk(ranks.local_windows(calibration_ids, engine.batch_size), visit)
    report.wall_seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    release_memory()  # the calibration activations
    log.info("pruned %d layers with %s: sparsity %.4f, %.1fs pruning, %.1fs wall", len(report.layers),
             settings.method, report.actual_sparsity, report.prune_seconds, report.wall_seconds)
    return report


def model_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros of every linear layer inside the decoder blocks."""
    layout = find_decoder_layout(model)
    out = {}
    for index, block in enumerate(layout.blocks):
        for name, layer in find_linears(block, layout.block_name(index)).items():
            out[name] = zero_fraction(layer.weight)
    return out
