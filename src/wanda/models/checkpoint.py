"""A safetensors checkpoint read tensor by tensor: the index's weight map and each file's header say where every
tensor's bytes are, so reading one decoder block reads only that block's bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WandaError

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "file_entries",
    "read_header",
    "read_weight_map",
    "combine_digests",
    "file_digests",
    "INDEX_NAME",
    "SINGLE_NAME",
    "is_streamable",
]

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


#: A header longer than this is refused before it is read (real ones are a few hundred kB at most).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _bad(path: Path, why: str) -> WandaError:
    return WandaError(f"{path} is not a valid safetensors file ({why}); it may be truncated: copy it again")


def read_header(path: Path) -> tuple[dict, int]:
    """The validated JSON header of a safetensors file and where its data starts.

    Every mode reads a checkpoint through this (``Checkpoint.open`` for streaming, ``check_safetensors`` before
    ``transformers`` loads it), so a malformed file is one line in each: the 8-byte size must fit the file, the
    header must be a UTF-8 JSON object whose entries have a known dtype, a shape of non-negative integers and
    ``data_offsets`` that match the shape, stay inside the file and do not overlap; the file must end where the
    last tensor does (a copy cut short is named with both sizes)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        first = handle.read(8)
        if len(first) < 8:
            raise _bad(path, f"{size} bytes, shorter than the 8-byte header size")
        header_bytes = int.from_bytes(first, "little")
        if header_bytes > size - 8 or header_bytes > MAX_HEADER_BYTES:
            raise _bad(path, f"its header says {header_bytes} bytes, the file has {size - 8} after the size")
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _bad(path, f"its header is not UTF-8 (byte {exc.start})") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"its header is not JSON: {str(exc)[:80]}") from exc
    if not isinstance(header, dict):
        raise _bad(path, f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "its __metadata__ is not a map of strings")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _bad(path, f"entry {key!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_CODES:
            raise _bad(path, f"{key!r} has dtype {dtype!r}, not one of {', '.join(DTYPE_CODES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad(path, f"{key!r} has shape {str(shape)[:40]}, not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _bad(path, f"{key!r} has data_offsets {str(offsets)[:40]}, not [begin, end]")
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPE_CODES[dtype]).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(path, f"{key!r} spans {offsets[1] - offsets[0]} bytes, its shape {shape} needs {nbytes}")
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (_, end, first_key), (begin, _, second_key) in zip(spans, spans[1:]):
        if begin < end:
            raise _bad(path, f"the bytes of {first_key!r} and {second_key!r} overlap")
    expected = 8 + header_bytes + max((end for _, end, _ in spans), default=0)
    if size != expected:
        raise WandaError(
            f"{path} is truncated or corrupt: its header describes {expected} bytes, the file has "
            f"{size}; copy or download it again"
        )
    return header, 8 + header_bytes


def read_weight_map(folder: Path) -> dict[str, str]:
    """The shard index's tensor -> file map, validated: a JSON object whose ``weight_map`` is a non-empty map
    of names to files that exist inside ``folder``."""
    index = folder / INDEX_NAME
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise WandaError(f"{index} is not UTF-8 text (byte {exc.start})") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise WandaError(f"{index} is not valid JSON ({str(exc)[:80]})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WandaError(f"{index} has no weight_map naming the shards")
    bad = next((f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise WandaError(f"{index}: weight_map entry {bad[:80]} does not name a file")
    root = folder.resolve()
    for name in set(weight_map.values()):
        try:
            path = (folder / name).resolve()
        except (OSError, ValueError) as exc:  # e.g. an embedded NUL byte
            raise WandaError(f"{index} names {name!r}, which is not a usable file name ({exc})") from exc
        if not path.is_relative_to(root):
            raise WandaError(f"{index} names {name!r}, which is outside {folder}; refusing to read it")
    missing = sorted({name for name in weight_map.values() if not (folder / name).is_file()})
    if missing:
        raise WandaError(f"{index} lists shards that are missing: {', '.join(missing[:3])}")
    return weight_map


def file_entries(path: Path) -> dict[str, "TensorInfo"]:
    """Every tensor of one safetensors file, by its name in the file (header validated by ``read_header``)."""
    header, start = read_header(path)
    return {
        key: TensorInfo(path, key, tuple(info["shape"]), DTYPE_CODES[info["dtype"]], start + info["data_offsets"][0])
        for key, info in header.items()
        if key != "__metadata__"
    }


def _part_name(info: "TensorInfo") -> str:
    return f"{info.file.name}:{info.key}:{list(info.shape)}:{info.dtype}"


def combine_digests(digests: dict[str, str]) -> str:
    """One digest of several tensors' digests (``Checkpoint.read(digests=...)``), independent of read order."""
    return hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(digests.items())).encode()).hexdigest()


def file_digests(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    """SHA-256 of each of ``names`` that exists in ``folder`` (``config.json``, the tokenizer files)."""
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names if (folder / n).is_file()}


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
        weight_map = None
        if (folder / INDEX_NAME).is_file():
            weight_map = read_weight_map(folder)
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise WandaError(
                f"{folder} has no safetensors weights ({INDEX_NAME} or {SINGLE_NAME}); streaming needs "
                "them: convert the model once with save_pretrained, or use --offload none"
            )
        entries: dict[str, TensorInfo] = {}
        for name in files:
            for key, info in file_entries(folder / name).items():
                if key in entries:
                    raise WandaError(
                        f"tensor {key} is stored twice, in {entries[key].file.name} and {name}; the checkpoint "
                        "is ambiguous: remove one copy"
                    )
                entries[key] = info
        if weight_map is not None:
            astray = next((k for k, f in weight_map.items() if k not in entries or entries[k].file != folder / f), None)
            if astray is not None:
                raise WandaError(f"{folder / INDEX_NAME} puts {astray} in {weight_map[astray]}, which does not hold it")
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

    def source_digest(self, names: list[str]) -> str:
        """One SHA-256 over the stored bytes of ``names`` (each merged parameter's sources), read again from
        disk in 16 MB chunks: what a resumed run compares with the digest recorded when the block was read."""
        digests = {}
        for name in names:
            for part in getattr(self.entries[name], "sources", (self.entries[name],)):
                digest = hashlib.sha256()
                left = part.numel * torch.empty((), dtype=part.dtype).element_size()
                with open(part.file, "rb") as handle:
                    handle.seek(part.offset)
                    while left:
                        chunk = handle.read(min(left, 1 << 24))
                        if not chunk:
                            raise WandaError(f"{part.file} is truncated: {part.key} lacks {left} bytes")
                        digest.update(chunk)
                        left -= len(chunk)
                digests[_part_name(part)] = digest.hexdigest()
        return combine_digests(digests)

    def rename(self, mapping: dict[str, str]) -> "Checkpoint":
        return Checkpoint(self.folder, {mapping.get(k, k): v for k, v in self.entries.items()})

    def with_entries(self, entries: dict[str, TensorInfo]) -> "Checkpoint":
        return Checkpoint(self.folder, {**self.entries, **entries})

    def read(
        self, names: list[str], dtype: torch.dtype | None = None, digests: dict[str, str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The named tensors on the CPU (floating ones cast to ``dtype``). ``digests``: filled with the SHA-256
        of each stored tensor's bytes as they are read (``source_digest`` of what was read costs no extra pass).

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
            if digests is not None:
                digests[_part_name(info)] = hashlib.sha256(memoryview(raw)).hexdigest()
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
