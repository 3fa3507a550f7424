"""The OBS reconstruction of SparseGPT (Frantar & Alistarh 2023, Algorithm 1), with the mask rule passed in.

For a layer W (rows x cols) and Hessian H = 2/n X^T X of its inputs, columns are processed left to right;
pruning column j (setting the masked entries of w_j to zero) leaves an error err = (w_j - q_j) / [H^-1]_jj,
which is compensated on the not-yet-processed columns: W[:, j:] -= err [H^-1]_{j, j:}. Here H^-1 is the
upper Cholesky factor of the inverse, so each row of it already has the previous columns eliminated.
Updates are lazy on two levels: column by column inside a batch of ``lazy`` columns, batch by batch (one
matmul) inside a block of ``blocksize`` columns, and block by block (one matmul) for the rest of the matrix.

``select`` decides the mask: called once per block with (W_block, diag(H^-1)_block, first column) for
unstructured patterns, or once per group of M columns inside the column loop for N:M patterns, always on the
weights *as updated so far*. SparseGPT scores w^2 / [H^-1]_jj^2; the ablations pass other rules.

With a quantization ``grid`` (``--wbits``) the same loop also quantizes, as the SparseGPT authors' code does with
its quantizer and as GPTQ (Frantar et al., ICLR 2023) does without a mask: column j becomes q_j, its masked
entries 0 and its kept entries rounded to their group's grid, and the error (w_j - q_j) / [H^-1]_jj, pruning
and rounding together, is what the later columns absorb. So a later column's mask is chosen on weights that
already carry the earlier columns' rounding error, and nothing is rounded twice. A group's scale (and
zero-point) is fitted when the loop reaches the group's first column, as in GPTQ, from the weights as updated by
every earlier column, the entries already known to be pruned counted as 0 (the whole block's mask for the
unstructured rules, which choose it at the block's start; for N:M only the groups of M already chosen). The grid
is duck-typed (``fit``, ``round``, ``column``, ``group_width``, ``check``: ``wanda.quant.Grid``), since the
grids live above this package.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import WandaError
from ..masks.pattern import SparsityPattern
from ..utils.declare import require, setting

Selector = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

#: Columns whose updates are applied one by one before the rest of the block gets them in one matmul.
LAZY_COLUMNS = 32


#: Largest dampening, as a fraction of the mean diagonal, that the escalation tries before giving up: at 1.0
#: the dampening already weighs as much as the average input, and any Hessian with a finite, non-negative
#: diagonal is positive definite well before that unless its entries are not finite.
MAX_PERCDAMP = 1.0
#: First retry when the requested dampening is 0 (then x10 per retry, as from any other start).
FIRST_RETRY_PERCDAMP = 1e-6

log = logging.getLogger("wanda")


@dataclass(frozen=True)
class DampingSettings:
    """The Hessian settings every method that factorises it shares: its dampening, and the weight of the
    attention sink in it (``wanda.stats.Gram``)."""

    #: Hessian dampening as a fraction of its mean diagonal (SparseGPT's 1%).
    percdamp: float = setting(0.01, "Hessian dampening, a fraction of its mean diagonal (SparseGPT's 1%%)")
    #: Weight of each calibration window's first token in H = 2/n X^T X (1: the papers' plain sum).
    sink_weight: float = setting(
        1.0,
        "weight of each calibration window's first token (the attention sink) in the Hessian X^T X; 1 is the "
        "papers' plain sum (see docs/quantization.md)",
    )

    def __post_init__(self) -> None:
        require(0 <= self.percdamp < 1, f"--percdamp must be in [0, 1), got {self.percdamp}")
        require(
            math.isfinite(self.sink_weight) and self.sink_weight > 0,
            f"--sink_weight must be a finite number above 0, got {self.sink_weight}",
        )


@dataclass(frozen=True)
class ObsSettings(DampingSettings):
    """SparseGPT's and the OBS ablations' settings."""

    #: Columns per lazy OBS update (SparseGPT's B = 128); also the re-selection period of the ``iter`` ablations.
    blocksize: int = setting(128, "columns per lazy OBS update (SparseGPT's B); the iter ablations' period")

    def __post_init__(self) -> None:
        DampingSettings.__post_init__(self)
        require(self.blocksize >= 1, f"--blocksize must be at least 1, got {self.blocksize}")


@dataclass(frozen=True)
class Dampened:
    """A Cholesky factorisation of H + lambda I with lambda = percdamp * mean(diag H).

    ``factor``: the lower Cholesky factor (of the reversed matrix when asked for ``flip``); ``hessian``: the
    dampened H itself (dead inputs set to 1, see ``dampened_cholesky``); ``percdamp``: the dampening that was
    finally used, which is the requested one unless the factorisation had to escalate it."""

    factor: torch.Tensor
    hessian: torch.Tensor
    percdamp: float
    requested: float

    @property
    def escalated(self) -> bool:
        return self.percdamp != self.requested


def dampened_cholesky(hessian: torch.Tensor, percdamp: float, flip: bool = False) -> Dampened:
    """Cholesky of H + lambda I, lambda = percdamp * mean(diag H), escalating the dampening when it fails.

    Inputs that were never active (H_jj == 0) get H_jj = 1 first so that H stays invertible; their weights
    have no effect on the output either way. When the factorisation fails (a rank-deficient H, e.g. fewer
    calibration tokens than features, with too little dampening), percdamp is multiplied by 10 (starting
    from ``FIRST_RETRY_PERCDAMP`` when it was 0) and the factorisation retried, up to ``MAX_PERCDAMP``; the
    dampening finally used is logged as a warning and returned. A Hessian with non-finite entries, or one that
    fails even at ``MAX_PERCDAMP``, raises ``WandaError``.
    """
    H = hessian.clone()
    diag = H.diagonal()
    if not torch.isfinite(diag).all() or not torch.isfinite(H).all():
        raise WandaError(
            "the Hessian (X^T X) of a layer has non-finite entries: its calibration inputs overflowed or are NaN"
        )
    diag[diag == 0] = 1.0
    mean = diag.mean()
    used, added = percdamp, 0.0
    while True:
        diag.add_((used - added) * mean)
        added = used
        L, info = torch.linalg.cholesky_ex(H.flip(0, 1) if flip else H)
        if not info.item():
            break
        if used >= MAX_PERCDAMP:
            raise WandaError(
                f"the Hessian of a layer is not positive definite even dampened by {used:g} of its "
                f"mean diagonal (minor {info.item()}, requested percdamp {percdamp:g}); its "
                f"calibration inputs are degenerate"
            )
        used = min(MAX_PERCDAMP, used * 10 if used > 0 else FIRST_RETRY_PERCDAMP)
    if used != percdamp:
        log.warning(
            "Hessian of %d inputs not positive definite with percdamp %g: factorised with percdamp %g",
            H.shape[0],
            percdamp,
            used,
        )
    return Dampened(L, H, used, percdamp)


def inverse_hessian_factor_dampened(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """``inverse_hessian_factor`` and the dampening it finally used (see ``dampened_cholesky``)."""
    damped = dampened_cholesky(hessian, percdamp, flip=True)
    return _lower_inverse(damped.factor).flip(0, 1), damped.percdamp


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 (so that (H + lambda I)^-1 = U^T U), lambda = percdamp *
    mean(diag H), the dampening escalated if needed (``dampened_cholesky``).

    With P the reversal permutation and P H P = L L^T, H = R R^T for the upper triangular R = P L P, so
    H^-1 = R^-T R^-1 and U = R^-1 = P L^-1 P: one Cholesky and one triangular inverse, instead of the
    Cholesky, inverse and second Cholesky of the reference code.
    """
    return inverse_hessian_factor_dampened(hessian, percdamp)[0]


def _lower_inverse(L: torch.Tensor) -> torch.Tensor:
    # (scipy's LAPACK strtri does a third of the work, but its OpenBLAS threads and torch's OpenMP threads
    # then compete for the cores: measured slower overall on 2 cores)
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    pattern: SparsityPattern,
    select: Selector,
    blocksize: int = 128,
    percdamp: float = 0.01,
    lazy: int = LAZY_COLUMNS,
    factor: torch.Tensor | None = None,
    grid: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (updated weight in float32, or float64 for a float64 weight, with zeros at the mask, mask,
    OBS-predicted loss sum).

    ``blocksize`` is the paper's mask-selection block; ``lazy`` only batches the updates inside it (the result
    is the same up to float rounding) so that each column costs two small vector operations. ``factor``:
    ``inverse_hessian_factor(hessian, percdamp)`` when the caller already has it (layers sharing an input).
    ``grid``: quantize in the same loop (see the module's docstring); the weight returned is then on the grid.
    Pass a ``Rounder(grid)`` to read the groups' parameters from its ``params`` afterwards.
    """
    rows, cols = weight.shape
    if pattern.is_nm and cols % pattern.m:
        # checked here: inside the column loop only the last, partial group of M would be seen
        raise WandaError(f"N:M sparsity {pattern} needs in_features divisible by {pattern.m}, but a layer has {cols}")
    if pattern.is_nm:
        lazy = max(pattern.m, lazy // pattern.m * pattern.m)  # a group of M never straddles two lazy batches
    # Transposed (cols x rows): column j of W is the contiguous row WT[j], so the column loop reads and
    # updates contiguous memory.
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # float64 for exact tests
    WT = weight.detach().T.to(dtype).contiguous()
    Hinv = factor if factor is not None else inverse_hessian_factor(hessian.to(WT.device, dtype), percdamp)
    Hinv = Hinv.to(dtype)
    maskT = torch.zeros_like(WT, dtype=torch.bool)
    rounder = None
    if grid is not None:
        rounder = grid if isinstance(grid, Rounder) else Rounder(grid)
        rounder.start(WT, maskT, pattern, blocksize)
    loss = torch.zeros((), dtype=dtype, device=WT.device)
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        errors = _prune_block(
            WT[start:stop], maskT[start:stop], Hinv[start:stop, start:stop], pattern, select, start, lazy, rounder
        )
        loss += errors.square().sum() / 2
        WT[stop:].addmm_(Hinv[start:stop, stop:].T, errors, alpha=-1)
    if rounder is not None:
        WT.masked_fill_(maskT, 0.0)  # +0.0, whatever sign a decoded zero had
    return WT.T.contiguous(), maskT.T.contiguous(), loss.item()


class Rounder:
    """The quantizing half of the joint loop: fits each group of ``grid`` when the loop reaches its first column
    and rounds one column at a time; ``params`` collects the groups' parameters in column order (what an
    exporter writes beside the codes)."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.params: list = []
        self._column = None

    def start(self, WT: torch.Tensor, maskT: torch.Tensor, pattern: SparsityPattern, blocksize: int) -> None:
        cols = WT.shape[0]
        self.grid.check(cols)
        self.width = g = self.grid.group_width(cols)
        self.WT, self.maskT, self.params, self._column = WT, maskT, [], None
        # a group is fitted from weights every earlier column has updated: inside the loop that holds for the
        # columns of the group's own block, and for all later columns at a block's start
        for c in range(0, cols, g):
            block = c - c % blocksize
            if c != block and min(c + g, cols) > min(block + blocksize, cols):
                raise WandaError(
                    f"quantization groups of {g} columns straddle the OBS blocks of {blocksize}: pass a --groupsize "
                    "that divides --blocksize or is a multiple of it"
                )
        if pattern.is_nm and (g % pattern.m or blocksize % pattern.m):
            raise WandaError(
                f"quantizing inside the N:M loop needs --groupsize and --blocksize that are multiples of M = "
                f"{pattern.m}, got {g} and {blocksize}"
            )

    def cuts(self, start: int, stop: int) -> set[int]:
        """Group starts strictly inside the block [start, stop), relative to ``start``."""
        first = -(-start // self.width) * self.width
        return {c - start for c in range(first, stop, self.width) if c > start}

    def round(self, col: int, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Column ``col`` (``w``, updated by every earlier column) on its group's grid, 0 at ``mask``."""
        if col % self.width == 0:
            group = self.WT[col : col + self.width].masked_fill(self.maskT[col : col + self.width], 0.0)
            params = self.grid.fit(group.T)
            self.params.append(params)
            self._column = self.grid.column(params)
        return self.grid.round(w, self._column).masked_fill_(mask, 0.0)


def _prune_block(
    WT: torch.Tensor,
    maskT: torch.Tensor,
    U: torch.Tensor,
    pattern: SparsityPattern,
    select: Selector,
    start: int,
    lazy: int,
    rounder: Rounder | None = None,
) -> torch.Tensor:
    """Prune the columns of one block in place (``WT``, ``maskT``: views, transposed); return their errors.

    Column i's error is err_i = M_i * w_i / U_ii, with w_i the column as updated by every earlier column;
    it is then subtracted, times U[i, j], from every later column j. Since nothing reads column i again, its
    pruned entries are zeroed once at the end of the block instead of column by column. With a ``rounder``
    the column becomes its quantized value q_i and err_i = (w_i - q_i) / U_ii; the lazy batches are then also cut
    at group starts, so that a group is fitted from up-to-date weights.
    """
    width = WT.shape[0]
    d = U.diagonal()
    errors = torch.empty_like(WT)
    scale = torch.empty_like(WT)  # M_ij / U_jj (transposed): the error of column j is WT[j] * scale[j]
    if not pattern.is_nm:
        maskT.copy_(select(WT.T, d, start).T)
        torch.div(maskT, d.unsqueeze(1), out=scale)
    cuts = set(range(0, width, lazy)) | (rounder.cuts(start, start + width) if rounder is not None else set())
    bounds = sorted(cuts) + [width]
    for s0, s1 in zip(bounds, bounds[1:]):
        for i in range(s0, s1):
            if pattern.is_nm and (i - s0) % pattern.m == 0:
                group = slice(i, i + pattern.m)
                maskT[group] = select(WT[group].T, d[group], start + i).T
                torch.div(maskT[group], d[group].unsqueeze(1), out=scale[group])
            if rounder is None:
                torch.mul(WT[i], scale[i], out=errors[i])
            else:
                q = rounder.round(start + i, WT[i], maskT[i])
                torch.div(WT[i] - q, d[i], out=errors[i])
                WT[i] = q
            if i + 1 < s1:
                WT[i + 1 : s1].addr_(U[i, i + 1 : s1], errors[i], alpha=-1)
        if s1 < width:
            WT[s1:].addmm_(U[s0:s1, s1:].T, errors[s0:s1], alpha=-1)
    if rounder is None:
        WT.masked_fill_(maskT, 0.0)  # exact zeros, not the rounding residue of the updates
    return errors
