"""The method registry: each entry names the statistic it needs and a pure function that prunes one matrix;
``prune_layer`` runs the chosen method on one matrix at its own ratio and, with ``dsnot``, DSnoT after it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import WandaError
from ..masks import lowest_k_mask, nm_mask, prune_count, row_mask_count, row_spread_mask, select_mask, variant_mask
from ..stats import ChannelSum, Gram, InputStatistic, SquaredNorm, part
from .admm import admm_grad, alps
from .dsnot import dsnot
from .obs import inverse_hessian_factor_dampened, obs_prune
from .result import LayerResult
from .ria import ria_scores
from .scores import magnitude_scores, wanda_scores

if TYPE_CHECKING:
    from ..pruning.prune_settings import PruneSettings


PruneFn = Callable[[torch.Tensor, "InputStatistic | None", "PruneSettings"], LayerResult]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    statistic: type[InputStatistic] | None
    prune: PruneFn
    doc: str
    #: True for the OBS methods: their result depends on a costly solve, so a distributed run gives each layer
    #: to one rank and broadcasts the new weight; a mask-only method is recomputed by every rank instead.
    updates_weights: bool = False


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> LayerResult:
    return LayerResult(weight.masked_fill(mask, 0), mask)


def _magnitude(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    return _masked(weight, select_mask(magnitude_scores(weight), s.sparsity_ratio, s.pattern, "matrix"))


def _per_row(scores: torch.Tensor, s: PruneSettings) -> torch.Tensor:
    """Wanda's comparison group: each output row (each group of M), the matrix losing floor(ratio * numel)."""
    if s.pattern.is_nm:
        return nm_mask(scores, s.pattern.n, s.pattern.m)
    return row_spread_mask(scores, s.sparsity_ratio)


def _wanda(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    scores = wanda_scores(weight, stat.squared_norm())
    if s.use_variant:
        return _masked(weight, variant_mask(scores, s.sparsity_ratio, s.variant_tolerance))
    return _masked(weight, _per_row(scores, s))


def _select_block(scores: torch.Tensor, s: PruneSettings, scope: str, start: int, width: int) -> torch.Tensor:
    """Unstructured: ``scope`` within the block of columns [start, start + width) of a matrix ``width`` wide;
    N:M: the group of M columns it is called on. The block prunes floor(ratio * weights up to its end) minus
    floor(ratio * weights before it), so the matrix as a whole loses floor(ratio * numel) whatever its blocks."""
    if s.pattern.is_nm:
        return nm_mask(scores, s.pattern.n, s.pattern.m)
    rows, stop = scores.shape[0], start + scores.shape[1]
    count = prune_count(s.sparsity_ratio, rows * stop) - prune_count(s.sparsity_ratio, rows * start)
    if scope == "row":
        return row_mask_count(scores, count)
    return lowest_k_mask(scores.reshape(1, -1), count).reshape(scores.shape)


def _obs(weight: torch.Tensor, stat: Gram, s: PruneSettings, select) -> LayerResult:
    # q/k/v (and gate/up) share one Gram, so its factorisation is computed once for all of them
    key = ("inverse_factor", s.percdamp, weight.device)
    if key not in stat.derived:
        stat.derived[key] = inverse_hessian_factor_dampened(stat.hessian().to(weight.device), s.percdamp)
        stat.derived[("percdamp_used", s.percdamp)] = stat.derived[key][1]
    factor, used = stat.derived[key]
    new, mask, loss = obs_prune(weight, None, s.pattern, select, s.blocksize, s.percdamp, factor=factor)
    return LayerResult(new, mask, loss, used)


def _sparsegpt(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    # Adaptive mask selection: the OBS saliency w^2 / [H^-1]_jj^2 over the whole block of columns.
    return _obs(
        weight, stat, s, lambda w, d, start: _select_block(w.square() / d.square(), s, "matrix", start, weight.shape[1])
    )


def _seq(mask_of: Callable[[torch.Tensor, InputStatistic], torch.Tensor]) -> PruneFn:
    """Ablation ``*_seq``: the whole mask is fixed from the original weights, then OBS updates the rest."""

    def prune(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
        fixed = mask_of(weight, stat, s)
        return _obs(weight, stat, s, lambda w, d, start: fixed[:, start : start + w.shape[1]])

    return prune


def _ablate_mag_iter(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    return _obs(
        weight, stat, s, lambda w, d, start: _select_block(magnitude_scores(w), s, "matrix", start, weight.shape[1])
    )


def _ablate_wanda_iter(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    norm = stat.squared_norm().to(weight.device)

    def select(w: torch.Tensor, d: torch.Tensor, start: int) -> torch.Tensor:
        return _select_block(wanda_scores(w, norm[start : start + w.shape[1]]), s, "row", start, weight.shape[1])

    return _obs(weight, stat, s, select)


def _ria(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    # one comparison over the whole matrix, as the paper (unstructured); within each group of M (N:M)
    return _masked(
        weight, select_mask(ria_scores(weight, stat.squared_norm(), s.ria_a), s.sparsity_ratio, s.pattern, "matrix")
    )


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("magnitude", None, _magnitude, "|W|; one threshold per matrix (per group of M for N:M)"),
        MethodSpec("wanda", SquaredNorm, _wanda, "|W| * ||X||_2 compared per output row (per group of M for N:M)"),
        MethodSpec("sparsegpt", Gram, _sparsegpt, "OBS reconstruction with adaptive per-block mask selection", True),
        MethodSpec(
            "ria",
            SquaredNorm,
            _ria,
            "RIA: relative importance times ||X||^0.5, compared per matrix (per group of M for N:M)",
        ),
        MethodSpec(
            "ablate_mag_seq",
            Gram,
            _seq(lambda w, st, s: select_mask(magnitude_scores(w), s.sparsity_ratio, s.pattern, "matrix")),
            "magnitude mask fixed up front, then the OBS weight update",
            True,
        ),
        MethodSpec(
            "ablate_wanda_seq",
            Gram,
            _seq(lambda w, st, s: _per_row(wanda_scores(w, st.squared_norm()), s)),
            "Wanda mask fixed up front, then the OBS weight update",
            True,
        ),
        MethodSpec(
            "ablate_mag_iter", Gram, _ablate_mag_iter, "magnitude mask re-selected every block during OBS", True
        ),
        MethodSpec(
            "ablate_wanda_iter", Gram, _ablate_wanda_iter, "Wanda mask re-selected every block during OBS", True
        ),
        MethodSpec(
            "admm",
            Gram,
            admm_grad,
            "ADMM-Grad (Boza 2024): ADMM weight update with the Wanda mask tightened "
            "along a cubic schedule, then least squares on the support",
            True,
        ),
        MethodSpec(
            "alps",
            Gram,
            alps,
            "ALPS (Meng et al. 2024): ADMM on the l0-constrained reconstruction with a "
            "growing penalty, then preconditioned CG on the support",
            True,
        ),
    )
}


#: Methods whose mask DSnoT can follow (it needs a mask with a per-row count, and the dense weights).
DSNOT_BASES = ("magnitude", "wanda", "ria", "sparsegpt")


def statistics_for(settings: PruneSettings) -> tuple[type[InputStatistic], ...]:
    """The accumulators one layer needs under ``settings``; empty when it needs no calibration at all."""
    spec = get_method(settings.method)
    kinds = [spec.statistic] if spec.statistic is not None else []
    if settings.dsnot:
        if not kinds:
            kinds.append(SquaredNorm)  # magnitude: DSnoT's pruning side still ranks by Wanda's score
        kinds.append(ChannelSum)
    return tuple(kinds)


def dsnot_applies(settings: PruneSettings, layer_name: str) -> bool:
    """DSnoT on this layer: ``--dsnot`` and the layer not under the skipped part (``--dsnot_skip``)."""
    return settings.dsnot and (settings.dsnot_skip == "none" or settings.dsnot_skip not in layer_name.split("."))


def prune_layer(
    weight: torch.Tensor, stat: InputStatistic | None, settings: PruneSettings, layer_name: str = ""
) -> LayerResult:
    """Prune one matrix with ``settings`` (its own ratio already in ``settings.sparsity_ratio``), then DSnoT."""
    spec = get_method(settings.method)
    result = spec.prune(weight, part(stat, spec.statistic) if spec.statistic else None, settings)
    sums = part(stat, ChannelSum)
    if not dsnot_applies(settings, layer_name) or sums is None:  # None: a matrix that read no token
        return result
    mean = sums.mean()
    norm = stat.squared_norm()
    variance = norm.to(mean.device) / max(sums.tokens, 1) - mean.square()
    pattern = settings.pattern
    new, mask = dsnot(
        weight,
        result.weight,
        result.mask,
        mean,
        variance,
        norm,
        (pattern.n, pattern.m) if pattern.is_nm else None,
        settings.dsnot_max_cycles,
        settings.dsnot_threshold,
        settings.dsnot_var_power,
        settings.dsnot_same_sign,
    )
    return LayerResult(new, mask, None, result.damping)  # the OBS loss of the starting mask no longer applies


def get_method(name: str) -> MethodSpec:
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise WandaError(f"unknown pruning method {name!r}; choose from {', '.join(METHOD_SPECS)}") from None
