"""The method registry: each entry names the statistic it needs and a pure function that prunes one matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import WandaError
from ..masks import nm_mask, row_mask, select_mask, variant_mask
from ..stats import Gram, InputStatistic, SquaredNorm
from .obs import inverse_hessian_factor, obs_prune
from .scores import magnitude_scores, wanda_scores

if TYPE_CHECKING:
    from ..config import PruneSettings


@dataclass
class LayerResult:
    """What pruning one matrix produced: the new weight (zeros at ``mask``) and, for OBS, its predicted loss."""

    weight: torch.Tensor
    mask: torch.Tensor
    obs_loss: float | None = None


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


def _wanda(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    scores = wanda_scores(weight, stat.squared_norm())
    if s.use_variant:
        return _masked(weight, variant_mask(scores, s.sparsity_ratio, s.variant_tolerance))
    return _masked(weight, select_mask(scores, s.sparsity_ratio, s.pattern, "row"))


def _select_block(scores: torch.Tensor, s: PruneSettings, scope: str) -> torch.Tensor:
    """Unstructured: ``scope`` within the block; N:M: the group of M columns it is called on."""
    if s.pattern.is_nm:
        return nm_mask(scores, s.pattern.n, s.pattern.m)
    return select_mask(scores, s.sparsity_ratio, s.pattern, scope)


def _obs(weight: torch.Tensor, stat: Gram, s: PruneSettings, select) -> LayerResult:
    # q/k/v (and gate/up) share one Gram, so its factorisation is computed once for all of them
    key = ("inverse_factor", s.percdamp, weight.device)
    if key not in stat.derived:
        stat.derived[key] = inverse_hessian_factor(stat.hessian().to(weight.device), s.percdamp)
    new, mask, loss = obs_prune(weight, None, s.pattern, select, s.blocksize, s.percdamp,
                                factor=stat.derived[key])
    return LayerResult(new, mask, loss)


def _sparsegpt(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    # Adaptive mask selection: the OBS saliency w^2 / [H^-1]_jj^2 over the whole block of columns.
    return _obs(weight, stat, s, lambda w, d, start: _select_block(w.square() / d.square(), s, "matrix"))


def _seq(mask_of: Callable[[torch.Tensor, InputStatistic], torch.Tensor]) -> PruneFn:
    """Ablation ``*_seq``: the whole mask is fixed from the original weights, then OBS updates the rest."""

    def prune(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
        fixed = mask_of(weight, stat, s)
        return _obs(weight, stat, s, lambda w, d, start: fixed[:, start : start + w.shape[1]])

    return prune


def _ablate_mag_iter(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    return _obs(weight, stat, s, lambda w, d, start: _select_block(magnitude_scores(w), s, "matrix"))


def _ablate_wanda_iter(weight: torch.Tensor, stat: InputStatistic | None, s: PruneSettings) -> LayerResult:
    norm = stat.squared_norm().to(weight.device)

    def select(w: torch.Tensor, d: torch.Tensor, start: int) -> torch.Tensor:
        return _select_block(wanda_scores(w, norm[start : start + w.shape[1]]), s, "row")

    return _obs(weight, stat, s, select)


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("magnitude", None, _magnitude, "|W|; one threshold per matrix (per group of M for N:M)"),
        MethodSpec("wanda", SquaredNorm, _wanda, "|W| * ||X||_2 compared per output row (per group of M for N:M)"),
        MethodSpec("sparsegpt", Gram, _sparsegpt, "OBS reconstruction with adaptive per-block mask selection", True),
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
            _seq(lambda w, st, s: select_mask(wanda_scores(w, st.squared_norm()), s.sparsity_ratio, s.pattern, "row")),
            "Wanda mask fixed up front, then the OBS weight update",
            True,
        ),
        MethodSpec("ablate_mag_iter", Gram, _ablate_mag_iter, "magnitude mask re-selected every block during OBS",
                   True),
        MethodSpec("ablate_wanda_iter", Gram, _ablate_wanda_iter, "Wanda mask re-selected every block during OBS",
                   True),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise WandaError(f"unknown pruning method {name!r}; choose from {', '.join(METHOD_SPECS)}") from None
