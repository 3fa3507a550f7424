"""Building a model whose pruned linear layers are ``SparseLinear`` straight from disk, one tensor at a time.

Why: the point of the sparse kernel is a model that is smaller in memory, so loading it must never hold the
dense model. The skeleton is built on the ``meta`` device (accelerate's ``init_empty_weights``); then each
tensor is read from the checkpoint on its own (a ``--save_format compressed`` folder, decoded from its
bitmask, or a dense safetensors folder whose pruned weights are zeros) and each linear weight is packed into a
``SparseLinear`` before the next is read, so at most one dense matrix exists at any moment. Matrices with
fewer than ``min_sparsity`` zeros or fewer than ``least`` weights (the load rule, ``wanda.kernels.dense_reason``:
there the sparse form would not decode faster), the embeddings and the LM head stay dense.

A compressed-tensors pack-quantized folder (``wanda.models.ct_read``) is read the same way, layer by layer: its
codes and scales become an int8 ``SparseLinear`` as they are (``values="auto"`` or ``"int8"``), so the layer's
weight is the file's, bit for bit; a grid int8 cannot hold keeps float values, and one log line says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import WandaError
from ..kernels import MIN_SPARSITY, SparseLinear, dense_reason, describe_dense, min_weights
from ..kernels.packing import codes_on_grid, pack_codes
from .checkpoint import Checkpoint, file_entries
from .compressed import MANIFEST_NAME, WEIGHTS_NAME, _read_manifest
from .ct_read import Codes, CTReader, ct_config
from .encoding import decode_tensor, parse_dtype
from .grid_record import RecordedGrid, read_grid
from .streaming import assign_tensor, under_model_names

log = logging.getLogger(__name__)

__all__ = ["SPARSE_VALUES", "SparseLoadReport", "load_sparse_model"]

#: ``--sparse_values``: auto (int8 when the folder is quantized), float (the model's dtype), int8
SPARSE_VALUES = ("auto", "float", "int8")


@dataclass
class SparseLoadReport:
    converted: int
    kept_dense: int
    reasons: dict[str, int] = field(default_factory=dict)  # "zeros" / "size" -> matrices kept dense for it
    min_sparsity: float = MIN_SPARSITY
    least: int = 0
    int8: int = 0  # of the converted, those with int8 codes and the file's scales
    float_reasons: dict[str, int] = field(default_factory=dict)  # why quantized matrices kept float values

    def line(self) -> str:
        why = describe_dense(self.reasons, self.min_sparsity, self.least)
        codes = f" ({self.int8} with int8 values)" if self.int8 else ""
        return f"{self.converted} linear matrices sparse{codes}, {self.kept_dense} stayed dense{why}"


def _compressed_reader(folder: Path) -> tuple[Callable[[str], torch.Tensor], list[str], str]:
    """(read one tensor by name, its names, the model class) for a compressed folder."""
    from .checks import check_safetensors, inside

    manifest = _read_manifest(folder)
    weights = inside(folder, str(manifest.get("weights", WEIGHTS_NAME)), str(folder / MANIFEST_NAME))
    if not weights.is_file():
        raise WandaError(f"{folder}: the weights file {weights.name} named by {MANIFEST_NAME} is missing")
    check_safetensors(weights)
    parts = Checkpoint(folder, file_entries(weights))
    aliases: dict[str, str] = dict(manifest.get("aliases", {}))
    tensors: dict[str, dict] = manifest["tensors"]

    def read(name: str) -> torch.Tensor:
        key = aliases.get(name, name)
        entry = tensors[key]
        names = [n for n in parts.names() if n.rpartition("::")[0] == key]
        stored = {n.rpartition("::")[2]: t for n, t in parts.read(names).items()}
        try:
            return decode_tensor(entry["encoding"], stored, tuple(entry["shape"]), parse_dtype(entry["dtype"]))
        except WandaError as exc:
            raise WandaError(f"{folder}: {key}: {exc}") from exc

    return read, [*tensors, *aliases], str(manifest.get("model_class"))


def _skeleton(folder: Path, dtype: torch.dtype, compressed: bool) -> nn.Module:
    """The model of ``folder``'s config on ``meta``: no weight allocated until each is read."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            if compressed:
                _, _, class_name = _compressed_reader(folder)
                model_class = getattr(transformers, class_name, None)
                if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
                    raise WandaError(f"{folder}: model class {class_name} is not in this transformers version")
                model = model_class._from_config(config, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, ImportError) as exc:
        raise WandaError(f"could not build model {folder}: {exc}".splitlines()[0]) from exc
    model.eval()
    return model


def _check_values(values: str, folder: Path, quantized: bool) -> None:
    if values not in SPARSE_VALUES:
        raise WandaError(f"--sparse_values must be one of {', '.join(SPARSE_VALUES)}, got {values!r}")
    if values == "int8" and not quantized:
        raise WandaError(
            f"--sparse_values int8 keeps a quantized folder's codes, but {folder} is not quantized (a "
            "compressed-tensors folder, or a --wbits prune saved dense or compressed with its scales); use "
            "--sparse_values auto or float"
        )


def _int8_layer(
    name: str, lin: nn.Linear, bias: torch.Tensor | None, codes: Codes | str, values: str, report: SparseLoadReport
) -> SparseLinear | None:
    """The int8 layer of ``codes`` when the load rule lets it pay; None for the float path. ``codes`` a string:
    why this matrix has none (counted for the log line; refused under ``--sparse_values int8``)."""
    if isinstance(codes, str):
        if values == "int8":
            raise WandaError(f"--sparse_values int8: {name} cannot be int8: {codes}")
        report.float_reasons[codes] = report.float_reasons.get(codes, 0) + 1
        return None
    if dense_reason(codes.codes, report.min_sparsity, report.least) is not None:
        return None
    report.int8 += 1
    packed = pack_codes(codes.codes)
    return SparseLinear(*packed, lin.in_features, lin.out_features, bias, codes.scales, codes.groupsize)


def _grid_codes(grid: RecordedGrid, name: str, weight: torch.Tensor) -> Codes | str:
    """The recorded grid's codes of a stored weight, or why there are none."""
    out_f, in_f = weight.shape
    groupsize = grid.groupsize_for(in_f)
    if groupsize % 8:
        return f"groups of {groupsize} columns are not a multiple of 8 (one scale per mask byte)"
    scales = grid.scales(name).abs()  # GGUF's Q4_0 scale may be negative: code x -s == -code x s exactly
    if tuple(scales.shape) != (out_f, -(-in_f // groupsize)):
        return f"recorded scales of shape {list(scales.shape)} do not fit a {out_f}x{in_f} weight"
    codes = codes_on_grid(weight, scales, groupsize)
    return codes if isinstance(codes, str) else Codes(codes, scales.contiguous(), groupsize)


def _ct_linear(
    reader: CTReader, name: str, lin: nn.Linear, bias: torch.Tensor | None, values: str, report: SparseLoadReport
) -> SparseLinear | torch.Tensor:
    """An int8 SparseLinear of the layer's codes and scales when its grid allows and the load rule lets it pay,
    else the library's decompressed weight (fp32) for the float path."""
    local = reader.read(name)
    if values != "float":
        why = reader.int8_reason(name)
        codes = why if why is not None else reader.codes(name, local, (lin.out_features, lin.in_features))
        layer = _int8_layer(f"{name} in {reader.folder}", lin, bias, codes, values, report)
        if layer is not None:
            return layer
    return reader.decompress(name, local)


def load_sparse_model(
    folder: str | Path,
    dtype: torch.dtype,
    min_sparsity: float = MIN_SPARSITY,
    least: int | None = None,
    values: str = "auto",
) -> tuple[nn.Module, SparseLoadReport]:
    """The model of ``folder`` on the CPU in ``dtype`` (fp32 or bf16), pruned linears as ``SparseLinear``
    where the load rule says they pay (``least``: the size threshold; None: ``wanda.kernels.min_weights()``).
    ``values``: "auto" (int8 codes for a quantized folder: compressed-tensors pack-quantized, or one with a
    recorded grid; else ``dtype``), "float" or "int8" (refused for a folder that is not quantized, or a matrix
    int8 cannot hold)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise WandaError(f"--sparse_kernel runs fp32 or bf16 models, not {dtype}; use --dtype float32 or bfloat16")
    folder = Path(folder)
    compressed = (folder / MANIFEST_NAME).is_file()
    quant = None if compressed else ct_config(folder)
    grid = read_grid(folder) if quant is None else None
    _check_values(values, folder, quant is not None or grid is not None)
    model = _skeleton(folder, dtype, compressed)
    reader: CTReader | None = None
    if compressed:
        read, names, _ = _compressed_reader(folder)
        available = set(names)
    else:
        raw = Checkpoint.open(folder)
        checkpoint = under_model_names(model, raw)
        available = set(checkpoint.names())
        reader = CTReader(folder, raw, model, quant) if quant is not None else None

        def read(name: str) -> torch.Tensor:
            return checkpoint.read([name])[name]

    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    embeddings = {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings()
    linears = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and id(mod) not in embeddings and mod is not head
    }

    def fetch(name: str, cast: bool = True) -> torch.Tensor:
        module = name.rpartition(".")[0]
        if reader is not None and name.endswith(".weight") and reader.quantized(module):
            return reader.decompress(module, reader.read(module)).to(dtype)
        if name not in available:
            raise WandaError(f"the checkpoint in {folder} lacks {name}")
        tensor = read(name)
        return tensor.to(dtype) if tensor.is_floating_point() and cast else tensor

    least = min_weights() if least is None else least
    report = SparseLoadReport(0, 0, min_sparsity=min_sparsity, least=least)
    done: set[str] = set()
    for name, lin in linears.items():
        bias = fetch(f"{name}.bias") if lin.bias is not None else None
        if reader is not None and reader.quantized(name):
            weight = _ct_linear(reader, name, lin, bias, values, report)
        elif (reader is not None or grid is not None) and values != "float":
            weight = fetch(f"{name}.weight", cast=False)  # the stored values: on the grid or not, as written
            recorded = grid is not None and f"{name}.weight" in grid
            codes = _grid_codes(grid, f"{name}.weight", weight) if recorded else "not quantized in the folder"
            weight = _int8_layer(f"{name} in {folder}", lin, bias, codes, values, report) or weight
        else:
            weight = fetch(f"{name}.weight")
        done.update({f"{name}.weight", f"{name}.bias"})
        parent_name, _, leaf = name.rpartition(".")
        if isinstance(weight, SparseLinear):
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, weight)
            report.converted += 1
            continue
        weight = weight.to(dtype)
        reason = dense_reason(weight, min_sparsity, least)
        if reason is None:
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, SparseLinear.from_dense(weight, bias, dtype=dtype))
            report.converted += 1
        else:
            assign_tensor(model, f"{name}.weight", weight)
            if bias is not None:
                assign_tensor(model, f"{name}.bias", bias)
            report.kept_dense += 1
            report.reasons[reason] = report.reasons.get(reason, 0) + 1
        del weight, bias
    for why, count in report.float_reasons.items():
        log.info(
            "sparse kernel: %d matrices keep %s values, not int8: %s", count, str(dtype).removeprefix("torch."), why
        )
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    for name, param in list(model.named_parameters()) + list(model.named_buffers()):
        if name in done or param.device.type != "meta":
            continue
        if tie and head_name is not None and name == f"{head_name}.weight" and name not in available:
            continue  # tied to the embeddings below
        assign_tensor(model, name, fetch(name))
    if tie:
        model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:
        raise WandaError(f"the checkpoint in {folder} lacks {', '.join(left[:4])}")
    model.config.use_cache = False
    return model, report
