"""After-the-fact checks of a mask or a pruned weight."""

from __future__ import annotations

import torch


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned entries."""
    return mask.float().mean().item()


def check_nm(zeros: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at least ``n`` zeros/pruned."""
    rows, cols = zeros.shape
    if cols % m:
        return False
    return bool((zeros.reshape(rows, cols // m, m).sum(-1) >= n).all())
