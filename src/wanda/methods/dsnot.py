"""DSnoT, dynamic sparse no training (Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for
Sparse LLMs", ICLR 2024), the pure math of it: swap pruned and kept weights inside each row (inside each group
of M for N:M) so that the expected reconstruction error of the row's output shrinks.

For row i with dense weights W, current sparse weights W^ and the per-input mean mu_j = E[x_j], the expected
error of the output is e_i = sum_j (W_ij - W^_ij) mu_j (with an unchanged kept weight W^ = W it is
the sum over the pruned weights of W_ij mu_j). Each cycle, in every row still active:

- regrow the pruned weight that moves e_i most towards zero relative to its input's variance: the largest
  W_ij mu_j / Var(x_j)^p when e_i > 0, the smallest when e_i < 0 (p = 1);
- prune a kept weight in return: unstructured, the one with the lowest Wanda score |W^_ij| ||X_j||_2 among
  those whose W^_ij mu_j has the opposite sign to e_i; N:M, the lowest Wanda score in the regrown
  weight's group of M (so every group keeps its count);
- a row stops for good once |e_i| <= epsilon (0.1), once it runs out of candidates, with ``same_sign`` once a
  swap would flip the sign of e_i, and after T = 50 cycles (the reference code's ``--update_threshold``,
  ``--max_cycle_time``; its default ``--without_same_sign`` drops the sign rule for unstructured sparsity and
  its N:M branch always applies it, as here).

Regrown weights take their dense value, so DSnoT follows a method that updates the kept weights too
(SparseGPT): its error is measured against the dense layer from the start. Differences from the reference
code, each for correctness: the variance is that of all calibration tokens (the reference averages per-batch
variances), and the candidate lists hold only pruned (regrow) or kept (prune) weights, so a pointer never
"regrows" a weight that is already kept. The pruning side ranks by Wanda's score whatever the starting method
(the reference does so for unstructured sparsity and uses the method's own score for N:M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..utils.declare import require, setting

#: The paper's code defaults.
DEFAULT_MAX_CYCLES = 50
DEFAULT_THRESHOLD = 0.1
DEFAULT_VAR_POWER = 1.0
SKIPPABLE = ("none", "mlp", "self_attn")


@dataclass(frozen=True)
class DsnotSettings:
    """DSnoT after the method: whether, its stopping rules, and which part of each block it leaves alone."""

    dsnot: bool = setting(
        False,
        "after the method, DSnoT: swap pruned and kept weights within each row (each "
        "group of M) to shrink the expected output error; follows magnitude, wanda, ria, sparsegpt",
    )
    #: DSnoT's T: at most this many swaps per row.
    dsnot_max_cycles: int = setting(DEFAULT_MAX_CYCLES, "DSnoT: at most this many swap cycles per row")
    #: DSnoT's epsilon: a row stops once its expected error is this small.
    dsnot_threshold: float = setting(DEFAULT_THRESHOLD, "DSnoT: a row stops once |expected error| <= this")
    #: DSnoT's power of the input variance in the regrowing criterion.
    dsnot_var_power: float = setting(DEFAULT_VAR_POWER, "DSnoT: power of Var(x_j) dividing the regrowing score")
    dsnot_same_sign: bool = setting(
        False, "DSnoT (unstructured): also stop a row when a swap would flip the sign of its error (N:M always does)"
    )
    #: The reference code leaves the MLP alone by default (``--skip_layer mlp``).
    dsnot_skip: str = setting(
        "mlp", "DSnoT leaves the layers under this part of a block as the method left them", choices=SKIPPABLE
    )

    def __post_init__(self) -> None:
        require(self.dsnot_max_cycles >= 1, f"--dsnot_max_cycles must be at least 1, got {self.dsnot_max_cycles}")
        require(
            0 <= self.dsnot_threshold < math.inf,
            f"--dsnot_threshold must be a non-negative number, got {self.dsnot_threshold}",
        )
        require(
            0 <= self.dsnot_var_power < math.inf,
            f"--dsnot_var_power must be a non-negative number, got {self.dsnot_var_power}",
        )
        require(self.dsnot_skip in SKIPPABLE, f"--dsnot_skip must be none, mlp or self_attn; got {self.dsnot_skip!r}")

    def applies(self, layer_name: str) -> bool:
        """DSnoT on this layer: ``--dsnot`` and the layer not under the skipped part (``--dsnot_skip``)."""
        return self.dsnot and (self.dsnot_skip == "none" or self.dsnot_skip not in layer_name.split("."))


def _regrow_candidates(grow_key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(2, rows, cols) column orders over the pruned weights: most negative key first (list 0, for e < 0) and
    most positive first (list 1, for e > 0); kept weights sort to the end of both."""
    inf = float("inf")
    return torch.stack(
        [
            grow_key.masked_fill(~mask, inf).sort(dim=1, stable=True).indices,
            grow_key.masked_fill(~mask, -inf).sort(dim=1, descending=True, stable=True).indices,
        ]
    )


def _prune_candidates(
    wanda: torch.Tensor, effect: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unstructured: (2, rows, cols) orders by Wanda score over the kept weights whose pruning lowers (list 0)
    or raises (list 1) the error, and (2, rows) how many each list holds."""
    inf = float("inf")
    lowers, raises = ~mask & (effect < 0), ~mask & (effect > 0)
    lists = torch.stack(
        [
            wanda.masked_fill(~lowers, inf).sort(dim=1, stable=True).indices,
            wanda.masked_fill(~raises, inf).sort(dim=1, stable=True).indices,
        ]
    )
    return lists, torch.stack([lowers.sum(dim=1), raises.sum(dim=1)])


def _prune_in_group(
    wanda: torch.Tensor, mask: torch.Tensor, grow: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M: per row, the kept weight with the lowest Wanda score in the regrown weight's group of M, and
    whether there is one."""
    offsets = torch.arange(m, device=wanda.device)
    group = (grow - grow % m).unsqueeze(1) + offsets  # (rows, m) columns of the regrown weight's group
    scores = wanda.gather(1, group).masked_fill(mask.gather(1, group), float("inf"))
    best, where = scores.min(dim=1)
    return group.gather(1, where.unsqueeze(1)).squeeze(1), torch.isfinite(best)


def _take(
    lists: torch.Tensor, count: torch.Tensor, ptr: torch.Tensor, side: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the next column of list ``side`` and whether the list still had one; advances the pointers."""
    at = ptr[side, index]
    pick = lists[side, index, at.clamp(max=lists.shape[-1] - 1)]
    ptr[side, index] += 1
    return pick, at < count[side, index]


def _swap(
    W: torch.Tensor,
    W_hat: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    grow: torch.Tensor,
    prune: torch.Tensor,
) -> None:
    """Regrow ``grow`` at its dense value and prune ``prune``, in the given rows."""
    mask[rows, grow] = False
    W_hat[rows, grow] = W[rows, grow]
    mask[rows, prune] = True
    W_hat[rows, prune] = 0.0


def dsnot(
    dense: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    squared_norm: torch.Tensor,
    nm: tuple[int, int] | None = None,
    max_cycles: int = DEFAULT_MAX_CYCLES,
    threshold: float = DEFAULT_THRESHOLD,
    var_power: float = DEFAULT_VAR_POWER,
    same_sign: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (new sparse weight in fp32, new mask) from the dense weight and a method's (weight, mask).

    ``dense``, ``weight``, ``mask``: (rows, cols), True in ``mask`` = pruned; ``mean``, ``variance``,
    ``squared_norm``: (cols,) statistics of the layer's input. Every row keeps its count of pruned weights
    (``nm``: every group of M its count).
    """
    W = dense.float()
    W_hat = weight.float().masked_fill(mask, 0.0)
    mask, rows = mask.clone(), W.shape[0]
    mu = mean.to(W.device).float()
    index = torch.arange(rows, device=W.device)

    error = ((W - W_hat) * mu).sum(dim=1)  # (rows,) expected output error
    first_sign = error.sign()
    grow_gain = W * mu  # regrowing j lowers e by W_ij mu_j
    var = variance.to(W.device).float().clamp_min(torch.finfo(torch.float32).tiny)
    grow_lists = _regrow_candidates(grow_gain / var.pow(var_power), mask)
    grow_count = mask.sum(dim=1).expand(2, rows)
    grow_ptr = torch.zeros(2, rows, dtype=torch.long, device=W.device)

    wanda = W_hat.abs() * squared_norm.to(W.device).float().sqrt().unsqueeze(0)
    wanda = wanda.masked_fill(mask, float("inf"))  # never prune again what was pruned at the start
    if nm is None:
        prune_lists, prune_count = _prune_candidates(wanda, W_hat * mu, mask)  # pruning j raises e by W^_ij mu_j
        prune_ptr = torch.zeros(2, rows, dtype=torch.long, device=W.device)

    active = torch.ones(rows, dtype=torch.bool, device=W.device)
    for _ in range(max_cycles):
        active &= error.abs() > threshold
        if not active.any():
            break
        side = (error > 0).long()  # 1: regrow the most positive, prune among the lowering ones
        grow, valid = _take(grow_lists, grow_count, grow_ptr, side, index)
        valid &= mask[index, grow]  # the other pointer may have regrown it already
        if nm is None:  # e > 0: prune from the list of weights with W^ mu < 0 (list 0)
            prune, found = _take(prune_lists, prune_count, prune_ptr, 1 - side, index)
        else:
            prune, found = _prune_in_group(wanda, mask, grow, nm[1])
        after = error - grow_gain[index, grow] + W_hat[index, prune] * mu[prune]
        update = active & valid & found
        if same_sign or nm is not None:
            update &= after.sign() == first_sign
        _swap(W, W_hat, mask, index[update], grow[update], prune[update])
        error = torch.where(update, after, error)
        active = update
    return W_hat, mask
