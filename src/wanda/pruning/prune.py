"""Pruning a whole model: the engine walks the blocks, the chosen method prunes each weight matrix.

What is pruned is ``find_prunable``'s enumeration (linear layers and per-expert slices of fused expert
parameters); everything else in the blocks is reported as not pruned with its reason. A matrix that received
no calibration token (an expert the router never chose) is pruned by the no-token rule: the method run with
its statistic's ``neutral`` value, i.e. magnitude pruning in the method's own scope, and it is reported.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time

import torch
from torch import nn

from ..engine import BlockInputs, BlockSource, LayerwiseEngine, read_only
from ..errors import WandaError
from ..export.compressed_tensors import QuantizedMatrix
from ..masks import zero_fraction
from ..methods import LayerSettings, MethodSpec, get_method, prune_layer, statistics_for
from ..methods.obs import inverse_hessian_factor_dampened
from ..models import (
    BlockMatrices,
    DecoderLayout,
    NotPruned,
    PrunableMatrix,
    StructureOverride,
    check_seqlen,
    find_decoder_layout,
    find_prunable,
)
from ..models.matrices import UNOBSERVED
from ..parallel.ranks import SINGLE, Ranks
from ..quant.gptq import gptq_quantize
from ..quant.grid import Grid
from ..quant.settings import QuantSettings
from ..stats import Gram, InputRecorder, InputStatistic, part, statistic_factory
from ..utils.declare import require
from ..utils.resources import peak_rss_mb, release_memory, reset_peak_rss
from .profiles import PROFILES, layer_ratios
from .prune_settings import PruneSettings
from .report import NO_TOKEN_RULE, LayerReport, PruneReport

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _statistic(name: str, weight: torch.Tensor, spec: MethodSpec, recorder: InputRecorder | None):
    """(statistic, tokens, rule) for one matrix: the recorded one, or the method's neutral one when it read no
    token (DSnoT, which needs real activations, is then left out for that matrix)."""
    if recorder is None:
        return None, None, None
    stat = recorder.stat(name)
    if stat is not None and stat.tokens > 0:
        return stat, stat.tokens, None
    neutral = spec.statistic.neutral(weight.shape[1], weight.device) if spec.statistic is not None else None
    return neutral, 0, NO_TOKEN_RULE


def _quantize(
    weight: torch.Tensor, mask: torch.Tensor, stat: InputStatistic | None, grid: Grid, settings: PruneSettings
):
    """(weight on ``grid``, GPTQ loss, the groups' ``GroupParams``): mask-fixed GPTQ of an already pruned (and
    updated) weight on the layer's Gram, so every pruned weight (``mask``) stays exactly 0 and only kept weights
    absorb the rounding error. The dampened inverse factor is shared with the method (ADMM's, ALPS's) and
    between the layers reading one input (q/k/v)."""
    gram = part(stat, Gram)
    if gram is None:  # a matrix that read no token: H = I, i.e. round-to-nearest
        gram = Gram.neutral(weight.shape[1], weight.device)
    key = ("inverse_factor", settings.percdamp, weight.device)
    if key not in gram.derived:
        gram.derived[key] = inverse_hessian_factor_dampened(gram.hessian().to(weight.device), settings.percdamp)
    factor = gram.derived[key][0]
    return gptq_quantize(weight, None, grid, mask=mask, factor=factor, return_params=True)


def _prune_linears(
    linears: dict[str, PrunableMatrix],
    settings: PruneSettings,
    ratios: dict[str, float],
    recorder: InputRecorder | None,
    report: PruneReport,
    ranks: Ranks = SINGLE,
    layout: DecoderLayout | None = None,
    grid: Grid | None = None,
) -> None:
    spec = get_method(settings.method)

    @functools.lru_cache(maxsize=None)
    def layer_of(ratio: float) -> LayerSettings:  # one per distinct ratio
        return dataclasses.replace(settings.layer(ratio), grid=grid)

    # distributed hook: which rank prunes which layer (all of them here in one process, or for mask-only methods)
    owners = ranks.assign(linears, spec.updates_weights)
    done: dict[str, LayerReport] = {}
    with ranks.agreed("pruning a block"):
        for name, matrix in linears.items():
            if owners[name] != ranks.rank:
                continue
            view = matrix.weight  # (out, in), a view into the model (strided for transposed expert slices)
            weight = view if view.is_contiguous() else view.contiguous()
            stat, tokens, rule = _statistic(name, weight, spec, recorder)
            ratio = ratios.get(name, settings.sparsity_ratio)
            if layout is not None:  # --target_ratios over the profile's ratio
                ratio = layout.targets.ratio(name, ratio)
            _sync(weight.device)
            start = time.perf_counter()
            result = prune_layer(weight, stat, settings.method, layer_of(ratio), settings.dsnot_settings, name)
            new, quant_loss, params = result.weight, None, result.quant_params
            if params is not None:  # quantized in the method's own loop (SparseGPT, the OBS ablations)
                quant_loss = result.obs_loss
            elif grid is not None:  # --wbits: GPTQ on the fixed mask, after the method's mask and update
                stat_all = recorder.stat(name) if recorder else None
                new, quant_loss, params = _quantize(new, result.mask, stat_all, grid, settings)
            if params is not None:
                report.quantized[name] = QuantizedMatrix.of(matrix, params)
            view.copy_(new.to(view.dtype))
            _sync(weight.device)
            seconds = time.perf_counter() - start
            done[name] = LayerReport(
                name,
                tuple(view.shape),
                zero_fraction(view),
                seconds,
                result.obs_loss,
                ratio,
                tokens,
                rule,
                result.damping,
                quant_loss,
            )
    # distributed hook: weights solved on another rank arrive here, with their reports
    done = ranks.share(linears, owners, done)
    report.layers.extend(done[name] for name in linears)


def statistics_needed(settings: PruneSettings, quant: QuantSettings | None = None) -> tuple:
    """The accumulators of every layer: the method's (``statistics_for``), plus the Gram matrix GPTQ needs
    when quantizing (``--wbits``) after a method that reads none or only the squared norms."""
    kinds = statistics_for(settings.method, settings.dsnot)
    if quant is not None and quant.wbits is not None and Gram not in kinds:
        kinds = (*kinds, Gram)
    return kinds


def needs_calibration(settings: PruneSettings, quant: QuantSettings | None = None) -> bool:
    """Whether ``prune`` needs calibration samples: the method's (or DSnoT's) statistics, GPTQ's Gram, or the
    profile's walk."""
    return bool(statistics_needed(settings, quant)) or PROFILES[settings.sparsity_profile].needs_calibration


def check_quantization(settings: PruneSettings, quant: QuantSettings | None) -> None:
    """Refuse, before any work, the method and ``--wbits`` combinations that cannot run: ``none`` without
    quantization (it would do nothing), and for the methods that quantize inside their column loop, groups
    that a loop could not fit from up-to-date weights (see ``wanda.methods.obs``)."""
    quantized = quant is not None and quant.wbits is not None
    require(
        settings.method != "none" or quantized,
        "--prune_method none prunes nothing: it is quantization alone (plain GPTQ), so pass --wbits",
    )
    if not quantized or not get_method(settings.method).quantizes:
        return
    g, b, pattern = quant.grid().groupsize, settings.blocksize, settings.pattern
    require(
        g == -1 or g % b == 0 or b % g == 0,
        f"--prune_method {settings.method} quantizes inside its loop over blocks of --blocksize {b} columns, "
        f"fitting each group's scale when the loop reaches it: pass a --groupsize that divides {b} or is a "
        f"multiple of it (or -1), got {g}",
    )
    require(
        not pattern.is_nm or ((g == -1 or g % pattern.m == 0) and b % pattern.m == 0),
        f"--prune_method {settings.method} with {pattern} sparsity and --wbits needs --groupsize and --blocksize "
        f"that are multiples of {pattern.m}, got {g} and {b}",
    )


def _unobserved(found: BlockMatrices, recorder: InputRecorder) -> dict[str, PrunableMatrix]:
    """Moves fused experts whose per-expert inputs were not seen into ``not_pruned``; returns the rest."""
    lost = recorder.unobserved
    for name, matrix in list(found.prunable.items()):
        if id(matrix.module) in lost:
            found.not_pruned.append(NotPruned(name, matrix.shape, UNOBSERVED))
            del found.prunable[name]
    return found.prunable


def _check_targets(layout: DecoderLayout) -> None:
    """``--targets`` / ``--ignore`` that leave nothing to prune are a mistake, said before any work; a ratio
    pattern that matches no matrix is said in the log."""
    targets = layout.targets
    if not targets.restricts and not targets.ratios:
        return
    names = [name for i in range(len(layout.blocks)) for name in layout.matrices(i).prunable]
    if targets.restricts and not names:
        raise WandaError(
            f"--targets {' '.join(targets.targets or ['(all)'])} --ignore {' '.join(targets.ignore) or '(none)'} "
            f"leave no matrix to prune in {layout.path} (names look like {_first_name(layout)})"
        )
    for regex, ratio in targets.ratios:
        if not any(re.search(regex, name) for name in names):
            log.warning("--target_ratios %s=%g matches no pruned matrix", regex, ratio)


def _first_name(layout: DecoderLayout) -> str:
    """Block 0's first prunable matrix before any target filter: what a user's regular expressions see."""
    return next(iter(find_prunable(layout.blocks[0], layout.block_name(0), layout.include).prunable), "?")


def prune(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    settings: PruneSettings,
    device: torch.device | str | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    source: BlockSource | None = None,
    ranks: Ranks = SINGLE,
    structure: StructureOverride | None = None,
    *,
    quant: QuantSettings | None = None,
    report: PruneReport | None = None,
) -> PruneReport:
    """Prune every weight matrix inside ``model``'s decoder blocks in place (see ``find_prunable``).

    ``calibration_ids``: (nsamples, seqlen) token ids; not needed for magnitude pruning.
    ``device``: where each block is processed (default: where block 0 lives).
    ``batch_size``: calibration windows per forward pass (default: 2 on a CPU, 8 on a GPU).
    ``source``: where the engine gets the blocks (default: ``model``'s own; ``wanda.engine.streaming`` streams
    them from disk and saves each pruned block).
    ``ranks``: under torchrun, ``wanda.parallel.ranks.init_ranks()``: every rank passes the same
    ``calibration_ids``, runs its share of them and ends with the same pruned weights.
    ``structure``: which module list holds the blocks and which matrices to prune, for a model the generic
    discovery gets wrong.
    ``quant``: with ``wbits``, every pruned matrix is quantized as well, pruned weights staying exactly 0: inside
    the method's column loop for SparseGPT and the OBS ablations, else by mask-fixed GPTQ on its Gram matrix
    after the method (``check_quantization`` says which combinations are refused).
    ``report``: the report to extend (a streamed run passes its own, holding the blocks done before a resume,
    so that each block saved during the walk carries its layers' rows); by default a new one.
    """
    get_method(settings.method)
    check_quantization(settings, quant)
    statistics = statistics_needed(settings, quant)
    grid = quant.grid() if quant is not None else None
    progress = progress and ranks.is_main
    layout = find_decoder_layout(model, structure, settings.matrix_targets)
    _check_targets(layout)
    if report is None:
        report = PruneReport(settings=settings.to_dict() | ({"quant": quant.to_dict()} if grid is not None else {}))
    release_memory()
    reset_peak_rss()
    start = time.perf_counter()
    calibrated = needs_calibration(settings, quant)
    if calibrated:
        if calibration_ids is None or calibration_ids.numel() == 0:
            raise WandaError(
                f"--prune_method {settings.method} with --sparsity_profile {settings.sparsity_profile}"
                f"{' --dsnot' if settings.dsnot else ''}{' --wbits' if grid is not None else ''} needs calibration "
                "samples"
            )
        check_seqlen(model, calibration_ids.shape[1])
        report.calibration_tokens = calibration_ids.numel()
    engine = LayerwiseEngine(model, device, batch_size, progress, layout, source, ranks)
    ratios = layer_ratios(model, layout, calibration_ids, settings, read_only(engine) if calibrated else None)
    report.profile_seconds = time.perf_counter() - start
    if not statistics:

        def visit_without_statistics(index: int, block: nn.Module, inputs: BlockInputs | None) -> None:
            found = layout.matrices(index, block)
            report.not_pruned.extend(found.not_pruned)
            _prune_linears(found.prunable, settings, ratios, None, report, ranks, layout, grid)

        engine.walk(None, visit_without_statistics)
    else:
        factory = statistic_factory(statistics, settings.sink_weight)

        def visit(index: int, block: nn.Module, inputs: BlockInputs) -> None:
            found = layout.matrices(index, block)
            with ranks.agreed("calibrating a block"), InputRecorder(found.prunable, factory) as recorder:
                for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
                    block(hidden, *args, **kwargs)
                    recorder.end_batch()
            # distributed hook: statistics summed over ranks before any mask (the factory makes the ones this
            # rank lacks: an expert routed tokens on another rank only)
            engine.reduce(recorder.stats, recorder.factory)
            linears = _unobserved(found, recorder)
            report.not_pruned.extend(found.not_pruned)
            _prune_linears(linears, settings, ratios, recorder, report, ranks, layout, grid)
            del recorder

        engine.walk(calibration_ids, visit)  # under torchrun each rank walks its share of the windows
    report.wall_seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    release_memory()  # the calibration activations
    log.info(
        "pruned %d matrices with %s: sparsity %.4f over %s; %.1fs pruning, %.1fs wall",
        len(report.layers),
        settings.method,
        report.actual_sparsity,
        report.sparsity_over,
        report.prune_seconds,
        report.wall_seconds,
    )
    log.info("not pruned: %s", report.not_pruned_summary())
    without = [l.name for l in report.layers if l.rule is not None]
    if without:
        log.warning("%d matrices read no calibration token (%s, ...): %s", len(without), without[0], NO_TOKEN_RULE)
    return report


def model_sparsity(model: nn.Module, structure: StructureOverride | None = None) -> dict[str, float]:
    """Fraction of exact zeros of every prunable matrix inside the decoder blocks (``find_prunable``'s)."""
    layout: DecoderLayout = find_decoder_layout(model, structure)
    return {
        name: zero_fraction(matrix.weight)
        for index in range(len(layout.blocks))
        for name, matrix in layout.matrices(index).prunable.items()
    }
