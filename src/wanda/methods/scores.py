"""Importance scores: the lower the score, the earlier the weight is pruned."""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij| (magnitude pruning)."""
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, squared_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023, Eq. 1): S_ij = |W_ij| * ||X_j||_2, with ||X_j||_2 over all calibration tokens."""
    return weight.abs().float() * squared_norm.to(weight.device).float().sqrt().unsqueeze(0)
