"""After-the-fact checks of a mask or a pruned weight."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned entries."""
    return mask.float().mean().item()


def zero_count(weight: torch.Tensor) -> int:
    """Exact zeros of a weight: what every sparsity figure of wanda counts (never masks, which a later
    update could have undone)."""
    return int(torch.count_nonzero(weight == 0))


def zero_fraction(weight: torch.Tensor) -> float:
    return zero_count(weight) / weight.numel() if weight.numel() else 0.0


def overall_sparsity(parts: Iterable[tuple[Sequence[int], float]]) -> float:
    """Sparsity of several matrices together from (shape, sparsity) pairs: weighted by size."""
    total = zeros = 0.0
    for shape, sparsity in parts:
        size = math.prod(shape)
        total += size
        zeros += sparsity * size
    return zeros / total if total else 0.0


def check_nm(zeros: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at least ``n`` zeros/pruned."""
    rows, cols = zeros.shape
    if cols % m:
        return False
    return bool((zeros.reshape(rows, cols // m, m).sum(-1) >= n).all())
