"""SparseLinear: a pruned linear layer kept as bitmask + non-zero values, with compiled CPU decode kernels.

Why: decoding reads each weight once per token, so its speed is set by memory bandwidth. At 50% sparsity an
fp32 matrix stored as non-zeros plus a one-bit mask is 2.125 bytes per weight instead of 4 (bf16: 1.125
instead of 2; int8 codes with one fp32 scale per G columns: 0.5 + 1/8 + 4/G). The compiled kernels stream
that compressed form directly; prefill (many tokens) is compute bound, so it decompresses small row tiles
into a scratch buffer and uses the dense matmul.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..utils.declare import require
from . import packing
from .load_rule import MIN_SPARSITY, dense_reason, describe_dense, min_weights

log = logging.getLogger(__name__)

KERNEL_PATHS = ("auto", "reference", "portable", "avx2", "avx512")
_COMPILED = ("avx512", "avx2", "portable")  # auto picks the first this CPU supports
_DECODE_MAX_ROWS = 8  # more tokens than this: tile-decompress + dense matmul
_TILE_ROWS = 64  # the reference path's tile (Python decompression; small, it is only for checks)
#: Rows per tile of the compiled prefill: one BLAS call per tile. 512 rows keep the call efficient (the
#: matmul's n dimension) while the scratch tile stays a few MB (512 x 4096 fp32 = 8 MB, 512 x 11008 = 22.5 MB).
PREFILL_TILE_ROWS = 512
#: Below this many weights x tokens a decode call runs on one thread: waking the pool costs more than the
#: second core saves on a matrix that small (e.g. a 192x576 k/v projection is 110 K weights).
DECODE_MIN_PARALLEL = 262144

_forced: str | None = None
_ext: ModuleType | None = None
_ext_failed = False
#: (forced, $WANDA_SPARSE_KERNEL) -> (path name, path id or -1 for the reference): resolved once, not per call
_resolved: dict[tuple[str | None, str | None, ModuleType | None], tuple[str, int]] = {}


def _cache_dir() -> Path:
    base = os.environ.get("WANDA_CACHE")
    root = Path(base) / "kernels" if base else Path.home() / ".cache" / "wanda" / "kernels"
    return root


def _load_extension() -> ModuleType | None:
    """Build (once, cached on disk) and import the C++ extension; None with one warning if that fails."""
    global _ext, _ext_failed
    if _ext is not None or _ext_failed:
        return _ext
    src = Path(__file__).with_name("sparse_kernels.cpp")
    try:
        from torch.utils.cpp_extension import load

        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        build = _cache_dir() / f"sparse_{digest}"
        build.mkdir(parents=True, exist_ok=True)
        _ext = load(
            name=f"wanda_sparse_{digest}",
            sources=[str(src)],
            build_directory=str(build),
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - compiler missing, build error, ...: the reference path still works
        _ext_failed = True
        warnings.warn(
            f"wanda sparse kernels could not be built ({type(exc).__name__}: {exc}); "
            "using the pure-PyTorch reference path",
            RuntimeWarning,
            stacklevel=2,
        )
    return _ext


def available_paths() -> list[str]:
    """Kernel paths that run on this machine, reference first."""
    ext = _load_extension()
    paths = ["reference"]
    if ext is not None:
        paths += [p for p in ("portable", "avx2", "avx512") if ext.cpu_has(p)]
    return paths


def set_kernel_path(name: str | None) -> None:
    """Force a kernel path for every SparseLinear (None or "auto": choose from the CPU's flags).

    Raises ValueError for an unknown name and RuntimeError for a path this machine cannot run.
    """
    global _forced
    if name is None or name == "auto":
        _forced = None
        return
    _check_path(name)
    _forced = name


def _resolve() -> tuple[str, int]:
    """(path name, extension path id; -1 = reference) for the current forcing, cached per forcing value and
    extension: get_kernel_path checks the CPU's flags, far too slow to repeat on every decode call."""
    env = os.environ.get("WANDA_SPARSE_KERNEL")
    hit = _resolved.get((_forced, env, _ext))
    if hit is None:
        name = get_kernel_path()  # may build the extension: the key is taken after, with _ext as it now is
        hit = (name, -1 if name == "reference" else int(_ext.path_id(name)))  # type: ignore[union-attr]
        _resolved[(_forced, env, _ext)] = hit
    return hit


def _check_path(name: str) -> None:
    if name not in KERNEL_PATHS:
        raise ValueError(f"unknown sparse kernel path {name!r}; choose one of {', '.join(KERNEL_PATHS)}")
    if name in ("auto", "reference"):
        return
    ext = _load_extension()
    if ext is None:
        raise RuntimeError(f"sparse kernel path {name!r} needs the compiled extension, which failed to build")
    if not ext.cpu_has(name):
        raise RuntimeError(f"sparse kernel path {name!r} is not supported by this CPU")


def get_kernel_path() -> str:
    """The path in use: set_kernel_path's, else $WANDA_SPARSE_KERNEL's, else the best this CPU supports."""
    name = _forced or os.environ.get("WANDA_SPARSE_KERNEL", "auto").strip().lower() or "auto"
    if name != "auto":
        _check_path(name)
        return name
    ext = _load_extension()
    if ext is None:
        return "reference"
    return next(p for p in _COMPILED if ext.cpu_has(p))


class SparseLinear(nn.Module):
    """A linear layer whose pruned weight is stored as concatenated row-major non-zeros + a packed bitmask.

    Buffers: ``values`` (fp32, bf16 or int8 codes: the non-zeros of row 0, then row 1, ..., plus a little zero
    padding), ``mask`` (uint8, out x row_bytes, bit j of byte k marks column 8k+j), ``offsets`` (int64, out+1,
    start of each row in ``values``), optional ``bias`` and, with int8 values only, ``scales`` (fp32, out x
    ceil(in / groupsize)): weight[r, c] = code * scales[r, c // groupsize]. forward accumulates in fp32 and
    returns the input dtype.
    """

    def __init__(
        self,
        values: torch.Tensor,
        mask: torch.Tensor,
        offsets: torch.Tensor,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        groupsize: int = packing.DEFAULT_GROUPSIZE,
    ) -> None:
        super().__init__()
        if values.dtype not in packing.VALUE_DTYPES:
            raise TypeError(f"SparseLinear values must be fp32, bf16 or int8, got {values.dtype}")
        quantized = values.dtype == torch.int8
        if quantized:
            packing.check_groupsize(groupsize)
            packing.check_scales(scales, out_features, in_features, groupsize)
        else:
            require(scales is None, f"scales are only for int8 values, not {values.dtype}")
        self.in_features = in_features
        self.out_features = out_features
        #: columns per scale (int8 values); None for fp32/bf16
        self.groupsize: int | None = groupsize if quantized else None
        self.register_buffer("values", values)
        self.register_buffer("scales", scales.contiguous() if quantized else None)
        self.register_buffer("mask", mask)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        groupsize: int = packing.DEFAULT_GROUPSIZE,
        scales: torch.Tensor | None = None,
    ) -> SparseLinear:
        """Compress an nn.Linear (its bias included) or an (out, in) weight; dtype defaults to the weight's
        own when that is fp32/bf16, else fp32. ``dtype=torch.int8``: codes with one scale per ``groupsize``
        columns of a row, round-to-nearest (max |w| / 127 per group) unless ``scales`` are given, in which
        case a weight on that grid is kept exactly (see ``packing.pack_int8``)."""
        if isinstance(linear_or_weight, nn.Linear):
            weight = linear_or_weight.weight
            if bias is None:
                bias = linear_or_weight.bias
        else:
            weight = linear_or_weight
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        if dtype is None:
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.bfloat16) else torch.float32
        weight = weight.detach().cpu()
        out_f, in_f = weight.shape
        bias = None if bias is None else bias.detach().cpu()
        if dtype == torch.int8:
            values, mask, offsets, scales = packing.pack_int8(weight, groupsize, scales)
            return cls(values, mask, offsets, in_f, out_f, bias, scales, groupsize)
        require(dtype in packing.VALUE_DTYPES, f"SparseLinear values must be fp32, bf16 or int8, not {dtype}")
        require(scales is None, f"scales are only for int8 values, not {dtype}")
        values, mask, offsets = packing.pack(weight, dtype)
        return cls(values, mask, offsets, in_f, out_f, bias)

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    def _dense_rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows r0:r1 of the weight as dense fp32 by PyTorch operations (the reference decompression; written
        into ``out`` when given, a scratch tile)."""
        shifts = torch.arange(8, dtype=torch.uint8)
        bits = ((self.mask[r0:r1, :, None] >> shifts) & 1).reshape(r1 - r0, -1)[:, : self.in_features].bool()
        tile = out if out is not None else torch.empty(r1 - r0, self.in_features, dtype=torch.float32)
        tile.zero_()
        tile[bits] = self.values[int(self.offsets[r0]) : int(self.offsets[r1])].to(torch.float32)
        if self.scales is not None:  # one fp32 product per weight, as the compiled decompressions do
            tile.mul_(packing.expand_scales(self.scales[r0:r1], self.groupsize, self.in_features))
        return tile

    def decompress(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 of the weight as dense fp32 by the current kernel path's decompression (the routine the
        compiled prefill uses on its scratch tiles), so every path can be checked against the reference."""
        r1 = self.out_features if r1 is None else r1
        if not 0 <= r0 <= r1 <= self.out_features:
            raise ValueError(f"row range {r0}:{r1} outside 0:{self.out_features}")
        _, path = _resolve()
        if path < 0:
            return self._dense_rows(r0, r1)
        assert _ext is not None
        return _ext.decompress(
            self.values, self.mask, self.offsets, self.scales, self.groupsize or 0, r0, r1, self.in_features, path
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the weight this layer stands for: the values' (fp32 for int8 codes times scales)."""
        return torch.float32 if self.values.dtype == torch.int8 else self.values.dtype

    def to_dense(self) -> torch.Tensor:
        """The full (out, in) weight in ``weight_dtype`` (for checks; forward never builds it)."""
        return self._dense_rows(0, self.out_features).to(self.weight_dtype)

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        scratch = torch.empty(min(_TILE_ROWS, self.out_features), self.in_features, dtype=torch.float32)
        for r0 in range(0, self.out_features, _TILE_ROWS):
            r1 = min(r0 + _TILE_ROWS, self.out_features)
            tile = self._dense_rows(r0, r1, scratch[: r1 - r0])
            torch.matmul(x2, tile.T, out=y[:, r0:r1])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, path = _resolve()
        if path >= 0:  # one call into the extension: shape checks, dtype, padding, bias all happen there
            assert _ext is not None
            return _ext.sparse_linear(
                x,
                self.values,
                self.mask,
                self.offsets,
                self.bias,
                self.scales,
                self.groupsize or 0,
                self.in_features,
                path,
                _DECODE_MAX_ROWS,
                PREFILL_TILE_ROWS,
                DECODE_MIN_PARALLEL,
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dimension {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self._reference(x.reshape(-1, self.in_features).to(torch.float32))
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.nnz / max(total, 1):.3f}, dtype={self.values.dtype}, bias={self.bias is not None}"
            + ("" if self.groupsize is None else f", groupsize={self.groupsize}")
        )


def scratch_bytes() -> int:
    """Bytes of the compiled prefill's scratch tile, one buffer shared by every SparseLinear (0 before any
    prefill or without the extension): the only dense weight memory the sparse model ever holds."""
    return 0 if _ext is None else int(_ext.scratch_bytes())


def _tied_weights(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            ids.add(id(mod.weight))
    return ids


def sparsify_linears(
    model: nn.Module,
    min_sparsity: float = MIN_SPARSITY,
    skip_names: tuple[str, ...] = ("lm_head",),
    dtype: torch.dtype | None = None,
    least: int | None = None,
    groupsize: int = packing.DEFAULT_GROUPSIZE,
) -> tuple[int, int]:
    """Replace each nn.Linear that the load rule lets pay (``dense_reason``) by a SparseLinear, in place.

    Skipped: modules whose own name is in ``skip_names`` and any whose weight is tied to an nn.Embedding
    (those stay as they are and are not counted). A matrix with under ``min_sparsity`` zeros or under
    ``least`` weights (None: ``min_weights()``) stays dense: there the sparse form would not decode faster.
    ``dtype=torch.int8`` stores codes with round-to-nearest scales, one per ``groupsize`` columns of a row.
    Returns (converted, kept_dense).
    """
    least = min_weights() if least is None else least
    reasons: dict[str, int] = {}
    tied = _tied_weights(model)
    converted = kept = 0
    targets: list[tuple[nn.Module, str, nn.Linear]] = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child_name not in skip_names and id(child.weight) not in tied:
                targets.append((parent, child_name, child))
    for parent, name, lin in targets:
        reason = dense_reason(lin.weight.detach(), min_sparsity, least)
        if reason is None:
            setattr(parent, name, SparseLinear.from_dense(lin, dtype=dtype, groupsize=groupsize))
            converted += 1
        else:
            kept += 1
            reasons[reason] = reasons.get(reason, 0) + 1
    log.info("%d matrices sparse, %d stayed dense%s", converted, kept, describe_dense(reasons, min_sparsity, least))
    return converted, kept
