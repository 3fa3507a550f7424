"""The compressed format (``wanda.export.compressed``) written one tensor at a time, for streamed runs.

``save_compressed`` encodes the whole state dict in memory. Here the safetensors header, which must come first,
needs every encoded part's shape before any byte is written, so the tensors are encoded twice: once to learn the
parts (each dropped at once), once to write them in order (``wanda.export.shards.write_safetensors``). Encoding is
cheap next to the pruning, and memory stays one tensor. The files equal ``save_compressed``'s tensor for tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import WandaError
from ..models.compressed import (
    FORMAT_NAME,
    WEIGHTS_NAME,
    CompressionReport,
    dtype_name,
    encode_tensor,
    finish_folder,
)
from .shards import write_safetensors

log = logging.getLogger(__name__)

__all__ = ["save_compressed_streamed"]


def save_compressed_streamed(
    model: nn.Module,
    names: list[str],
    read: Callable[[str], torch.Tensor],
    aliases: dict[str, str],
    folder: str | Path,
    tokenizer=None,
) -> CompressionReport:
    """Write the tensors ``names`` (each fetched by ``read``) compressed into the existing folder ``folder``;
    ``model`` gives the config and class (its weights may be on ``meta``); ``aliases``: tied name -> stored name."""
    folder = Path(folder)
    report = CompressionReport()
    entries: dict[str, dict] = {}
    specs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for key in names:
        if "::" in key:
            raise WandaError(f"cannot save parameter {key!r}: '::' is reserved by the compressed format")
        encoded = encode_tensor(read(key))
        entries[key] = {"encoding": encoded.encoding, "shape": list(encoded.shape), "dtype": dtype_name(encoded.dtype)}
        specs += [(f"{key}::{part}", tuple(data.shape), data.dtype) for part, data in encoded.parts.items()]
        report.encodings[key] = encoded.encoding
        report.tensor_bytes[key] = encoded.nbytes
        report.dense_tensor_bytes[key] = encoded.dense_nbytes

    def parts() -> Iterator[torch.Tensor]:
        for key in names:
            yield from encode_tensor(read(key)).parts.values()

    write_safetensors(folder / WEIGHTS_NAME, specs, parts(), {"wanda": FORMAT_NAME})
    finish_folder(folder, model, tokenizer, entries, aliases, report)
    return report
