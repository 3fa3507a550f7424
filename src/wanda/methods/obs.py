"""The OBS reconstruction of SparseGPT (Frantar & Alistarh 2023, Algorithm 1), with the mask rule passed in.

For a layer W (rows x cols) and Hessian H = 2/n X^T X of its inputs, columns are processed left to right;
pruning column j (setting the masked entries of w_j to zero) leaves an error err = (w_j - q_j) / [H^-1]_jj,
which is compensated on the not-yet-processed columns: W[:, j:] -= err [H^-1]_{j, j:}. Here H^-1 is the
upper Cholesky factor of the inverse, so each row of it already has the previous columns eliminated.
Updates are lazy: within a block of ``blocksize`` columns they are applied in place, and the accumulated
error of the block is pushed to the rest of the matrix with one matmul.

``select`` decides the mask: called once per block with (W_block, diag(H^-1)_block, first column) for
unstructured patterns, or once per group of M columns inside the column loop for N:M patterns, always on the
weights *as updated so far*. SparseGPT scores w^2 / [H^-1]_jj^2; the ablations pass other rules.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import SparsityPattern
from ..errors import WandaError

Selector = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = percdamp * mean(diag H).

    Inputs that were never active (H_jj == 0) get H_jj = 1 so that H stays invertible; their weights have no
    effect on the output either way.
    """
    H = hessian.clone()
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(percdamp * diag.mean())
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    select: Selector,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (updated weight in fp32 with zeros at the mask, mask, OBS-predicted loss sum)."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    if pattern.is_nm and cols % pattern.m:
        # checked here: inside the column loop only the last, partial group of M would be seen
        raise WandaError(f"N:M sparsity {pattern} needs in_features divisible by {pattern.m}, but a layer has {cols}")
    Hinv = inverse_hessian_factor(hessian.float().to(W.device), percdamp)
    mask = torch.zeros_like(W, dtype=torch.bool)
    loss = torch.zeros(rows, dtype=torch.float32, device=W.device)

    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        W1 = W[:, start:stop].clone()
        Hinv1 = Hinv[start:stop, start:stop]
        d = Hinv1.diagonal()
        errors = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.is_nm:
            mask1 = select(W1, d, start)
        for i in range(stop - start):
            if pattern.is_nm and i % pattern.m == 0:
                mask1[:, i : i + pattern.m] = select(W1[:, i : i + pattern.m], d[i : i + pattern.m], start + i)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / d[i]
            loss += (w - q).square() / d[i].square() / 2
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            W1[:, i] = q  # exact zeros, not the rounding residue of the update
            errors[:, i] = err
        W[:, start:stop] = W1
        mask[:, start:stop] = mask1
        W[:, stop:].sub_(errors @ Hinv[start:stop, stop:])
    return W, mask, loss.sum().item()
