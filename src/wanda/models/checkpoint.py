"""A safetensors checkpoint read tensor by tensor: the index's weight map and each file's header say where every
tensor's bytes are, so reading one decoder block reads only that block's bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WandaError

__all__ = ["Checkpoint", "TensorInfo", "file_entries", "INDEX_NAME", "SINGLE_NAME", "is_streamable"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors' dtype codes (the header's "dtype" field)
DTYPE_CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def is_streamable(folder: str | Path) -> bool:
    """A local folder whose weights are safetensors (an index of shards, or one ``model.safetensors``)."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file())


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets) and where its data starts."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size)), 8 + size


def file_entries(path: Path) -> dict[str, "TensorInfo"]:
    """Every tensor of one safetensors file, by its name in the file."""
    header, start = _header(path)
    return {
        key: TensorInfo(path, key, tuple(info["shape"]), DTYPE_CODES[info["dtype"]], start + info["data_offsets"][0])
        for key, info in header.items()
        if key != "__metadata__"
    }


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    key: str  # the name inside ``file``
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # where its bytes start in ``file``

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Checkpoint:
    """Tensor name -> where it is stored. Names may be renamed (``rename``) to the model's own parameter names,
    and entries may be pointed at other files (``with_entries``: a work folder's pruned blocks)."""

    def __init__(self, folder: Path, entries: dict[str, TensorInfo]):
        self.folder = folder
        self.entries = entries

    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        folder = Path(folder)
        if (folder / INDEX_NAME).is_file():
            weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise WandaError(
                f"{folder} has no safetensors weights ({INDEX_NAME} or {SINGLE_NAME}); streaming needs "
                "them: convert the model once with save_pretrained, or use --offload none"
            )
        entries = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise WandaError(f"checkpoint shard {path} named by the index is missing")
            entries.update(file_entries(path))
        return cls(folder, entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of all tensors, floating-point ones counted at ``dtype`` when given (what loading costs)."""
        total = 0
        for info in self.entries.values():
            as_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            total += info.numel * torch.empty((), dtype=as_dtype).element_size()
        return total

    def signature(self) -> str:
        """A hash of names, shapes, dtypes and file sizes: which checkpoint this is, without reading its data."""
        digest = hashlib.sha256()
        for name in sorted(self.entries):
            info = self.entries[name]
            for part in getattr(info, "sources", (info,)):  # a merged parameter: each of its sources
                digest.update(f"{name}:{part.shape}:{part.dtype}:{part.file.name}:{part.file.stat().st_size};".encode())
        return digest.hexdigest()

    def rename(self, mapping: dict[str, str]) -> "Checkpoint":
        return Checkpoint(self.folder, {mapping.get(k, k): v for k, v in self.entries.items()})

    def with_entries(self, entries: dict[str, TensorInfo]) -> "Checkpoint":
        return Checkpoint(self.folder, {**self.entries, **entries})

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors on the CPU (floating ones cast to ``dtype``).

        Each is read with one ``readinto`` straight into its own buffer: no memory map, whose touched pages
        would count in the process's resident memory beside the copy, so reading a block costs the block once.
        """
        out = {}
        handles: dict[Path, object] = {}

        def read_one(info: TensorInfo, name: str) -> torch.Tensor:
            if info.file not in handles:
                handles[info.file] = open(info.file, "rb", buffering=0)
            handle = handles[info.file]
            tensor = torch.empty(info.shape, dtype=info.dtype)
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            handle.seek(info.offset)
            got = 0
            while got < raw.nbytes:  # readinto may return short counts on large reads
                n = handle.readinto(memoryview(raw)[got:])
                if not n:
                    raise WandaError(f"{info.file} is truncated: {name} needs {raw.nbytes} bytes")
                got += n
            return tensor

        try:
            for name in names:
                info = self.entries[name]
                if isinstance(info, TensorInfo):
                    tensor = read_one(info, name)
                else:  # merged from several tensors (wanda.models.conversion)
                    tensor = info.load(lambda source: read_one(source, source.key))
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                out[name] = tensor
        finally:
            for handle in handles.values():
                handle.close()
        return out
