"""Vectorised mask selection over an explicit scope: per output row, per matrix, or per group of M inputs.

Ties are broken deterministically: among equal scores the one with the lower index is pruned first
(a stable sort), so the same weights and statistics always give the same mask on every machine.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Literal

import torch

from ..errors import WandaError
from .pattern import SparsityPattern

log = logging.getLogger(__name__)

Scope = Literal["row", "matrix"]

#: Longest slice for which CUDA's kthvalue (one thread block per slice) is used; longer ones are sorted.
_CUDA_KTHVALUE_MAX = 1 << 16


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
    if scores.is_cuda and n > _CUDA_KTHVALUE_MAX:
        # CUDA's kthvalue gives each slice one thread block: a whole 4096 x 11008 matrix as one slice takes
        # ~0.2 s on an H200, its radix sort a few ms
        threshold = scores.sort(dim=-1).values[..., k - 1 : k]
    else:
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


def row_spread_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune floor(ratio * numel) weights of the matrix, compared within each output row: every row loses
    floor(ratio * in_features), and the remainder goes one each to the rows whose next candidate scores lowest.
    The matrix thus loses the same count whatever the scope, so a per-layer ratio (a sparsity profile) is met
    within one weight per layer; where ratio * in_features is whole (50% of an even width) it is ``row_mask``."""
    return row_mask_count(scores, prune_count(ratio, scores.numel()))


def row_mask_count(scores: torch.Tensor, total: int) -> torch.Tensor:
    """Prune ``total`` weights, total // rows from every row plus one more from ``total % rows`` rows: those
    whose lowest kept score is lowest (ties: the lower row)."""
    rows, cols = scores.shape
    base, extra = divmod(total, rows)
    if extra == 0 or base >= cols:
        return lowest_k_mask(scores, min(base, cols))
    low, high = lowest_k_mask(scores, base), lowest_k_mask(scores, base + 1)  # nested: a stable-sort prefix
    candidate = scores.float().masked_fill(low | ~high, float("inf")).amin(dim=-1)  # each row's next in line
    chosen = lowest_k_mask(candidate.unsqueeze(0), extra).squeeze(0)
    return torch.where(chosen.unsqueeze(1), high, low)


def matrix_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune floor(ratio * numel) weights of the whole matrix (one threshold, as magnitude pruning)."""
    flat = scores.reshape(1, -1)
    return lowest_k_mask(flat, prune_count(ratio, flat.shape[-1])).reshape(scores.shape)


#: Up to this M the selection network is used; beyond it (rare patterns) a k-th value selection.
_NETWORK_MAX_M = 32


def _stable_lowest(groups: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` positions of a stable ascending sort of each group (last dim); NaN sorts last."""
    order = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)


#: Up to this many scores a GPU sorts the groups instead (no device sync); bigger matrices use the network.
_GPU_SORT_MAX = 1 << 20
#: Elements of scores handled per step on the CPU: a few MB, so the dozen passes of the network stay in cache.
_CPU_CHUNK = 1 << 19


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune exactly ``n`` of every ``m`` consecutive input weights of every row.

    The n-th and (n+1)-th smallest scores t and u of each group come from a min/max selection network over
    the M planes of the matrix (groups[..., j] for every j), and every entry <= t is pruned. Where u is not
    above t (a tie, or a NaN) the group is redone by a stable sort: ties go lowest index first, NaN last.
    On the CPU the rows go through in chunks of a few MB, so the matrix is read from memory about once.
    """
    rows, cols = scores.shape
    if cols % m:
        raise WandaError(f"N:M sparsity {n}:{m} needs in_features divisible by {m}, but a layer has {cols}")
    if not 0 < n < m:
        return torch.full_like(scores, n >= m, dtype=torch.bool)
    groups = scores.reshape(rows, cols // m, m)
    if m > _NETWORK_MAX_M:
        return lowest_k_mask(groups, n).reshape(rows, cols)
    if scores.device.type != "cpu" and scores.numel() <= _GPU_SORT_MAX:
        # small calls (SparseGPT selects one group of M columns at a time) would pay a device sync each for
        # the tie check: on an H200, SparseGPT 2:4 of two 7B-shaped blocks took 12.4 s so and 6.7 s sorting
        return _stable_lowest(groups, n).reshape(rows, cols)
    mask = torch.empty(groups.shape, dtype=torch.bool, device=scores.device)
    # (a big matrix on a GPU in one step: on an H200, 4096 x 11008 takes 1.3 ms this way, 31 ms by sorting)
    step = max(1, _CPU_CHUNK // cols) if scores.device.type == "cpu" else rows
    network = _selection_network(m, n - 1)
    for start in range(0, rows, step):
        _nm_chunk(groups[start : start + step], n, network, mask[start : start + step])
    return mask.reshape(rows, cols)


#: Comparators (i, j, need min, need max) of a selection network, in order.
Network = tuple[tuple[int, int, bool, bool], ...]


def _nm_chunk(groups: torch.Tensor, n: int, network: Network, out: torch.Tensor) -> None:
    entries = groups.unbind(-1)
    planes = list(entries)
    for i, j, need_low, need_high in network:
        low = torch.minimum(planes[i], planes[j]) if need_low else None
        high = torch.maximum(planes[i], planes[j]) if need_high else None
        planes[i], planes[j] = low, high
    nth, next_ = planes[n - 1], planes[n]  # the n-th and (n+1)-th smallest of every group
    for j, entry in enumerate(entries):
        torch.le(entry, nth, out=out[..., j])
    # exactly n entries <= nth unless the (n+1)-th equals it (a tie) or the comparison meets a NaN
    ambiguous = torch.gt(next_, nth).logical_not_()
    if ambiguous.any():
        out[ambiguous] = _stable_lowest(groups[ambiguous], n)


@functools.lru_cache(maxsize=None)
def _selection_network(m: int, position: int) -> Network:
    """Comparators (i, j, need min, need max) of Batcher's odd-even merge sort on ``m`` wires that the values
    ending at ``position`` and ``position + 1`` depend on; wires beyond ``m`` (up to a power of two) would
    hold +inf and are dropped with the comparators that touch them, which leave the real wires unchanged."""
    size = 1 << max(1, (m - 1).bit_length())
    comparators = [(i, j) for i, j in _batcher(size) if j < m]
    needed, kept = {position, position + 1}, []
    for i, j in reversed(comparators):
        if i in needed or j in needed:
            kept.append((i, j, i in needed, j in needed))
            needed |= {i, j}
    return tuple(kept[::-1])  # cached: SparseGPT asks for it once per group of M columns


def _batcher(size: int) -> list[tuple[int, int]]:
    """Knuth's formulation of Batcher's odd-even merge sort network for a power-of-two ``size``."""
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def variant_mask(scores: torch.Tensor, ratio: float, tolerance: float = 1e-3, max_steps: int = 60) -> torch.Tensor:
    """Wanda's appendix variant: per row, prune the smallest scores whose cumulative sum stays below
    alpha * (row sum), with one alpha for the matrix found by bisection so that the achieved sparsity is
    within ``tolerance`` of ``ratio``. Rows therefore lose different numbers of weights.

    A row always keeps at least one weight (its highest score): a ratio above (cols - 1) / cols could only be
    met by emptying rows, so it is capped there, with a log line (1.0 itself is refused by the settings).
    """
    cols = scores.shape[-1]
    cap = (cols - 1) / cols
    if ratio > cap:
        log.warning(
            "the variant's ratio %.6g is capped at %.6g for a matrix of %d columns: every row keeps a weight",
            ratio,
            cap,
            cols,
        )
        ratio = cap
    sorted_scores, order = torch.sort(scores.float(), dim=-1, stable=True)
    cumsum = sorted_scores.cumsum(dim=-1)
    row_sum = cumsum[:, -1:]
    low, high = 0.0, 1.0
    for _ in range(max_steps):
        alpha = (low + high) / 2
        pruned_sorted = cumsum <= alpha * row_sum
        pruned_sorted[:, -1] = False  # the row's highest score stays (all-zero scores would empty it)
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
