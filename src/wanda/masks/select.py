"""Vectorised mask selection over an explicit scope: per output row, per matrix, or per group of M inputs.

Ties are broken deterministically: among equal scores the one with the lower index is pruned first
(a stable sort), so the same weights and statistics always give the same mask on every machine.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..config import SparsityPattern
from ..errors import WandaError

Scope = Literal["row", "matrix"]


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mark the ``k`` lowest scores along the last dimension (exactly ``k`` per slice).

    A selection instead of a sort: the k-th smallest value t of each slice (``kthvalue``, linear time), then
    everything below t, then as many entries equal to t as are still needed, lowest index first: the same
    mask a stable ascending sort would give, at a fraction of its cost on long rows.
    """
    n = scores.shape[-1]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < threshold
    ties = scores == threshold
    still_needed = k - below.sum(dim=-1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=-1) <= still_needed))


def prune_count(ratio: float, total: int) -> int:
    """floor(ratio * total) of the decimal numbers: 0.29 of 100 is 29, although 0.29 * 100 == 28.999999999999996
    in binary floating point (the relative guard is far above that rounding and far below any real fraction)."""
    return math.floor(ratio * total * (1 + 1e-12))


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune floor(ratio * in_features) weights of every output row (Wanda's comparison group)."""
    return lowest_k_mask(scores, prune_count(ratio, scores.shape[-1]))


def matrix_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune floor(ratio * numel) weights of the whole matrix (one threshold, as magnitude pruning)."""
    flat = scores.reshape(1, -1)
    return lowest_k_mask(flat, prune_count(ratio, flat.shape[-1])).reshape(scores.shape)


#: Up to this M, N:M ranks come from pairwise comparisons (M * numel element operations, no sort).
_PAIRWISE_MAX_M = 32


def _nm_pairwise(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Mask of the ``n`` lowest entries of each group of M (last dim), with a stable sort's tie-breaking.

    Entry i is preceded by j when s_j < s_i, or s_j == s_i and j < i; it is pruned when fewer than ``n``
    entries precede it. M*(M-1) comparisons of (rows, cols/M) planes are many times faster than sorting
    millions of length-M rows, and no transposed copy of the matrix is made.
    """
    m = groups.shape[-1]
    planes = [groups[..., j].contiguous() for j in range(m)]  # plane j: every group's j-th entry
    mask = torch.empty(groups.shape, dtype=torch.bool, device=groups.device)
    rank = torch.empty(planes[0].shape, dtype=torch.uint8 if m < 256 else torch.int32, device=groups.device)
    for i in range(m):
        rank.zero_()
        for j in range(m):
            if j != i:
                rank += (planes[j] <= planes[i]) if j < i else (planes[j] < planes[i])
        mask[..., i] = rank < n
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune exactly ``n`` of every ``m`` consecutive input weights of every row."""
    rows, cols = scores.shape
    if cols % m:
        raise WandaError(f"N:M sparsity {n}:{m} needs in_features divisible by {m}, but a layer has {cols}")
    groups = scores.reshape(rows, cols // m, m)
    if m > _PAIRWISE_MAX_M:
        return lowest_k_mask(groups, n).reshape(rows, cols)
    return _nm_pairwise(groups, n).reshape(rows, cols)


def variant_mask(scores: torch.Tensor, ratio: float, tolerance: float = 1e-3, max_steps: int = 60) -> torch.Tensor:
    """Wanda's appendix variant: per row, prune the smallest scores whose cumulative sum stays below
    alpha * (row sum), with one alpha for the matrix found by bisection so that the achieved sparsity is
    within ``tolerance`` of ``ratio``. Rows therefore lose different numbers of weights.
    """
    sorted_scores, order = torch.sort(scores.float(), dim=-1, stable=True)
    cumsum = sorted_scores.cumsum(dim=-1)
    row_sum = cumsum[:, -1:]
    low, high = 0.0, 1.0
    for _ in range(max_steps):
        alpha = (low + high) / 2
        pruned_sorted = cumsum <= alpha * row_sum
        achieved = pruned_sorted.float().mean().item()
        if abs(achieved - ratio) <= tolerance:
            break
        if achieved > ratio:
            high = alpha
        else:
            low = alpha
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order, pruned_sorted)


def select_mask(scores: torch.Tensor, ratio: float, pattern: SparsityPattern, scope: Scope) -> torch.Tensor:
    """Dispatch on the pattern: N:M always compares within groups of M; unstructured within ``scope``."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    if scope == "row":
        return row_mask(scores, ratio)
    if scope == "matrix":
        return matrix_mask(scores, ratio)
    raise ValueError(f"unknown mask scope {scope!r}")
