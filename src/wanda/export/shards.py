"""Writing a checkpoint tensor by tensor into safetensors shards, as ``save_pretrained`` lays them out.

A safetensors file is an 8-byte header length, a JSON header giving every tensor's dtype, shape and byte range,
then the raw bytes. Every tensor's shape and dtype is known before any is written (pruning keeps shapes), so
the header is written first and each tensor is appended when it is read: writing never holds more than one
tensor in memory. Shards are filled in order up to ``max_shard_size`` (``save_pretrained``'s rule and names:
``model-00001-of-00003.safetensors`` plus ``model.safetensors.index.json``, or a single ``model.safetensors``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..models.checkpoint import DTYPE_CODES, INDEX_NAME, SINGLE_NAME

__all__ = ["DEFAULT_SHARD_SIZE", "parse_size", "write_shards", "write_safetensors", "fsync_file", "fsync_dir"]

#: ``save_pretrained``'s default ``max_shard_size`` in transformers 5.
DEFAULT_SHARD_SIZE = "50GB"
_CODES = {dtype: code for code, dtype in DTYPE_CODES.items()}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"2GB"`` -> 2e9 bytes (decimal units as transformers reads them; ``GiB`` binary)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * _UNITS[unit])
    return int(text)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def _plan(specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Indices of ``specs`` per shard: a new shard when the next tensor would pass ``max_bytes``."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_safetensors(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """One safetensors file, written from ``tensors`` in the order of ``specs`` without copying them, fsynced."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype in specs:
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for (name, shape, dtype), tensor in zip(specs, tensors):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: planned {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        handle.flush()
        os.fsync(handle.fileno())


def write_shards(
    folder: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    load: Callable[[str], torch.Tensor],
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> list[Path]:
    """Write the tensors ``specs`` (name, shape, dtype), each fetched by ``load(name)`` when its turn comes."""
    plan = _plan(specs, parse_size(max_shard_size))
    if len(plan) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    weight_map, total = {}, 0
    for shard, indices in zip(names, plan):
        group = [specs[i] for i in indices]
        write_safetensors(folder / shard, group, (load(name) for name, _, _ in group))
        for name, shape, dtype in group:
            weight_map[name] = shard
            total += _nbytes(shape, dtype)
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / n for n in names]
