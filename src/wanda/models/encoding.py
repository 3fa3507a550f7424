"""The tensor encodings of the compressed format, one tensor at a time.

``dense``
    the tensor as it is (embeddings, norms, anything not sparse enough to gain).
``bitmask``
    the non-zero values in row-major order, (nnz,), plus a bitmask of the whole tensor, one bit per
    entry, packed 8 per byte with ``numpy.packbits``: nnz * itemsize + ceil(numel / 8) bytes.
``2:4`` (read only)
    2 values and two 2-bit positions per group of 4: numel / 2 * itemsize + numel / 8 bytes, never smaller
    than the bitmask's because a 2:4 tensor has nnz <= numel / 2; earlier versions wrote it.

"Zero" means all bits zero, so ``-0.0`` is kept as a value and decoding rebuilds every tensor bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import WandaError

__all__ = ["Encoding", "EncodedTensor", "encode_tensor", "decode_tensor", "same_bits", "dtype_name", "parse_dtype"]

Encoding = Literal["dense", "bitmask", "2:4"]
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class EncodedTensor:
    """One tensor in one encoding: ``parts`` are what goes into the safetensors file under ``key::part``."""

    encoding: Encoding
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _nonzero(tensor: torch.Tensor) -> torch.Tensor:
    """True where any bit is set: ``-0.0`` counts as a value, so decoding is bit-exact."""
    view = _INT_VIEW.get(tensor.element_size())
    if view is None:
        raise WandaError(f"cannot encode a tensor of dtype {tensor.dtype} sparsely; only 2, 4 or 8-byte floats")
    return tensor.contiguous().view(view) != 0


def _encode_bitmask(tensor: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    bits = np.packbits(keep.reshape(-1).numpy())  # (ceil(numel / 8),) uint8, big-endian bit order
    return {"values": tensor[keep].contiguous(), "bitmask": torch.from_numpy(bits)}


def _decode_bitmask(parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    keep = torch.from_numpy(np.unpackbits(parts["bitmask"].numpy(), count=numel).astype(bool)).reshape(shape)
    values = parts["values"]
    if int(keep.sum()) != values.numel():
        raise WandaError(f"corrupt bitmask tensor: {int(keep.sum())} bits set but {values.numel()} values stored")
    out = torch.zeros(shape, dtype=dtype)
    out[keep] = values  # boolean-mask assignment fills in row-major order, the order _encode_bitmask read
    return out


def _decode_24(parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    rows, cols = shape
    packed = parts["indices"]
    flat = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).reshape(-1)
    index = flat[: rows * cols // 2].to(torch.int64).reshape(rows, cols // 4, 2)
    if not bool((index[..., 0] < index[..., 1]).all()):
        raise WandaError("corrupt 2:4 tensor: the two positions of a group must be distinct and ascending")
    out = torch.zeros(rows, cols // 4, 4, dtype=dtype)
    out.scatter_(-1, index, parts["values"].reshape(rows, cols // 4, 2))
    return out.reshape(rows, cols)


def encode_tensor(tensor: torch.Tensor) -> EncodedTensor:
    """The smaller exact encoding of ``tensor`` (a tie goes to the bitmask)."""
    tensor = tensor.detach().cpu().contiguous()
    shape, dtype = tuple(tensor.shape), tensor.dtype
    dense = EncodedTensor("dense", shape, dtype, {"data": tensor})
    if not tensor.is_floating_point() or tensor.element_size() not in _INT_VIEW or tensor.numel() == 0:
        return dense
    keep = _nonzero(tensor)
    nnz = int(keep.sum())
    numel, itemsize = tensor.numel(), tensor.element_size()
    sizes = {"dense": numel * itemsize, "bitmask": nnz * itemsize + math.ceil(numel / 8)}
    if sizes["dense"] < sizes["bitmask"]:
        return dense
    return EncodedTensor("bitmask", shape, dtype, _encode_bitmask(tensor, keep))


def _expected_parts(encoding: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...] | None]:
    """The stored parts of an encoding and their shapes (``None``: checked against the bitmask)."""
    numel = math.prod(shape)
    if encoding == "dense":
        return {"data": shape}
    if encoding == "bitmask":
        return {"values": None, "bitmask": (math.ceil(numel / 8),)}
    if encoding == "2:4":
        if len(shape) != 2 or shape[1] % 4:
            raise WandaError(f"corrupt compressed checkpoint: a 2:4 tensor of shape {shape}")
        return {"values": (shape[0], shape[1] // 2), "indices": (math.ceil(numel // 2 / 4),)}
    raise WandaError(f"unknown tensor encoding {encoding!r} in a compressed checkpoint; upgrade wanda")


def decode_tensor(
    encoding: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    expected = _expected_parts(encoding, shape)
    if set(parts) != set(expected):
        raise WandaError(
            f"corrupt compressed checkpoint: {encoding} tensor with parts {sorted(parts)}, expected {sorted(expected)}"
        )
    for part, part_shape in expected.items():
        if part_shape is not None and tuple(parts[part].shape) != part_shape:
            raise WandaError(
                f"corrupt compressed checkpoint: {encoding} part {part} has shape "
                f"{tuple(parts[part].shape)}, expected {part_shape} for a tensor of shape {shape}"
            )
    for part in ("data", "values"):
        if part in parts and parts[part].dtype != dtype:
            raise WandaError(f"corrupt compressed checkpoint: {part} stored as {parts[part].dtype}, expected {dtype}")
    if encoding == "dense":
        out = parts["data"]
    elif encoding == "bitmask":
        out = _decode_bitmask(parts, shape, dtype)
    else:  # "2:4" (written by earlier versions), the only other encoding _expected_parts accepts
        out = _decode_24(parts, shape, dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise WandaError(f"corrupt compressed tensor: decoded {tuple(out.shape)} {out.dtype}, expected {shape} {dtype}")
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``torch.equal`` would call NaN != NaN and -0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INT_VIEW.get(a.element_size()) if a.is_floating_point() else None
    if view is None:
        return torch.equal(a.cpu(), b.cpu())
    return torch.equal(a.detach().cpu().contiguous().view(view), b.detach().cpu().contiguous().view(view))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WandaError(f"unknown dtype {name!r} in a compressed checkpoint")
    return dtype
