"""The packed form of a pruned weight: row-major non-zeros + a bitmask + row offsets, and its int8 variant.

Why int8 with per-group scales: decoding is bound by the bytes read per weight. At 50% sparsity fp32 values
cost 0.5 * 4 + 1/8 = 2.125 bytes per weight, bf16 1.125, int8 codes 0.5 + 1/8 + 4/G (one fp32 scale per G
columns of a row: 0.656 at G = 128). The scales are symmetric (no zero-point), so a pruned weight, and any
code 0, is exactly 0, and a weight already on a symmetric grid of the same groups (a GPTQ or round-to-nearest
8-bit or 4-bit result) is represented exactly when its scales are passed in.
"""

from __future__ import annotations

import torch

from ..utils.declare import require

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
VALUE_PAD = 16  # zeros after the last value, so vector loads of 8/16 lanes stay inside the buffer
ROW_ALIGN_BYTES = 8  # mask row width in bytes is a multiple of this (whole 16-bit and 64-bit words)
DEFAULT_GROUPSIZE = 128
QMAX = 127  # codes wanda quantizes lie in [-127, 127]; codes read from a file (``pack_codes``) may be -128


def pack_mask(nz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, offsets) of a boolean (out, in) non-zero pattern; bit j of mask byte k is column 8k+j."""
    out_f, in_f = nz.shape
    row_bytes = max(1, -(-in_f // (8 * ROW_ALIGN_BYTES))) * ROW_ALIGN_BYTES
    padded = torch.zeros(out_f, row_bytes * 8, dtype=torch.uint8)
    padded[:, :in_f] = nz.to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8)
    mask = (padded.view(out_f, row_bytes, 8) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)
    offsets = torch.zeros(out_f + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(nz.sum(1), 0)
    return mask.contiguous(), offsets


def pack(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, mask, offsets) of a dense (out, in) weight with fp32 or bf16 values."""
    w = weight.detach().to(dtype)
    nz = w != 0
    mask, offsets = pack_mask(nz)
    values = torch.cat([w[nz], torch.zeros(VALUE_PAD, dtype=dtype)])
    return values.contiguous(), mask, offsets


def check_groupsize(groupsize: int) -> None:
    """A group must be whole mask bytes (so a kernel applies one scale per byte's weights)."""
    require(
        isinstance(groupsize, int) and groupsize >= 8 and groupsize % 8 == 0,
        f"int8 groupsize must be a positive multiple of 8, got {groupsize!r}",
    )


def check_scales(scales: torch.Tensor | None, out_f: int, in_f: int, groupsize: int) -> None:
    require(scales is not None, "int8 values need scales (fp32, one per row and group of columns)")
    assert scales is not None
    shape = (out_f, -(-in_f // groupsize))
    require(
        tuple(scales.shape) == shape,
        f"int8 scales must have shape {shape} (rows, ceil({in_f} / groupsize {groupsize})), got {tuple(scales.shape)}",
    )
    require(scales.dtype == torch.float32, f"int8 scales must be fp32, got {scales.dtype}")
    require(bool(torch.isfinite(scales).all()) and bool((scales >= 0).all()), "int8 scales must be finite and >= 0")


def expand_scales(scales: torch.Tensor, groupsize: int, in_f: int) -> torch.Tensor:
    """The (rows, in_f) scale of every column."""
    return scales.repeat_interleave(groupsize, dim=1)[:, :in_f]


def rtn_scales(weight: torch.Tensor, groupsize: int) -> torch.Tensor:
    """Round-to-nearest scales: max |w| / 127 per (row, group); 0 for a group of zeros."""
    out_f, in_f = weight.shape
    groups = -(-in_f // groupsize)
    padded = torch.zeros(out_f, groups * groupsize, dtype=torch.float32)
    padded[:, :in_f] = weight.float().abs()
    return (padded.view(out_f, groups, groupsize).amax(-1) / QMAX).contiguous()


def quantize(weight: torch.Tensor, scales: torch.Tensor, groupsize: int, clamp: bool) -> torch.Tensor:
    """int8 codes round(w / scale) (torch.round: halves to even), 0 where the scale is 0. ``clamp``: codes
    outside [-127, 127] are clamped (round-to-nearest scales, where only rounding can reach 127.5); else such a
    code, or a non-zero weight in a group of scale 0, means the weight is not on the scales' grid: refused."""
    w = weight.float()
    s = expand_scales(scales, groupsize, w.shape[1])
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0)
    if clamp:
        q = q.clamp(-QMAX, QMAX)
    else:
        outside = (q.abs() > QMAX) | ((s == 0) & (w != 0))
        require(
            not bool(outside.any()),
            f"{int(outside.sum())} weights lie outside the given scales' int8 range (|w / scale| > 127.5, "
            "or a non-zero weight in a group of scale 0)",
        )
    return q.to(torch.int8)


def pack_int8(
    weight: torch.Tensor, groupsize: int, scales: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, mask, offsets, scales) of a dense (out, in) weight. The mask is the weight's own non-zeros, so a
    kept weight that rounds to code 0 still counts as kept (the sparsity of the packed form is the pruner's)."""
    check_groupsize(groupsize)
    out_f, in_f = weight.shape
    w = weight.detach().float()
    given = scales is not None
    if scales is None:
        scales = rtn_scales(w, groupsize)
    else:
        check_scales(scales, out_f, in_f, groupsize)
        scales = scales.detach().cpu().contiguous()
    codes = quantize(w, scales, groupsize, clamp=not given)
    nz = w != 0
    mask, offsets = pack_mask(nz)
    values = torch.cat([codes[nz], torch.zeros(VALUE_PAD, dtype=torch.int8)])
    return values.contiguous(), mask, offsets, scales


def pack_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, mask, offsets) of int8 codes already on their grid (a quantized checkpoint's code minus its
    zero-point): taken as they are, -128 included (compressed-tensors' 8-bit symmetric grid reaches it, and
    the kernels widen every code to fp32 exactly). Code 0 is a pruned weight: that is what it decodes to."""
    require(codes.dtype == torch.int8 and codes.dim() == 2, f"codes must be 2-D int8, got {codes.dtype}")
    nz = codes != 0
    mask, offsets = pack_mask(nz)
    values = torch.cat([codes[nz], torch.zeros(VALUE_PAD, dtype=torch.int8)])
    return values.contiguous(), mask, offsets


def codes_on_grid(weight: torch.Tensor, scales: torch.Tensor, groupsize: int) -> torch.Tensor | str:
    """The int8 codes c with c * scale == weight bit for bit (one fp32 product, as every decompression
    computes it), or why there are none: a weight off the grid of these scales (a bf16 weight rounds the
    product), or a code beyond [-128, 127] (an 8-bit asymmetric grid's code minus zero-point)."""
    w = weight.float()
    s = expand_scales(scales.float(), groupsize, w.shape[1])
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0)
    if bool((q.abs() > 128).any()) or bool((q == 128).any()):
        return "codes beyond int8 (more than 127 steps of its scale from 0)"
    if not torch.equal(q * s, w):
        return "weights off the recorded grid (not code x scale in fp32)"
    return q.to(torch.int8)
