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
    """X^T X. On the CPU, with scipy's BLAS, each batch is added with ``syrk``, which computes one triangle:
    half the multiply-adds of a general product, and this sum is most of SparseGPT's cost beyond the forward
    passes (for an MLP's down projection it costs more than the projection itself)."""

    def __init__(self, features: int, device: torch.device | str):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0
        self._lower_only = False  # True while only the lower triangle of ``sum`` is current
        self.derived: dict = {}  # what methods compute from the finished sum (the inverse factor), kept once

    def add(self, x: torch.Tensor) -> None:
        flat = flatten_inputs(x)
        if flat.device.type == "cpu" and _syrk is not None:
            _syrk_accumulate(self.sum, flat.contiguous())
            self._lower_only = True
        else:
            self.sum.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]
        self.derived.clear()

    def total(self) -> torch.Tensor:
        """The full symmetric X^T X."""
        if self._lower_only:
            lower = self.sum.tril()
            torch.add(lower, lower.tril(-1).T, out=self.sum)
            self._lower_only = False
        return self.sum

    def squared_norm(self) -> torch.Tensor:
        return self.sum.diagonal().clone()

    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = 2/n X^T X (n = calibration tokens)."""
        return self.total() * (2.0 / max(self.tokens, 1))


def _load_syrk():
    try:
        from scipy.linalg.blas import ssyrk
    except ImportError:  # scipy is a dependency; without it the general product does the same job
        return None
    return ssyrk


_syrk = _load_syrk()


def _syrk_accumulate(total: torch.Tensor, flat: torch.Tensor) -> None:
    """total += flat^T flat, lower triangle (row-major) only, in place.

    A row-major (tokens, features) array is the column-major (features, tokens) X^T, and the row-major
    ``total`` is its own transpose in column-major order, so BLAS reads and writes both without copies.
    """
    target = total.numpy().T
    out = _syrk(1.0, flat.numpy().T, beta=1.0, c=target, trans=0, lower=0, overwrite_c=1)
    if out.ctypes.data != target.ctypes.data:  # scipy had to copy: write the result back
        target[...] = out
