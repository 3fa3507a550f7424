"""Writing a pruned model: the usual ``from_pretrained`` folder, or the compact sparse format."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import WandaError
from ..models.compressed import CompressionReport, save_compressed
from ..models.grid_record import write_grid
from ..utils.io import atomic_directory
from .compressed_tensors import QuantizedModel

log = logging.getLogger(__name__)

__all__ = ["SAVE_FORMATS", "SavedModel", "save_model", "folder_bytes"]

#: ``--save_format`` choices: ``dense`` is ``save_pretrained``; ``compressed`` is ``wanda.models.compressed``;
#: ``gguf`` is one llama.cpp file (``wanda.export.gguf``); ``compressed-tensors`` is the pack-quantized folder
#: vLLM loads (``wanda.export.compressed_tensors``).
SAVE_FORMATS = ("dense", "compressed", "gguf", "compressed-tensors")


@dataclass
class SavedModel:
    path: Path
    save_format: str
    #: Bytes of every file written (weights, config, tokenizer).
    bytes: int
    #: Only for ``compressed``: tensor bytes written versus the same tensors dense.
    compression: CompressionReport | None = None


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _record_grid(model: nn.Module, folder: Path, quantized: QuantizedModel | None) -> None:
    """The scales of a quantized prune beside its dequantized weights (``wanda.models.grid_record``), so that
    the sparse kernel can load them as int8 codes; fused expert slices are left out."""
    if quantized is None:
        return
    names = {id(module): name for name, module in model.named_modules()}
    scales = {
        f"{names[id(q.module)]}.{q.parameter}": q.scale
        for q in quantized.matrices.values()
        if q.expert is None and id(q.module) in names
    }
    if scales:
        write_grid(folder, scales, quantized.bits, quantized.groupsize)


def save_model(
    model: nn.Module,
    tokenizer,
    target: str | Path,
    save_format: str = "dense",
    overwrite: bool = False,
    gguf_type: str | None = None,
    quantized: QuantizedModel | None = None,
) -> SavedModel:
    """Write ``model`` and ``tokenizer`` to ``target`` atomically in ``save_format`` (``gguf`` in ``gguf_type``;
    ``compressed-tensors`` with the grid parameters of the run that quantized it, ``quantized``)."""
    if save_format not in SAVE_FORMATS:
        raise WandaError(f"--save_format must be one of {', '.join(SAVE_FORMATS)}; got {save_format!r}")
    if (save_format == "gguf") != (gguf_type is not None):
        raise WandaError("--save_format gguf and --gguf_type go together: pass both or neither")
    from safetensors import SafetensorError

    compression = None
    with atomic_directory(target, overwrite=overwrite) as tmp:
        try:
            if save_format == "dense":
                model.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                _record_grid(model, tmp, quantized)
            elif save_format == "gguf":
                from .gguf import save_gguf

                save_gguf(model, tokenizer, tmp, gguf_type)
            elif save_format == "compressed-tensors":
                from .compressed_tensors import save_compressed_tensors

                save_compressed_tensors(model, tmp, quantized)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            else:
                compression = save_compressed(model, tmp, tokenizer)
                _record_grid(model, tmp, quantized)
        except SafetensorError as exc:  # safetensors writes from Rust: a full disk arrives as this, not OSError
            full = re.search(r"os error 28|code: 28|No space left", str(exc))
            reason = "no space left on device" if full else str(exc).splitlines()[0]
            raise WandaError(f"could not write {target}: {reason}; nothing was written there") from exc
    saved = SavedModel(Path(target), save_format, folder_bytes(target), compression)
    if compression is not None:
        log.info(
            "compressed model written to %s: %.1f MB of weights versus %.1f MB dense (%.1f%%)",
            target,
            compression.file_bytes / 1e6,
            compression.dense_bytes / 1e6,
            100 * compression.file_bytes / max(compression.dense_bytes, 1),
        )
    else:
        log.info("pruned model written to %s (%.1f MB)", target, saved.bytes / 1e6)
    return saved
