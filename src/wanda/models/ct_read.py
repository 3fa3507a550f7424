"""Reading a compressed-tensors pack-quantized folder one linear layer at a time, for the sparse kernel.

Why: such a folder (``--save_format compressed-tensors``, or llm-compressor's W4A16/W8A16) already holds each
weight as integer codes and per-group scales, which is the int8 ``SparseLinear``'s own form: weight =
(code - zero-point) * scale. Taking the codes as they are keeps the file's weights exactly (the library's
decompressor computes the same one fp32 product) at a quarter of the fp32 bytes, where decompressing and
re-quantizing would need the dense model and could move a weight off its grid. The codes are unpacked with
the library's own ``unpack_from_int32`` (its documented layout), and every weight that stays dense or keeps
float values is the library's ``PackedQuantizationCompressor.decompress``.

When int8 cannot hold a grid the layer keeps float values (the decompressed weights), and ``int8_reason``
says why: an 8-bit asymmetric grid (code - zero-point spans [-255, 255]), groups that are not whole mask bytes
(a multiple of 8 columns: the kernels apply one scale per byte), a strategy other than group, channel or
tensor. One scale per row (channel, tensor) becomes one group of ``in_features`` rounded up to a multiple of
8, which the kernels allow (the columns past ``in_features`` have no mask bits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WandaError
from .checkpoint import Checkpoint

__all__ = ["CT_METHOD", "CTReader", "ct_config"]

CT_METHOD = "compressed-tensors"
_INT8_STRATEGIES = ("group", "channel", "tensor")
_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def ct_config(folder: str | Path) -> dict | None:
    """The ``quantization_config`` of ``folder``'s config.json when compressed-tensors wrote it, else None."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) and quant.get("quant_method") == CT_METHOD else None


@dataclass
class Codes:
    """One layer's int8 form: ``codes`` (out, in) = code - zero-point, ``scales`` fp32 (out, groups) and the
    columns per scale."""

    codes: torch.Tensor
    scales: torch.Tensor
    groupsize: int


class CTReader:
    """The quantized linears of a pack-quantized folder: which they are (the config's targets and ignore list,
    matched as the library matches them), and each one's codes or decompressed weight, read on demand."""

    def __init__(self, folder: Path, raw: Checkpoint, model: nn.Module, quant: dict):
        try:
            from compressed_tensors.quantization import QuantizationConfig
            from compressed_tensors.utils.match import is_match
        except ImportError as exc:
            raise WandaError(
                f"{folder} is a compressed-tensors folder; reading it needs the compressed-tensors package: "
                "pip install compressed-tensors"
            ) from exc
        try:
            config = QuantizationConfig.model_validate(quant)
        except ValueError as exc:
            raise WandaError(f"{folder}: config.json's quantization_config: {exc}".splitlines()[0]) from exc
        sparsity = quant.get("sparsity_config") or {}
        if sparsity.get("format", "dense") != "dense":
            raise WandaError(f"{folder}: compressed-tensors sparsity format {sparsity['format']!r} is not read here")
        self.folder, self.raw = folder, raw
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.schemes: dict = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            scheme = next(
                (s for s in config.config_groups.values() if is_match(name, module, s.targets, config.ignore or [])),
                None,
            )
            if scheme is None or scheme.weights is None:
                continue
            fmt = str(getattr(scheme.format, "value", scheme.format) or config.format)
            if fmt != "pack-quantized":
                raise WandaError(
                    f"{folder}: {name} is stored as compressed-tensors {fmt!r}; the sparse kernel reads "
                    "pack-quantized folders (--save_format compressed-tensors)"
                )
            self.schemes[name] = scheme

    def quantized(self, name: str) -> bool:
        return name in self.schemes

    def int8_reason(self, name: str) -> str | None:
        """Why this layer's grid cannot be int8 codes with fp32 scales, or None when it can."""
        args = self.schemes[name].weights
        strategy = str(getattr(args.strategy, "value", args.strategy))
        if strategy not in _INT8_STRATEGIES:
            return f"the {strategy} strategy has no per-row groups of columns"
        if strategy == "group" and args.group_size % 8:
            return f"groups of {args.group_size} columns are not a multiple of 8 (one scale per mask byte)"
        if not args.symmetric and args.num_bits >= 8:
            return f"{args.num_bits}-bit asymmetric codes minus their zero-point span beyond int8"
        if not args.symmetric and strategy == "tensor":
            return "an asymmetric per-tensor zero-point is not read as int8"
        return None

    def _key(self, name: str, part: str) -> str:
        """The checkpoint's key for ``part`` of the module ``name`` (with or without the model's prefix)."""
        candidates = [f"{name}.{part}", f"{self.prefix}.{name}.{part}"]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(f"{name[len(self.prefix) + 1 :]}.{part}")
        return next((c for c in candidates if c in self.raw), candidates[0])

    def read(self, name: str) -> dict[str, torch.Tensor]:
        """The module's stored tensors under their local names (``weight_packed``, ``weight_scale``, ...)."""
        keys = {part: self._key(name, part) for part in _PARTS}
        missing = [keys[p] for p in _PARTS[:3] if keys[p] not in self.raw]
        if missing:
            raise WandaError(f"the compressed-tensors checkpoint in {self.folder} lacks {', '.join(missing)}")
        stored = self.raw.read([k for k in keys.values() if k in self.raw])
        return {part: stored[key] for part, key in keys.items() if key in stored}

    def decompress(self, name: str, local: dict[str, torch.Tensor]) -> torch.Tensor:
        """The library's decompressed weight of the module."""
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        try:
            return PackedQuantizationCompressor.decompress(dict(local), self.schemes[name])["weight"]
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise WandaError(f"{self.folder}: {name}: could not decompress: {exc}".splitlines()[0]) from exc

    def codes(self, name: str, local: dict[str, torch.Tensor], shape: tuple[int, int]) -> Codes:
        """The module's codes minus zero-points as int8, its scales as fp32 (bf16/fp16 scales widen exactly)."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        args = self.schemes[name].weights
        out_f, in_f = shape
        stored = tuple(int(d) for d in local["weight_shape"].tolist())
        strategy = str(getattr(args.strategy, "value", args.strategy))
        groupsize = args.group_size if strategy == "group" else -(-in_f // 8) * 8
        groups = -(-in_f // groupsize)
        scales = local["weight_scale"].to(torch.float32)
        if strategy == "tensor":
            scales = scales.reshape(1, 1).expand(out_f, 1)
        if stored != shape or tuple(scales.shape) != (out_f, groups):
            raise WandaError(
                f"{self.folder}: {name} stores shape {list(stored)} with scales {list(scales.shape)}; the model "
                f"has {list(shape)} and {args.num_bits}-bit {strategy} quantization needs scales {[out_f, groups]}"
            )
        try:
            codes = unpack_from_int32(local["weight_packed"], args.num_bits, torch.Size(shape)).to(torch.int16)
            if not args.symmetric:
                zero = unpack_from_int32(local["weight_zero_point"], args.num_bits, torch.Size((out_f, groups)), 0)
                codes -= zero.to(torch.int16).repeat_interleave(groupsize, dim=1)[:, :in_f]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise WandaError(f"{self.folder}: {name}: could not unpack the codes: {exc}".splitlines()[0]) from exc
        return Codes(codes.to(torch.int8), scales.contiguous(), groupsize)
