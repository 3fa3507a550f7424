"""OWL, outlier-weighed layer-wise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing
Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024), the pure math of it.

A block's outlier ratio D_l is the share of its Wanda scores |W_ij| * ||X_j||_2 (all its linear layers
together, on the dense model) above M times their mean. Blocks with more outliers are pruned less: the ratios
are mapped linearly onto a span of 2 lambda, the block with the most outliers lowest, and shifted so that they
average to the target S (reference code ``lib/prune_all.py``, ``prune_wanda_outlier``: min-max scaling by
2 * Lamda, then ``- mean + (1 - S)`` on the kept fractions). The paper states the range as [S - lambda,
S + lambda]; where the shifted span would leave it (a lopsided set of outlier ratios) the deviations are
scaled down to fit, which keeps the mean. Defaults: M = 5 and lambda = 0.08 (the paper's LLaMA settings; the
reference code's ``--Lamda`` default is 0.08).

OWL is defined for unstructured sparsity. Its code's N:M variant gives blocks different N (mixed 1:4, 2:4,
3:4), which is no longer the hardware's N:M pattern, so it is not offered here.
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = DEFAULT_M) -> float:
    """Fraction of the entries of all ``scores`` (one block's layers) above ``m`` times their common mean."""
    total = sum(s.double().sum().item() for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * total / count
    return sum((s > threshold).sum().item() for s in scores) / count


def owl_ratios(outlier_ratios: Sequence[float], target: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    """Per-block sparsity: average ``target``, within +-``lam`` of it, lower where the outlier ratio is higher."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    if len(d) == 0 or spread == 0:
        return [target] * len(d)
    keep = (d - d.min()) / spread * (2 * lam)  # kept fraction, up to a shift: more outliers, more kept
    deviation = -(keep - keep.mean())  # sparsity = target - (keep - mean)
    largest = deviation.abs().max()
    if largest > lam:
        deviation *= lam / largest
    return (target + deviation).tolist()
