"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, ICLR 2023) for a pruned layer: every pruned zero stays exactly 0.

GPTQ is SparseGPT's OBS column loop (``wanda.methods.obs``) with "round column j to the grid" in place of "zero
the masked entries of column j": with U the upper Cholesky factor of (H + lambda I)^-1, H = 2/n X^T X, column j
is quantized to q_j, its error err = (w_j - q_j) / U_jj is compensated on the later columns,
W[:, j+1:] -= err U[j, j+1:], and the updates are applied lazily (column by column inside a batch of ``lazy``
columns, one matmul per batch inside a block, one matmul per block for the rest of the matrix).

A group's scale (and zero-point) is fitted when the loop reaches the group's first column, from the weights as
updated by every earlier column (GPTQ's ``groupsize``); the block boundaries are cut at group starts so that
every column of the group is up to date at that point.

With a ``mask`` (True = pruned) the pruned entries end exactly 0: the weight is zeroed at the mask first, and
in the loop a pruned entry's grid is {0}: like SparseGPT's pruned weights, it is set to 0 at its column and the
error of doing so (the compensation it has received from earlier columns, w_j - 0) is fed back to the later
columns like any rounding error. Kept entries are rounded to their group's grid; at the end the mask is written
as +0.0. (Holding pruned entries at 0 by masking every update instead was measured worse, at times worse than
round-to-nearest: the compensation that would have landed on pruned entries is then lost.) A group is fitted
to its kept weights only (pruned entries counted as 0, which every grid's range includes anyway).
``mask=None`` on a dense weight is plain GPTQ.
"""

from __future__ import annotations

import itertools

import torch

from ..errors import WandaError
from ..methods.obs import LAZY_COLUMNS, inverse_hessian_factor
from .grid import Grid, GroupParams

__all__ = ["gptq_quantize", "rtn_quantize"]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    grid: Grid,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    *,
    factor: torch.Tensor | None = None,
    lazy: int = LAZY_COLUMNS,
    return_params: bool = False,
):
    """Return (quantized weight in float32, or float64 for a float64 weight, OBS-predicted loss sum); with
    ``return_params`` also the list of ``GroupParams`` of the groups in column order (each of shape (rows, 1);
    group k covers the columns [k g, (k + 1) g) with g = ``grid.group_width(cols)``), which is what an exporter
    needs to write codes (``grid.encode(weight[:, k g : (k + 1) g], params[k])``).

    ``hessian``: H = 2/n X^T X of the layer's inputs (cols x cols), or None when ``factor`` =
    ``inverse_hessian_factor(H, percdamp)`` is passed (as ``obs_prune`` takes it, for layers sharing an input).
    ``mask``: bool, the weight's shape, True where pruned. ``blocksize`` and ``lazy`` only batch the updates.
    """
    cols = weight.shape[1]
    grid.check(cols)
    if hessian is None and factor is None:
        raise WandaError("GPTQ needs the layer's Hessian or its inverse factor")
    if blocksize < 1 or lazy < 1:
        raise WandaError(f"GPTQ blocksize and lazy batch must be at least 1, got {blocksize} and {lazy}")
    if mask is not None and mask.shape != weight.shape:
        raise WandaError(f"GPTQ mask has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    WT = weight.detach().T.to(dtype).clone()  # column j of W is the contiguous row WT[j]
    Hinv = factor if factor is not None else inverse_hessian_factor(hessian.to(WT.device, dtype), percdamp)
    Hinv = Hinv.to(device=WT.device, dtype=dtype)
    if Hinv.shape != (cols, cols):
        raise WandaError(f"GPTQ needs a {cols} x {cols} Hessian for a layer of {cols} inputs, got {tuple(Hinv.shape)}")
    maskT = None
    if mask is not None:
        maskT = mask.detach().T.to(device=WT.device, dtype=torch.bool).contiguous()
        WT.masked_fill_(maskT, 0.0)
    g = grid.group_width(cols)
    starts = sorted(set(range(0, cols, blocksize)) | set(range(0, cols, g))) + [cols]
    params: list[GroupParams] = []
    column: GroupParams | None = None
    loss = torch.zeros((), dtype=torch.float32, device=WT.device)
    for start, stop in itertools.pairwise(starts):
        if start % g == 0:  # every column >= start has had all earlier columns' updates
            block = WT[start : start + g]
            if maskT is not None:
                block = block.masked_fill(maskT[start : start + g], 0.0)
            group = grid.fit(block.T)
            params.append(group)
            column = grid.column(group)
        errors = _quantize_block(
            WT[start:stop],
            None if maskT is None else maskT[start:stop],
            Hinv[start:stop, start:stop],
            grid,
            column,
            lazy,
        )
        loss += errors.square().sum() / 2
        if stop < cols:
            WT[stop:].addmm_(Hinv[start:stop, stop:].T, errors, alpha=-1)
    if maskT is not None:
        WT.masked_fill_(maskT, 0.0)  # exact zeros (+0.0), whatever sign a decoded zero had
    result = WT.T.contiguous()
    return (result, loss.item(), params) if return_params else (result, loss.item())


def _quantize_block(
    WT: torch.Tensor, maskT: torch.Tensor | None, U: torch.Tensor, grid: Grid, column: GroupParams, lazy: int
) -> torch.Tensor:
    """Quantize the columns of one block in place (``WT``, ``maskT``: transposed views); return their errors."""
    width = WT.shape[0]
    d = U.diagonal()
    errors = torch.empty_like(WT)
    for s0 in range(0, width, lazy):
        s1 = min(s0 + lazy, width)
        for i in range(s0, s1):
            w = WT[i]
            q = grid.round(w, column)
            if maskT is not None:
                q.masked_fill_(maskT[i], 0.0)
            torch.div(w - q, d[i], out=errors[i])
            WT[i] = q
            if i + 1 < s1:
                WT[i + 1 : s1].addr_(U[i, i + 1 : s1], errors[i], alpha=-1)
        if s1 < width:
            WT[s1:].addmm_(U[s0:s1, s1:].T, errors[s0:s1], alpha=-1)
    return errors


def rtn_quantize(weight: torch.Tensor, grid: Grid, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest on the same grid and mask (the baseline GPTQ is measured against): zero the mask, then
    round every group fitted from its own weights."""
    w = weight.detach()
    w = w if w.dtype == torch.float64 else w.float()
    if mask is not None:
        w = w.masked_fill(mask, 0.0)
    out = grid.quantize(w)
    return out if mask is None else out.masked_fill(mask, 0.0)
