"""Accumulators (start / add a batch / finish) for the statistics the pruning methods need.

Both are sums over every calibration token, so batching does not change the result:
- ``SquaredNorm``: ||X_j||_2^2 per input feature j (Wanda's activation norm, squared).
- ``Gram``: X^T X (SparseGPT's Hessian up to the factor 2/n, which OBS is invariant to apart from the
  dampening, which is relative to the mean diagonal anyway). Its diagonal is ``SquaredNorm``.
"""

from __future__ import annotations

import torch


def flatten_inputs(x: torch.Tensor) -> torch.Tensor:
    """(batch, seq, features) or (tokens, features) -> (tokens, features), in fp32."""
    return x.reshape(-1, x.shape[-1]).float()


class InputStatistic:
    """Base class: ``add`` takes a layer input of any leading shape."""

    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def squared_norm(self) -> torch.Tensor:
        """||X_j||^2 for every input feature j."""
        raise NotImplementedError


class SquaredNorm(InputStatistic):
    def __init__(self, features: int, device: torch.device | str):
        self.sum = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        # fp32 accumulation without materialising an fp32 copy of a half-precision batch
        self.sum += torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square()
        self.tokens += flat.shape[0]

    def squared_norm(self) -> torch.Tensor:
        return self.sum


class Gram(InputStatistic):
    def __init__(self, features: int, device: torch.device | str):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = flatten_inputs(x)
        self.sum.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]

    def squared_norm(self) -> torch.Tensor:
        return self.sum.diagonal().clone()

    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = 2/n X^T X (n = calibration tokens)."""
        return self.sum * (2.0 / max(self.tokens, 1))
