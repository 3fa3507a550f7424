"""Weight quantization grids that hold zero exactly, so that quantizing a pruned layer keeps every pruned zero.

A grid quantizes a weight matrix (rows x cols) in groups of ``groupsize`` consecutive input columns per row
(``-1``: one group per row). Each (row, group) has its own scale, and for asymmetric grids an integer zero-point,
fitted from that group's weights (``fit``); ``encode`` maps weights to integer codes, ``decode`` codes back to
values, and ``quantize`` is plain round-to-nearest of a whole matrix. GPTQ (Frantar et al., ICLR 2023) fits a
group's parameters when its column loop reaches the group's first column, so the fitting and the rounding are
kept apart here.

Zero is on every grid: the asymmetric zero-point is an integer code (as in GPTQ), symmetric codes are centred
on 0 (the integer grid is compressed-tensors', see ``QuantGrid``), and the two GGUF types chosen here (Q8_0, Q4_0: llama.cpp's formats) are the ones whose grid contains 0.
The GGUF grids reproduce ``gguf.quants`` operation by operation (float32 arithmetic, fp16 scales), so their
values are bit-identical to ``gguf.quants.dequantize(gguf.quants.quantize(w))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import WandaError

__all__ = ["BITS", "Q4_0", "Q8_0", "GGUFGrid", "Grid", "GroupParams", "QuantGrid"]

#: Bit widths of the integer grids.
BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GroupParams:
    """One group's parameters for every row: ``scale`` and ``zero`` (float32, shape (rows, 1)); ``inverse`` is
    the multiplier that the GGUF encoders use instead of dividing by the scale (None for the integer grids)."""

    scale: torch.Tensor
    zero: torch.Tensor
    inverse: torch.Tensor | None = None


class Grid:
    """What GPTQ needs of a grid: the group width, fitting a group, and encoding/decoding with fixed parameters."""

    groupsize: int = -1

    def group_width(self, cols: int) -> int:
        """Columns per group for a layer with ``cols`` input columns."""
        return cols if self.groupsize == -1 else self.groupsize

    def check(self, cols: int) -> None:
        """Raise WandaError if a layer with ``cols`` input columns cannot use this grid."""

    def fit(self, w: torch.Tensor) -> GroupParams:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def column(self, params: GroupParams) -> GroupParams:
        """The parameters of one column of the group (shape (rows,)), for rounding the column loop's columns."""
        return GroupParams(*(None if t is None else t[:, 0] for t in (params.scale, params.zero, params.inverse)))

    def round(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """The nearest grid values of ``w`` (float32) under fixed parameters."""
        return self.decode(self.encode(w, params), params)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest of a whole matrix: each group fitted from its own weights; values on the grid (float32;
        float64 for a float64 weight on an integer grid, whose arithmetic then runs in float64)."""
        w = _working(weight.detach())
        cols = w.shape[1]
        self.check(cols)
        g = self.group_width(cols)
        out = torch.empty_like(w)
        for start in range(0, cols, g):
            block = w[:, start : start + g]
            out[:, start : start + g] = self.round(block, self.fit(block))
        return out


@dataclass(frozen=True)
class QuantGrid(Grid):
    """The integer grid of GPTQ in compressed-tensors' own formulas (``calculate_qparams`` and ``quantize`` of its
    pack-quantized format, the layout vLLM's WNA16 kernels read): ``bits`` in {2, 3, 4, 8}, ``groupsize`` columns
    per group (-1: per row). Codes are signed, qmin = -2^(bits-1) .. qmax = 2^(bits-1) - 1.

    With lo = min(w_min, 0) and hi = max(w_max, 0) of a group: symmetric, scale = max(|lo|, |hi|) / ((2^bits - 1)
    / 2) and zero-point 0; asymmetric, scale = (hi - lo) / (2^bits - 1) and zero-point round(clamp(qmin - lo /
    scale, qmin, qmax)), an integer. Codes are round(clamp(w / scale + zero, qmin, qmax)) and values (code - zero)
    * scale, so the weight 0 has the code ``zero`` and decodes to 0 exactly. A group of zeros gets the scale
    float32's eps (the library's guard against dividing by 0) and zero-point 0. Every operation is the library's,
    in the same order and float32 (float64 for a float64 weight), so a weight GPTQ put on this grid is written to
    the compressed-tensors file and decoded by the library bit for bit (``wanda.export.compressed_tensors``).
    """

    bits: int = 4
    groupsize: int = 128
    sym: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise WandaError(f"quantization bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if not (self.groupsize == -1 or self.groupsize >= 1):
            raise WandaError(f"quantization groupsize must be -1 (per row) or a positive integer, got {self.groupsize}")

    @property
    def qmin(self) -> float:
        return -(2.0**self.bits) / 2

    @property
    def qmax(self) -> float:
        return 2.0**self.bits / 2 - 1

    def fit(self, w: torch.Tensor) -> GroupParams:
        w = _working(w)
        zeros = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        lo = torch.minimum(w.amin(dim=1, keepdim=True), zeros)
        hi = torch.maximum(w.amax(dim=1, keepdim=True), zeros)
        levels = torch.tensor(self.qmax - self.qmin, dtype=torch.float32).to(w.dtype)  # the library's float32 range
        if self.sym:
            scale = torch.maximum(lo.abs(), hi.abs()) / (levels / 2)
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / levels
            with torch.no_grad():
                zero = torch.round(torch.clamp(self.qmin - lo / scale, self.qmin, self.qmax))
            zero = torch.where(scale == 0, torch.zeros_like(zero), zero)  # 0 / 0: any integer decodes 0 to 0
        scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(w.dtype).eps), scale)
        return GroupParams(scale, zero)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return torch.round(torch.clamp(_working(w) / params.scale + params.zero, self.qmin, self.qmax))

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return (codes.to(params.scale.dtype) - params.zero) * params.scale


@dataclass(frozen=True)
class GGUFGrid(Grid):
    """llama.cpp's Q8_0 or Q4_0 block formats (blocks of 32 weights along a row, fp16 scale per block).

    Q8_0: d = max|w| / 127, codes round(w / d) (half away from zero) as int8, value q * fp16(d).
    Q4_0: d = m / -8 with m the signed weight of largest magnitude, codes trunc(w / d + 8.5) in 0..15, value
    (q - 8) * fp16(d). Codes are computed with the float32 d, values with the fp16 one, as ``gguf.quants`` does.
    Codes are clamped to the format's range (which GPTQ's updated weights can leave; gguf's own never do).
    """

    kind: str = "Q8_0"
    groupsize: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("Q8_0", "Q4_0"):
            raise WandaError(f"GGUF grid must be Q8_0 or Q4_0 (the types whose grid holds zero), got {self.kind}")
        if self.groupsize != 32:
            raise WandaError(f"GGUF {self.kind} uses blocks of 32 weights, got groupsize {self.groupsize}")

    def check(self, cols: int) -> None:
        if cols % 32:
            raise WandaError(f"GGUF {self.kind} needs in_features divisible by 32, but a layer has {cols}")

    def fit(self, w: torch.Tensor) -> GroupParams:
        w = w.float()
        if self.kind == "Q8_0":
            d = w.abs().amax(dim=1, keepdim=True) / 127
            zero = torch.zeros_like(d)
        else:
            m = torch.gather(w, 1, w.abs().argmax(dim=1, keepdim=True))
            d = m / -8
            zero = torch.full_like(d, 8.0)
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        return GroupParams(d.half().float(), zero, inverse)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        x = w.float() * params.inverse
        if self.kind == "Q8_0":
            a = x.abs()
            floored = torch.floor(a)
            q = torch.sign(x) * (floored + torch.floor(2 * (a - floored)))  # gguf's np_roundf
            return q.clamp(-128, 127) + 0.0  # -0.0 -> 0.0, as gguf's int8 codes have no sign of zero
        return torch.trunc(x + 8.5).clamp(0, 15)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return (codes - params.zero) * params.scale


def _working(w: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (for exact comparisons in tests); everything else is computed in float32."""
    return w if w.dtype == torch.float64 else w.float()


#: The two GGUF grids.
Q8_0 = GGUFGrid("Q8_0")
Q4_0 = GGUFGrid("Q4_0")
