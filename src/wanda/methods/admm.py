"""Pruning by ADMM on the layer-wise reconstruction problem: ADMM-Grad and ALPS.

Both minimise, for a layer W (rows x cols) with input Gram H = X^T X, the output error
    ||X W^T - X What^T||_F^2 = tr((What - W) H (What - W)^T)   subject to What being zero at a sparse mask,
each row an independent quadratic in the same H. They work in the coordinates where diag(H) = 1
(W_ij -> W_ij sqrt(H_jj), H -> D^-1/2 H D^-1/2): there the magnitude of a weight is its Wanda score
|W_ij| ||X_j|| (||X_j||^2 = H_jj, up to the dampening added to it), the penalty rho is relative to the mean
diagonal (which is 1), and the diagonal (Jacobi) preconditioner of the final conjugate gradients is built
in. H is the dampened Hessian of ``dampened_cholesky`` (dead inputs set to 1, percdamp of the mean diagonal
added, escalated if singular).

- ADMM-Grad (Boza, "Fast and Effective Weight Update for Pruned Large Language Models", TMLR 2024): ADMM on
  min_W ||X W0^T - X W^T||^2 + indicator(Z zero at the mask), W = Z, with scaled dual U:
      W <- (W0 H + rho (Z - U)) (H + rho I)^-1,   Z <- (W + U) zeroed at the mask,   U <- U + W - Z,
  one Cholesky factorisation of H + rho I for every iteration. The mask is re-chosen from the Wanda score of
  W + U during the first ``admm_ramp_iterations`` iterations, the sparsity rising along the cubic schedule
  s_k = s (1 - (1 - k / K)^3), k = 1..K (K = 15 of 20 iterations, rho = 1 on the unit-diagonal Gram, as
  the paper), and is fixed after it.
- ALPS (Meng et al., "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language
  Models", NeurIPS 2024): ADMM on the l0-constrained problem with dual V,
      W <- (H + rho I)^-1 (H W0 - V + rho D),   D <- P_k(W + V / rho),   V <- V + rho (W - D),
  P_k keeping the largest entries (all but the whole matrix's floor(ratio numel) smallest, or M - N of every
  M), rho = 0.1 at first. Every ``ALPS_CHECK_EVERY`` iterations, with c the fraction of the support (relative
  to its size) that changed since the last check: rho *= 1.3 if c > 10%, 1.2 if c > 0.5%, else 1.1, and the
  iterations stop once rho has grown and the support no longer changes (or, after ``ALPS_SETTLE_ITERATIONS``,
  changes by less than ``ALPS_SETTLED_CHANGE``); a support changing by at most 0.5% before rho ever grew
  means rho was too large to let it move: rho /= 5 and the iterations restart from W0's projection. With
  H = Q diag(lam) Q^T factorised once, (H + rho I)^-1 = Q diag(1 / (lam + rho)) Q^T for every rho.

Both end with the least-squares weights on the final support, H_SS w_S = (H w0)_S for every row, by
preconditioned conjugate gradients (``support_least_squares``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import WandaError
from ..masks import lowest_k_mask, nm_mask, prune_count, row_spread_mask
from ..masks.pattern import SparsityPattern
from ..stats import Gram
from ..utils.declare import require, setting
from .obs import DampingSettings, dampened_cholesky
from .result import LayerResult

if TYPE_CHECKING:
    from .layer import LayerSettings

#: ALPS: iterations between two updates of rho (and two checks of the support).
ALPS_CHECK_EVERY = 3
#: ALPS: the largest rho (relative to the unit diagonal); past it the W-update no longer moves.
ALPS_MAX_RHO = 1e6
#: ALPS: the smallest rho the restarts go down to before the support counts as settled.
ALPS_MIN_RHO = 1e-6
#: ALPS: after this many iterations, a support changing by less than this fraction of its size counts as settled.
ALPS_SETTLE_ITERATIONS = 30
ALPS_SETTLED_CHANGE = 3e-4


def _check_penalty(settings: object, rho: str, *counts: str) -> None:
    """A penalty is a positive finite number and an iteration count at least 1 (one line naming the flag)."""
    value = getattr(settings, rho)
    require(0 < value < math.inf, f"--{rho} must be a positive number, got {value}")
    for name in counts:
        require(getattr(settings, name) >= 1, f"--{name} must be at least 1, got {getattr(settings, name)}")


@dataclass(frozen=True)
class SupportSettings(DampingSettings):
    """What ADMM-Grad and ALPS share: the final least-squares update on the support."""

    #: Conjugate-gradient iterations of the final least-squares update on the support (ADMM-Grad and ALPS).
    support_cg_iterations: int = setting(
        50,
        "ADMM-Grad and ALPS: preconditioned conjugate-gradient iterations "
        "of the final least-squares update on the support",
    )

    def __post_init__(self) -> None:
        DampingSettings.__post_init__(self)
        require(
            self.support_cg_iterations >= 0,
            f"--support_cg_iterations must be non-negative, got {self.support_cg_iterations}",
        )


@dataclass(frozen=True)
class AdmmSettings(SupportSettings):
    #: ADMM-Grad's penalty rho, relative to the mean diagonal of X^T X (Boza 2024 uses rho = 1 on the
    #: unit-diagonal Gram).
    admm_rho: float = setting(
        1.0,
        "ADMM-Grad (Boza 2024): penalty rho, relative to the mean diagonal of X^T X "
        "(the paper's rho = 1 on X^T X scaled to a unit diagonal)",
    )
    #: ADMM-Grad's iterations in all, and those over which the mask is tightened (Boza 2024: 20 and 15).
    admm_iterations: int = setting(20, "ADMM-Grad (Boza 2024): ADMM iterations in all")
    admm_ramp_iterations: int = setting(
        15,
        "ADMM-Grad (Boza 2024): the first iterations, over which the sparsity "
        "rises to the target along s (1 - (1 - k/K)^3) (the mask is fixed after)",
    )

    def __post_init__(self) -> None:
        SupportSettings.__post_init__(self)
        _check_penalty(self, "admm_rho", "admm_iterations", "admm_ramp_iterations")


@dataclass(frozen=True)
class AlpsSettings(SupportSettings):
    #: ALPS's initial penalty (relative to the mean diagonal) and its iteration cap (Meng et al. 2024).
    alps_rho: float = setting(
        0.1,
        "ALPS (Meng et al. 2024): initial penalty rho, relative to the mean diagonal "
        "of X^T X (scaled to a unit diagonal); it grows while the support changes",
    )
    alps_iterations: int = setting(
        300,
        "ALPS (Meng et al. 2024): at most this many ADMM iterations (it stops "
        "earlier once the support no longer changes)",
    )

    def __post_init__(self) -> None:
        SupportSettings.__post_init__(self)
        _check_penalty(self, "alps_rho", "alps_iterations")


def _normalised(stat: Gram, percdamp: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H scaled to unit diagonal, sqrt of the dampened diag(H), dampening used), computed once per Gram
    (q/k/v and gate/up share theirs) and kept in ``stat.derived``."""
    key = ("unit_hessian", percdamp, device)
    if key not in stat.derived:
        damped = dampened_cholesky(stat.hessian().to(device).float(), percdamp)
        scale = damped.hessian.diagonal().sqrt()
        unit = damped.hessian / scale.unsqueeze(1) / scale.unsqueeze(0)
        unit.diagonal().fill_(1.0)
        stat.derived[key] = (unit, scale, damped.percdamp)
        stat.derived[("percdamp_used", percdamp)] = damped.percdamp
    return stat.derived[key]


def _check_nm(weight: torch.Tensor, pattern: SparsityPattern) -> None:
    if pattern.is_nm and weight.shape[1] % pattern.m:
        raise WandaError(
            f"N:M sparsity {pattern} needs in_features divisible by {pattern.m}, but a layer has {weight.shape[1]}"
        )


def support_least_squares(
    start: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, iterations: int
) -> torch.Tensor:
    """Preconditioned conjugate gradients, row by row, on H_SS w_S = b_S with S each row's kept entries
    (``~mask``), b = ``target`` (W0 H for the least-squares reconstruction of W0), starting from ``start`` and
    with the diagonal of H as preconditioner; the result is exactly zero at ``mask``. Each row converges to the
    least-squares weights of its support in at most |S| iterations (in exact arithmetic)."""
    keep = (~mask).to(start.dtype)
    inv_diag = 1.0 / hessian.diagonal()
    x = start * keep
    r = keep * (target - x @ hessian)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(iterations):
        Ap = keep * (p @ hessian)
        pAp = (p * Ap).sum(1, keepdim=True)
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(torch.finfo(pAp.dtype).tiny), 0.0)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, Ap, value=-1)
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(rz.dtype).tiny), 0.0)
        p = z + beta * p
        rz = rz_new
    return x.masked_fill(mask, 0.0)


def _finish(
    unit_weight: torch.Tensor,
    target: torch.Tensor,
    unit: torch.Tensor,
    scale: torch.Tensor,
    mask: torch.Tensor,
    layer: LayerSettings,
):
    new = support_least_squares(unit_weight, target, unit, mask, layer.params.support_cg_iterations) / scale
    return LayerResult(new.masked_fill(mask, 0.0), mask)


def _admm_mask(scores: torch.Tensor, ratio: float, pattern: SparsityPattern) -> torch.Tensor:
    """The Wanda-score mask at ``ratio``: per output row (unstructured); for N:M, the floor(ratio * numel)
    lowest of the weights that the N:M pattern would prune, so that at ratio N/M it is the N:M mask."""
    if not pattern.is_nm:
        return row_spread_mask(scores, ratio)
    candidates = nm_mask(scores, pattern.n, pattern.m)
    count = prune_count(ratio, scores.numel())
    if count >= int(candidates.sum().item()):
        return candidates
    flat = scores.masked_fill(~candidates, float("inf")).reshape(1, -1)
    return lowest_k_mask(flat, count).reshape(scores.shape)


def admm_grad(weight: torch.Tensor, stat: Gram, layer: LayerSettings):
    """ADMM-Grad (Boza, TMLR 2024): see the module docstring. The mask is the Wanda score's, compared per output
    row (unstructured; the matrix loses floor(ratio * numel) weights) or within every group of M (N:M, where
    the schedule prunes the lowest of the weights the N:M pattern would prune, all of them at its end)."""
    _check_nm(weight, layer.pattern)
    unit, scale, used = _normalised(stat, layer.params.percdamp, weight.device)
    key = ("admm_factor", layer.params.percdamp, layer.params.admm_rho, weight.device)
    rho = layer.params.admm_rho  # relative to the mean diagonal of the unit-diagonal H, which is 1
    if key not in stat.derived:
        shifted = unit.clone()
        shifted.diagonal().add_(rho)
        stat.derived[key] = torch.linalg.cholesky(shifted)
    factor = stat.derived[key]
    w0 = weight.detach().float() * scale
    target = w0 @ unit  # W0 H
    z, u = w0.clone(), torch.zeros_like(w0)
    ramp = min(layer.params.admm_ramp_iterations, layer.params.admm_iterations)
    mask = _admm_mask(w0.abs(), layer.ratio, layer.pattern)
    for k in range(1, layer.params.admm_iterations + 1):
        w = torch.cholesky_solve((target + rho * (z - u)).T, factor).T
        if k <= ramp:
            ratio = layer.ratio * (1 - (1 - k / ramp) ** 3)
            mask = _admm_mask((w + u).abs(), ratio if k < ramp else layer.ratio, layer.pattern)
        z = (w + u).masked_fill(mask, 0.0)
        u += w - z
    result = _finish(z, target, unit, scale, mask, layer)
    result.damping = used
    return result


def _alps_project(v: torch.Tensor, layer: LayerSettings) -> torch.Tensor:
    if layer.pattern.is_nm:
        return nm_mask(v.abs(), layer.pattern.n, layer.pattern.m)
    flat = v.abs().reshape(1, -1)
    return lowest_k_mask(flat, prune_count(layer.ratio, flat.shape[-1])).reshape(v.shape)


def alps(weight: torch.Tensor, stat: Gram, layer: LayerSettings):
    """ALPS (Meng et al., NeurIPS 2024): see the module docstring. The support is compared over the whole
    matrix (floor(ratio * numel) pruned) for unstructured sparsity, within every group of M for N:M."""
    _check_nm(weight, layer.pattern)
    unit, scale, used = _normalised(stat, layer.params.percdamp, weight.device)
    key = ("eigh", layer.params.percdamp, weight.device)
    if key not in stat.derived:
        stat.derived[key] = torch.linalg.eigh(unit)
    lam, Q = stat.derived[key]
    w0 = weight.detach().float() * scale
    target = w0 @ unit  # W0 H
    rho = layer.params.alps_rho
    mask = _alps_project(w0, layer)
    start = w0.masked_fill(mask, 0.0)
    d, v = start.clone(), torch.zeros_like(w0)
    checked, grown = mask, False
    kept = max(int((~mask).sum().item()), 1)
    for it in range(1, layer.params.alps_iterations + 1):
        w = ((target - v + rho * d) @ Q / (lam + rho)) @ Q.T
        mask = _alps_project(w + v / rho, layer)
        d = (w + v / rho).masked_fill(mask, 0.0)
        v += rho * (w - d)
        if it % ALPS_CHECK_EVERY:
            continue
        changed = int((mask != checked).sum().item()) / kept
        checked = mask
        if changed > 0.005:
            rho, grown = rho * (1.3 if changed > 0.1 else 1.2), True
        elif grown:
            if changed == 0:
                break  # the support no longer changes
            rho *= 1.1
        else:  # the support barely moved before rho ever grew: rho started too large, so start again with less
            if rho / 5 < ALPS_MIN_RHO:
                break  # the support does not move at any penalty (H = I, for one)
            rho /= 5
            d, v = start.clone(), torch.zeros_like(w0)
        rho = min(rho, ALPS_MAX_RHO)
        if it >= ALPS_SETTLE_ITERATIONS and changed < ALPS_SETTLED_CHANGE:
            break
    result = _finish(d, target, unit, scale, mask, layer)
    result.damping = used
    return result
