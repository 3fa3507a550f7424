"""Importance scores: the lower the score, the earlier the weight is pruned."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils.declare import require, setting


@dataclass(frozen=True)
class WandaSettings:
    """Wanda's own settings: the appendix variant's switch and its bisection tolerance."""

    use_variant: bool = setting(
        False,
        "Wanda's appendix variant: per row, prune up to a cumulative-score "
        "threshold alpha * (row sum), alpha by bisection",
    )
    #: Relative tolerance of the Wanda variant's bisection on the achieved sparsity.
    variant_tolerance: float = setting(1e-3, "relative tolerance of the variant's bisection on the sparsity")

    def __post_init__(self) -> None:
        require(0 < self.variant_tolerance < 1, f"--variant_tolerance must be in (0, 1), got {self.variant_tolerance}")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij| (magnitude pruning)."""
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, squared_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023, Eq. 1): S_ij = |W_ij| * ||X_j||_2, with ||X_j||_2 over all calibration tokens."""
    return weight.abs().float() * squared_norm.to(weight.device).float().sqrt().unsqueeze(0)
