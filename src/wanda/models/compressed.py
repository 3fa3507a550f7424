"""Compact sparse checkpoints: each sparse tensor stored as its non-zero values plus where they are.

Pruning hands on dense weights with zeros, so ``save_pretrained`` writes a checkpoint as large as the dense
model. This format writes every floating-point tensor in whichever of two encodings is smaller:

``dense``
    the tensor as it is (embeddings, norms, anything not sparse enough to gain).
``bitmask``
    the non-zero values in row-major order, (nnz,), plus a bitmask of the whole tensor, one bit per
    entry, packed 8 per byte with ``numpy.packbits``: nnz * itemsize + ceil(numel / 8) bytes.

Earlier versions also wrote a ``2:4`` encoding (2 values and two 2-bit positions per group of 4):
numel / 2 * itemsize + numel / 8 bytes, which is never smaller than the bitmask's nnz * itemsize + numel / 8
because a 2:4 tensor has nnz <= numel / 2 (equal at exactly 50%). It is no longer written; folders that
hold it are still read.

"Zero" means all bits zero, so ``-0.0`` is kept as a value and loading rebuilds every tensor bit for bit.
Tensors that share storage (tied embeddings) are written once and recorded as aliases.

A folder holds ``config.json``, the tokenizer files, ``compressed.safetensors`` and the manifest
``wanda_compressed.json`` (format, version, each tensor's encoding, shape and dtype), whose presence marks
the format; ``wanda.models.load_model`` and therefore every ``wanda`` command accept such a folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import WandaError
from .encoding import EncodedTensor, Encoding, decode_tensor, dtype_name, encode_tensor, parse_dtype, same_bits

log = logging.getLogger(__name__)

__all__ = [
    "finish_folder",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "Encoding",
    "EncodedTensor",
    "CompressionReport",
    "encode_tensor",
    "decode_tensor",
    "is_compressed_folder",
    "save_compressed",
    "load_compressed",
    "load_compressed_state_dict",
    "same_bits",
]

MANIFEST_NAME = "wanda_compressed.json"
WEIGHTS_NAME = "compressed.safetensors"
FORMAT_NAME = "wanda-compressed"
FORMAT_VERSION = 1


@dataclass
class CompressionReport:
    """Bytes of tensor data written versus the same tensors stored dense (what ``save_pretrained`` writes)."""

    encodings: dict[str, str] = field(default_factory=dict)
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    dense_tensor_bytes: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0

    @property
    def bytes(self) -> int:
        return sum(self.tensor_bytes.values())

    @property
    def dense_bytes(self) -> int:
        return sum(self.dense_tensor_bytes.values())

    @property
    def ratio(self) -> float:
        return self.bytes / self.dense_bytes if self.dense_bytes else 1.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for encoding in self.encodings.values():
            out[encoding] = out.get(encoding, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "file_bytes": self.file_bytes,
            "encodings": self.counts(),
            **asdict(self),
        }


def _dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as the dense model has it: a packed sparse linear (``wanda.kernels.SparseLinear``, found
    by its ``to_dense``) contributes ``weight`` (and ``bias``) in its dense dtype instead of its buffers, so a
    sparse-kernel model saves to the same checkpoint as the dense-with-zeros model (state_dict order kept)."""
    packed = {
        name: mod
        for name, mod in model.named_modules()
        if callable(getattr(mod, "to_dense", None)) and isinstance(getattr(mod, "values", None), torch.Tensor)
    }
    if not packed:
        return model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        mod = packed.get(owner)
        if mod is None:
            out[key] = tensor
        elif key.endswith(".values"):
            out[f"{owner}.weight"] = mod.to_dense()
            if mod.bias is not None:
                out[f"{owner}.bias"] = mod.bias.to(out[f"{owner}.weight"].dtype)
    return out


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without repeated storage: (tensors to write, alias -> key it shares storage with)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in _dense_state(model).items():
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = tensor
    return tensors, aliases


def is_compressed_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def finish_folder(
    folder: Path, model: nn.Module, tokenizer, entries: dict, aliases: dict, report: "CompressionReport"
) -> None:
    """What follows the weights file in every compressed folder, whoever wrote the weights (the resident saver
    here, the streamed one in ``wanda.export.compressed_stream``): config, generation config, tokenizer, and the
    manifest last, whose presence marks a complete folder."""
    report.file_bytes = (folder / WEIGHTS_NAME).stat().st_size
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "weights": WEIGHTS_NAME,
        "model_class": type(model).__name__,
        "tensors": entries,
        "aliases": aliases,
        "bytes": report.bytes,
        "dense_bytes": report.dense_bytes,
    }
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def save_compressed(model: nn.Module, folder: str | Path, tokenizer=None) -> CompressionReport:
    """Write ``model`` (and ``tokenizer``) into the existing folder ``folder`` in the compressed format.

    Callers that need the folder to appear atomically write into a temporary folder
    (see ``wanda.export.save_model``).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors, aliases = _unique_state(model)
    report = CompressionReport()
    entries: dict[str, dict] = {}
    payload: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if "::" in key:
            raise WandaError(f"cannot save parameter {key!r}: '::' is reserved by the compressed format")
        encoded = encode_tensor(tensor)
        entries[key] = {"encoding": encoded.encoding, "shape": list(encoded.shape), "dtype": dtype_name(encoded.dtype)}
        for part, data in encoded.parts.items():
            payload[f"{key}::{part}"] = data
        report.encodings[key] = encoded.encoding
        report.tensor_bytes[key] = encoded.nbytes
        report.dense_tensor_bytes[key] = encoded.dense_nbytes
    save_file(payload, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "wanda": FORMAT_NAME})
    finish_folder(folder, model, tokenizer, entries, aliases, report)
    log.info(
        "compressed %d tensors (%s): %.1f MB versus %.1f MB dense (%.1f%%)",
        len(entries),
        report.counts(),
        report.bytes / 1e6,
        report.dense_bytes / 1e6,
        100 * report.ratio,
    )
    return report


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise WandaError(f"{folder} is not a compressed checkpoint: {MANIFEST_NAME} is missing")
    from .checks import read_json

    manifest = read_json(path)
    if manifest.get("format") != FORMAT_NAME:
        raise WandaError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise WandaError(
            f"{path}: format version {manifest['version']} is newer than this wanda ({FORMAT_VERSION}); upgrade wanda"
        )
    return manifest


def load_compressed_state_dict(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full state dict (aliases included, as the same tensor objects) and the manifest."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = _read_manifest(folder)
    from .checks import check_safetensors, inside

    weights = inside(folder, str(manifest.get("weights", WEIGHTS_NAME)), str(folder / MANIFEST_NAME))
    if not weights.is_file():
        raise WandaError(f"{folder}: the weights file {weights.name} named by {MANIFEST_NAME} is missing")
    check_safetensors(weights)
    stored = load_file(str(weights))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, data in stored.items():
        key, _, part = name.rpartition("::")
        grouped.setdefault(key, {})[part] = data
    if set(grouped) != set(manifest["tensors"]):
        missing = sorted(set(manifest["tensors"]) - set(grouped))
        extra = sorted(set(grouped) - set(manifest["tensors"]))
        raise WandaError(f"{folder}: weights and manifest disagree (missing {missing[:3]}, unexpected {extra[:3]})")
    state = {}
    for key, entry in manifest["tensors"].items():
        try:
            state[key] = decode_tensor(
                entry["encoding"], grouped.pop(key), tuple(entry["shape"]), parse_dtype(entry["dtype"])
            )
        except WandaError as exc:
            raise WandaError(f"{folder}: {key}: {exc}") from exc
    for alias, key in manifest["aliases"].items():
        state[alias] = state[key]
    return state, manifest


def load_compressed(
    folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> tuple[nn.Module, object | None]:
    """Rebuild ``(model, tokenizer)`` from a compressed folder; the tokenizer is ``None`` if none was saved.

    With ``dtype=None`` every tensor comes back bit for bit as it was saved; a ``dtype`` casts floating
    tensors afterwards, as ``from_pretrained(dtype=...)`` would. ``device``: where to move the model
    (default: CPU).
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    state, manifest = load_compressed_state_dict(folder)
    model_class = getattr(transformers, str(manifest.get("model_class")), None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise WandaError(f"{folder}: model class {manifest['model_class']} is not in this transformers version")
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    stored_dtype = max(set(floating), key=floating.count) if floating else torch.float32
    config = AutoConfig.from_pretrained(folder)
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=stored_dtype)
    loaded = model.state_dict()
    if set(loaded) != set(state):
        missing, extra = sorted(set(loaded) - set(state)), sorted(set(state) - set(loaded))
        raise WandaError(
            f"{folder}: checkpoint does not match {manifest['model_class']} "
            f"(not in checkpoint: {missing[:3]}, not in model: {extra[:3]})"
        )
    for key, tensor in state.items():
        if not same_bits(loaded[key], tensor):
            raise WandaError(f"{folder}: {key} changed while loading ({tensor.dtype} -> {loaded[key].dtype})")
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.eval()
    tokenizer = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
