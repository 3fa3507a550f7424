"""The method registry: each entry names the statistic it needs, its own settings class and a pure function that
prunes one matrix from (weight, statistic, ``LayerSettings``); ``prune_layer`` runs the chosen method on one
matrix and, with DSnoT's settings, DSnoT after it. Adding a method is one module (its function and settings)
plus one entry here: the settings class becomes part of ``PruneSettings``, so its flags appear on the command
line."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch

from ..errors import WandaError
from ..masks import lowest_k_mask, nm_mask, prune_count, row_mask_count, row_spread_mask, select_mask, variant_mask
from ..masks.pattern import SparsityPattern
from ..stats import ChannelSum, Gram, InputStatistic, SquaredNorm, part
from .admm import AdmmSettings, AlpsSettings, admm_grad, alps
from .dsnot import DsnotSettings, dsnot
from .layer import LayerSettings
from .obs import ObsSettings, Rounder, inverse_hessian_factor_dampened, obs_prune
from .result import LayerResult
from .ria import RiaSettings, ria_scores
from .scores import WandaSettings, magnitude_scores, wanda_scores

PruneFn = Callable[[torch.Tensor, "InputStatistic | None", LayerSettings], LayerResult]
#: (weight, statistic, the method's own settings) -> scores, the lower the earlier pruned.
ScoreFn = Callable[[torch.Tensor, "InputStatistic | None", Any], torch.Tensor]


def settings_from(cls: type, source: Any) -> Any:
    """An instance of the settings dataclass ``cls`` with its fields taken from ``source`` (``PruneSettings``,
    which holds every method's fields, or any object with them)."""
    return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class MethodSpec:
    name: str
    statistic: type[InputStatistic] | None
    fn: PruneFn
    doc: str
    #: True for the OBS methods: their result depends on a costly solve, so a distributed run gives each layer
    #: to one rank and broadcasts the new weight; a mask-only method is recomputed by every rank instead.
    updates_weights: bool = False
    #: The method's own settings (a frozen dataclass of ``setting`` fields), or None.
    settings: type | None = None
    #: For a method that is a score and a comparison group: the score alone, which other pruners (image
    #: classifiers, with a comparison group of their own) reuse.
    scores: ScoreFn | None = None
    #: True for the methods with a column loop that quantize inside it when ``LayerSettings.grid`` is set
    #: (SparseGPT and the OBS ablations, as the SparseGPT authors' code does with ``--wbits``).
    quantizes: bool = False

    def score(self, weight: torch.Tensor, stat: InputStatistic | None) -> torch.Tensor:
        """The method's scores of ``weight`` at its default settings (a method without ``scores`` has none)."""
        if self.scores is None:
            raise WandaError(f"{self.name} is not a score of one weight; choose from {', '.join(SCORE_METHODS)}")
        return self.scores(weight, stat, self.settings() if self.settings is not None else None)

    def layer(self, source: Any, ratio: float | None = None) -> LayerSettings:
        """This method's ``LayerSettings`` from ``source`` (``PruneSettings``): ``ratio`` if given, else the
        source's ``sparsity_ratio``; its pattern; its own parameters."""
        params = settings_from(self.settings, source) if self.settings is not None else None
        return LayerSettings(source.sparsity_ratio if ratio is None else ratio, source.pattern, params)

    def prune(self, weight: torch.Tensor, stat: InputStatistic | None, settings: Any) -> LayerResult:
        """The method on one matrix; ``settings``: its ``LayerSettings``, or ``PruneSettings`` to take them from."""
        layer = settings if isinstance(settings, LayerSettings) else self.layer(settings)
        return self.fn(weight, stat, layer)


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> LayerResult:
    return LayerResult(weight.masked_fill(mask, 0), mask)


def _none(weight: torch.Tensor, stat: InputStatistic | None, s: LayerSettings) -> LayerResult:
    return LayerResult(weight, torch.zeros_like(weight, dtype=torch.bool))


def _magnitude(weight: torch.Tensor, stat: InputStatistic | None, s: LayerSettings) -> LayerResult:
    return _masked(weight, select_mask(magnitude_scores(weight), s.ratio, s.pattern, "matrix"))


def _per_row(scores: torch.Tensor, s: LayerSettings) -> torch.Tensor:
    """Wanda's comparison group: each output row (each group of M), the matrix losing floor(ratio * numel)."""
    if s.pattern.is_nm:
        return nm_mask(scores, s.pattern.n, s.pattern.m)
    return row_spread_mask(scores, s.ratio)


def _wanda(weight: torch.Tensor, stat: InputStatistic | None, s: LayerSettings) -> LayerResult:
    scores = wanda_scores(weight, stat.squared_norm())
    if s.params is not None and s.params.use_variant:
        return _masked(weight, variant_mask(scores, s.ratio, s.params.variant_tolerance))
    return _masked(weight, _per_row(scores, s))


def _select_block(scores: torch.Tensor, s: LayerSettings, scope: str, start: int, width: int) -> torch.Tensor:
    """Unstructured: ``scope`` within the block of columns [start, start + width) of a matrix ``width`` wide;
    N:M: the group of M columns it is called on. The block prunes floor(ratio * weights up to its end) minus
    floor(ratio * weights before it), so the matrix as a whole loses floor(ratio * numel) whatever its blocks."""
    if s.pattern.is_nm:
        return nm_mask(scores, s.pattern.n, s.pattern.m)
    rows, stop = scores.shape[0], start + scores.shape[1]
    count = prune_count(s.ratio, rows * stop) - prune_count(s.ratio, rows * start)
    if scope == "row":
        return row_mask_count(scores, count)
    return lowest_k_mask(scores.reshape(1, -1), count).reshape(scores.shape)


def _obs(weight: torch.Tensor, stat: Gram, s: LayerSettings, select) -> LayerResult:
    # q/k/v (and gate/up) share one Gram, so its factorisation is computed once for all of them
    percdamp = s.params.percdamp
    key = ("inverse_factor", percdamp, weight.device)
    if key not in stat.derived:
        stat.derived[key] = inverse_hessian_factor_dampened(stat.hessian().to(weight.device), percdamp)
        stat.derived[("percdamp_used", percdamp)] = stat.derived[key][1]
    factor, used = stat.derived[key]
    rounder = Rounder(s.grid) if s.grid is not None else None
    new, mask, loss = obs_prune(
        weight, None, s.pattern, select, s.params.blocksize, percdamp, factor=factor, grid=rounder
    )
    return LayerResult(new, mask, loss, used, rounder.params if rounder is not None else None)


def _sparsegpt(weight: torch.Tensor, stat: InputStatistic | None, s: LayerSettings) -> LayerResult:
    # Adaptive mask selection: the OBS saliency w^2 / [H^-1]_jj^2 over the whole block of columns.
    return _obs(
        weight, stat, s, lambda w, d, start: _select_block(w.square() / d.square(), s, "matrix", start, weight.shape[1])
    )


def _seq(mask_of: Callable[[torch.Tensor, InputStatistic], torch.Tensor]) -> PruneFn:
    """Ablation ``*_seq``: the whole mask is fixed from the original weights, then OBS updates the rest."""

    def prune(weight: torch.Tensor, stat: InputStatistic | None, s: LayerSettings) -> LayerResult:
        fixed = mask_of(weight, stat, s)
        return _obs(weight, stat, s, lambda w, d, start: fixed[:, start : start + w.shape[1]])

    return prune


def _ablate_mag_iter(weight: torch.Tensor, stat: InputStatistic | None, s: LayerSettings) -> LayerResult:
    return _obs(
        weight, stat, s, lambda w, d, start: _select_block(magnitude_scores(w), s, "matrix", start, weight.shape[1])
    )


def _ablate_wanda_iter(weight: torch.Tensor, stat: InputStatistic | None, s: LayerSettings) -> LayerResult:
    norm = stat.squared_norm().to(weight.device)

    def select(w: torch.Tensor, d: torch.Tensor, start: int) -> torch.Tensor:
        return _select_block(wanda_scores(w, norm[start : start + w.shape[1]]), s, "row", start, weight.shape[1])

    return _obs(weight, stat, s, select)


def _ria(weight: torch.Tensor, stat: InputStatistic | None, s: LayerSettings) -> LayerResult:
    # one comparison over the whole matrix, as the paper (unstructured); within each group of M (N:M)
    return _masked(
        weight, select_mask(ria_scores(weight, stat.squared_norm(), s.params.ria_a), s.ratio, s.pattern, "matrix")
    )


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "magnitude",
            None,
            _magnitude,
            "|W|; one threshold per matrix (per group of M for N:M)",
            scores=lambda weight, stat, params: magnitude_scores(weight),
        ),
        MethodSpec(
            "wanda",
            SquaredNorm,
            _wanda,
            "|W| * ||X||_2 compared per output row (per group of M for N:M)",
            settings=WandaSettings,
            scores=lambda weight, stat, params: wanda_scores(weight, stat.squared_norm()),
        ),
        MethodSpec(
            "sparsegpt",
            Gram,
            _sparsegpt,
            "OBS reconstruction with adaptive per-block mask selection",
            True,
            ObsSettings,
            quantizes=True,
        ),
        MethodSpec(
            "ria",
            SquaredNorm,
            _ria,
            "RIA: relative importance times ||X||^0.5, compared per matrix (per group of M for N:M)",
            settings=RiaSettings,
            scores=lambda weight, stat, params: ria_scores(weight, stat.squared_norm(), params.ria_a),
        ),
        MethodSpec(
            "ablate_mag_seq",
            Gram,
            _seq(lambda w, st, s: select_mask(magnitude_scores(w), s.ratio, s.pattern, "matrix")),
            "magnitude mask fixed up front, then the OBS weight update",
            True,
            ObsSettings,
            quantizes=True,
        ),
        MethodSpec(
            "ablate_wanda_seq",
            Gram,
            _seq(lambda w, st, s: _per_row(wanda_scores(w, st.squared_norm()), s)),
            "Wanda mask fixed up front, then the OBS weight update",
            True,
            ObsSettings,
            quantizes=True,
        ),
        MethodSpec(
            "ablate_mag_iter",
            Gram,
            _ablate_mag_iter,
            "magnitude mask re-selected every block during OBS",
            True,
            ObsSettings,
            quantizes=True,
        ),
        MethodSpec(
            "ablate_wanda_iter",
            Gram,
            _ablate_wanda_iter,
            "Wanda mask re-selected every block during OBS",
            True,
            ObsSettings,
            quantizes=True,
        ),
        MethodSpec("none", None, _none, "prunes nothing: with --wbits, quantization alone (plain GPTQ)"),
        MethodSpec(
            "admm",
            Gram,
            admm_grad,
            "ADMM-Grad (Boza 2024): ADMM weight update with the Wanda mask tightened "
            "along a cubic schedule, then least squares on the support",
            True,
            AdmmSettings,
        ),
        MethodSpec(
            "alps",
            Gram,
            alps,
            "ALPS (Meng et al. 2024): ADMM on the l0-constrained reconstruction with a "
            "growing penalty, then preconditioned CG on the support",
            True,
            AlpsSettings,
        ),
    )
}


#: Methods that prune (every one but ``none``, which is quantization alone).
PRUNERS = tuple(name for name in METHOD_SPECS if name != "none")

#: Methods that are a score of each weight (``MethodSpec.scores``), in the registry's order.
SCORE_METHODS = tuple(name for name, spec in METHOD_SPECS.items() if spec.scores is not None)

#: Methods whose mask DSnoT can follow (it needs a mask with a per-row count, and the dense weights).
DSNOT_BASES = ("magnitude", "wanda", "ria", "sparsegpt")


def _most_derived(classes: list[type]) -> tuple[type, ...]:
    """The classes, in order and once each, without those that another of them derives from."""
    unique = list(dict.fromkeys(classes))
    return tuple(c for c in unique if not any(o is not c and issubclass(o, c) for o in unique))


#: Every method's own settings and DSnoT's, the bases ``PruneSettings`` is made of (so each is declared once).
METHOD_SETTINGS: tuple[type, ...] = _most_derived(
    [spec.settings for spec in METHOD_SPECS.values() if spec.settings is not None] + [DsnotSettings]
)


def statistics_for(method: str, dsnot_on: bool = False) -> tuple[type[InputStatistic], ...]:
    """The accumulators one layer needs for ``method`` (and DSnoT); empty when it needs no calibration."""
    spec = get_method(method)
    kinds = [spec.statistic] if spec.statistic is not None else []
    if dsnot_on:
        if not kinds:
            kinds.append(SquaredNorm)  # magnitude: DSnoT's pruning side still ranks by Wanda's score
        kinds.append(ChannelSum)
    return tuple(kinds)


def prune_layer(
    weight: torch.Tensor,
    stat: InputStatistic | None,
    method: str,
    layer: LayerSettings,
    after: DsnotSettings | None = None,
    layer_name: str = "",
) -> LayerResult:
    """Prune one matrix with ``method`` at ``layer``'s ratio and pattern, then DSnoT when ``after`` says so
    for this layer. ``layer.grid`` reaches only a method that quantizes in its own loop and is not followed by
    DSnoT; the result says whether it did (``LayerResult.quant_params``)."""
    spec = get_method(method)
    sums = part(stat, ChannelSum)
    follows = after is not None and after.applies(layer_name) and sums is not None  # None: read no token
    if follows or not spec.quantizes:
        layer = replace(layer, grid=None)  # DSnoT moves the mask: the engine quantizes its result instead
    result = spec.fn(weight, part(stat, spec.statistic) if spec.statistic else None, layer)
    if not follows:
        return result
    return _dsnot_after(weight, stat, sums, result, layer.pattern, after)


def _dsnot_after(
    weight: torch.Tensor,
    stat: InputStatistic,
    sums: ChannelSum,
    result: LayerResult,
    pattern: SparsityPattern,
    s: DsnotSettings,
) -> LayerResult:
    mean = sums.mean()
    norm = stat.squared_norm()
    variance = norm.to(mean.device) / max(sums.tokens, 1) - mean.square()
    new, mask = dsnot(
        weight,
        result.weight,
        result.mask,
        mean,
        variance,
        norm,
        (pattern.n, pattern.m) if pattern.is_nm else None,
        s.dsnot_max_cycles,
        s.dsnot_threshold,
        s.dsnot_var_power,
        s.dsnot_same_sign,
    )
    return LayerResult(new, mask, None, result.damping)  # the OBS loss of the starting mask no longer applies


def get_method(name: str) -> MethodSpec:
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise WandaError(f"unknown pruning method {name!r}; choose from {', '.join(METHOD_SPECS)}") from None
