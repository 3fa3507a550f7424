"""RIA, relative importance and activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models", ICLR 2024):

    S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2^a,   a = 0.5

the weight relative to its input channel (column) and to its output channel (row), times a softened activation
norm. Because the relative importance is comparable across rows, the paper compares it over the whole matrix
for unstructured sparsity (the reference code's default; its ``--per_outneuron`` is Wanda's per-row group)
and within each group of M for N:M (the reference's "directly N:M"; its channel reallocation and linear sum
assignment are optional extras, not implemented here). a = 0.5 is the reference's ``--a`` default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..utils.declare import require, setting

#: The exponent of the activation norm (RIA's a; the paper's ablation finds 0.5 best).
DEFAULT_A = 0.5


@dataclass(frozen=True)
class RiaSettings:
    #: RIA's exponent a of the activation norm.
    ria_a: float = setting(DEFAULT_A, "RIA: exponent a of the activation norm ||X_j||^a")

    def __post_init__(self) -> None:
        require(0 <= self.ria_a < math.inf, f"--ria_a must be a non-negative number, got {self.ria_a}")


def ria_scores(weight: torch.Tensor, squared_norm: torch.Tensor, a: float = DEFAULT_A) -> torch.Tensor:
    """(rows, cols) scores; the lower, the earlier pruned. ``squared_norm``: ||X_j||^2 per input feature."""
    w = weight.abs().float()
    # an all-zero row or column has |W| = 0 everywhere, so its terms are 0, not 0/0
    tiny = torch.finfo(torch.float32).tiny
    relative = w / w.sum(dim=0, keepdim=True).clamp_min(tiny) + w / w.sum(dim=1, keepdim=True).clamp_min(tiny)
    return relative * squared_norm.to(weight.device).float().sqrt().pow(a).unsqueeze(0)
