"""Writing a pruned and quantized model in compressed-tensors' pack-quantized layout (what vLLM loads as W4A16 or
W8A16), with the ``compressed-tensors`` library's own ``ModelCompressor``.

GPTQ ran on the library's grid (``wanda.quant.QuantGrid`` reproduces its ``calculate_qparams`` and
``quantize``), so each quantized weight is already (code - zero) * scale for the scales GPTQ fitted; those
scales are carried from the pruning run (``QuantizedMatrix``) and written as the module's ``weight_scale``.
The library's compressor then re-derives the codes from the weights and the scales and packs them into int32
words (``weight_packed``); its decompressor gives back our weights bit for bit, and every pruned weight, whose
code is the zero-point, decodes to exactly 0.

The layout is symmetric only: compressed-tensors packs an asymmetric zero-point along the output rows, but its
loader (the path transformers takes) builds the unpacked shape, so transformers refuses the folder; the vLLM
presets W4A16 and W8A16 are symmetric too. The config's ``quantization_config`` is the library's with the
``sparsity_config`` entry removed: vLLM (since 0.24) refuses any checkpoint that has one, even an empty one.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WandaError
from ..models.matrices import PrunableMatrix

log = logging.getLogger(__name__)

__all__ = ["CT_BITS", "check_compressed_tensors", "QuantizedMatrix", "QuantizedModel", "save_compressed_tensors"]

#: ``--wbits`` values the pack-quantized layout is written for (vLLM's W4A16 and W8A16).
CT_BITS = (4, 8)


@dataclass
class QuantizedMatrix:
    """One quantized matrix's grid parameters, as GPTQ fitted them: ``scale`` and ``zero`` (rows, groups),
    float32 (integer-valued ``zero``), for the linear layer ``module`` whose ``weight`` it is (``expert`` is set
    for a slice of a fused expert parameter, which this format does not write)."""

    module: nn.Module
    parameter: str
    expert: int | None
    scale: torch.Tensor
    zero: torch.Tensor

    @classmethod
    def of(cls, matrix: PrunableMatrix, params: list[Any]) -> QuantizedMatrix:
        """From the matrix and GPTQ's list of ``GroupParams`` in column order."""
        scale = torch.cat([p.scale for p in params], dim=1).float()
        zero = torch.cat([p.zero for p in params], dim=1).float()
        return cls(matrix.module, matrix.parameter, matrix.expert, scale, zero)


@dataclass
class QuantizedModel:
    """What the compressed-tensors writer needs beyond the model: every quantized matrix's parameters (by
    matrix name, ``PruneReport.quantized``) and the grid they are on (``--wbits``, ``--groupsize``, ``--sym``)."""

    matrices: dict[str, QuantizedMatrix]
    bits: int
    groupsize: int
    sym: bool


def check_compressed_tensors(quant: Any, save_model: str | None) -> None:
    """Before any work: ``--save_format compressed-tensors`` needs ``--save_model``, ``--wbits`` 4 or 8 with
    ``--sym`` (``quant``: the run's ``QuantSettings``), no ``--gguf_type``, and the library installed."""
    if save_model is None:
        raise WandaError("--save_format compressed-tensors writes --save_model: pass the folder to write")
    if quant.wbits not in CT_BITS or not quant.sym or quant.gguf_type is not None:
        raise WandaError(
            "--save_format compressed-tensors writes the symmetric pack-quantized layout (W4A16, W8A16): pass "
            f"--wbits 4 or 8 with --sym and no --gguf_type, got --wbits {quant.wbits}"
            f"{' --sym' if quant.sym else ''}{f' --gguf_type {quant.gguf_type}' if quant.gguf_type else ''}"
        )
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise WandaError(
            "--save_format compressed-tensors needs the compressed-tensors package: pip install compressed-tensors"
        ) from exc


def _weight_args(bits: int, groupsize: int):
    from compressed_tensors.quantization import QuantizationArgs

    if groupsize == -1:
        return QuantizationArgs(num_bits=bits, type="int", strategy="channel", symmetric=True, dynamic=False)
    return QuantizationArgs(
        num_bits=bits, type="int", strategy="group", group_size=groupsize, symmetric=True, dynamic=False
    )


def save_compressed_tensors(model: nn.Module, tmp: str | Path, quantized: QuantizedModel | None) -> int:
    """Write ``model`` into the folder ``tmp`` (config, safetensors) in pack-quantized form; return how many
    matrices were quantized. The model itself is left as it is (the library compresses a copy)."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    except ImportError as exc:
        raise WandaError(
            "--save_format compressed-tensors needs the compressed-tensors package: pip install compressed-tensors"
        ) from exc
    if quantized is None:
        raise WandaError("--save_format compressed-tensors writes a quantized model: pass --wbits 4 or 8 with --sym")
    bits, groupsize, sym = quantized.bits, quantized.groupsize, quantized.sym
    if bits not in CT_BITS or not sym:
        raise WandaError(
            "--save_format compressed-tensors writes the symmetric pack-quantized layout (W4A16, W8A16): pass "
            f"--wbits 4 or 8 with --sym, got --wbits {bits}{' --sym' if sym else ''}"
        )
    names = {id(module): name for name, module in model.named_modules()}
    by_module: dict[str, QuantizedMatrix] = {}
    for matrix_name, q in quantized.matrices.items():
        if q.expert is not None or q.parameter != "weight" or not isinstance(q.module, nn.Linear):
            raise WandaError(
                f"--save_format compressed-tensors writes linear layers; {matrix_name} is a slice of a fused "
                "parameter: save it as dense or compressed"
            )
        if id(q.module) not in names:
            raise WandaError(f"the quantized matrix {matrix_name} is not a module of the model being saved")
        cols = q.module.weight.shape[1]
        if groupsize != -1 and cols % groupsize:
            raise WandaError(
                f"--save_format compressed-tensors needs in_features divisible by --groupsize {groupsize}, but "
                f"{matrix_name} has {cols}"
            )
        by_module[names[id(q.module)]] = q
    if not by_module:
        raise WandaError("--save_format compressed-tensors found no quantized matrix to write (is --wbits set?)")
    ignore = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in by_module)
    # every linear layer but those left out: the shape of llm-compressor's own configs, which vLLM reads
    scheme = QuantizationScheme(targets=["Linear"], weights=_weight_args(bits, groupsize))
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="pack-quantized")
    clone = copy.deepcopy(model)
    apply_quantization_config(clone, config)
    for name, q in by_module.items():
        module = clone.get_submodule(name)
        if getattr(module, "quantization_scheme", None) is None:
            raise WandaError(f"compressed-tensors did not attach a quantization scheme to {name}")
        scale = module.weight_scale
        if tuple(scale.shape) != tuple(q.scale.shape):
            raise WandaError(
                f"{name}: GPTQ fitted scales of shape {tuple(q.scale.shape)}, the format has {tuple(scale.shape)}"
            )
        with torch.no_grad():
            module.weight.data = module.weight.data.float()  # the library quantizes w / scale in w's dtype
            module.weight_scale.data = q.scale.to(module.weight.device).clone()
    compressor = ModelCompressor.from_pretrained_model(clone, "pack-quantized")
    compressor.compress_model(clone)
    clone.save_pretrained(tmp)
    compressor.update_config(str(tmp))
    _drop_sparsity_config(Path(tmp) / "config.json")
    del clone
    return len(by_module)


def _drop_sparsity_config(path: Path) -> None:
    """vLLM refuses any ``sparsity_config`` entry, even the empty one the library writes."""
    data = json.loads(path.read_text())
    data.get("quantization_config", {}).pop("sparsity_config", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
