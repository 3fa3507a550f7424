"""The quantization scales of a saved ``--wbits`` prune, recorded beside its weights (``wanda_grid.safetensors``).

Why: a quantized prune saved as ``dense`` or ``compressed`` holds the dequantized weights, integer codes times
per-group scales. With the scales recorded, the sparse kernel loads such a layer as int8 codes with the same
scales (weight = code x scale, exactly) instead of fp32 values, at about a quarter of the bytes. The file is a
sidecar other readers ignore (transformers reads ``model.safetensors``, the compressed format its own file).
It is never trusted blindly: each matrix's codes round(w / scale) must give back w bit for bit
(``wanda.kernels.packing.codes_on_grid``), else that matrix keeps float values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WandaError

__all__ = ["GRID_NAME", "RecordedGrid", "read_grid", "write_grid"]

GRID_NAME = "wanda_grid.safetensors"


def write_grid(folder: str | Path, scales: dict[str, torch.Tensor], bits: int, groupsize: int) -> None:
    """Write each matrix's scales (parameter name -> fp32 (rows, groups)); ``groupsize`` -1: one per row."""
    from safetensors.torch import save_file

    tensors = {name: s.detach().float().cpu().contiguous() for name, s in scales.items()}
    metadata = {"format": "pt", "wanda": "grid", "bits": str(bits), "groupsize": str(groupsize)}
    save_file(tensors, str(Path(folder) / GRID_NAME), metadata=metadata)


@dataclass
class RecordedGrid:
    """The recorded scales of a folder, read one matrix at a time."""

    path: Path
    bits: int
    groupsize: int
    names: frozenset[str]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def scales(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as handle:
            return handle.get_tensor(name).float()

    def groupsize_for(self, in_features: int) -> int:
        """Columns per scale: one group of the row rounded up to a multiple of 8 for one scale per row."""
        return -(-in_features // 8) * 8 if self.groupsize == -1 else self.groupsize


def read_grid(folder: str | Path) -> RecordedGrid | None:
    """The folder's recorded grid, or None when it has none."""
    from safetensors import SafetensorError, safe_open

    from .checks import check_safetensors

    path = Path(folder) / GRID_NAME
    if not path.is_file():
        return None
    check_safetensors(path)
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            names = frozenset(handle.keys())
        bits, groupsize = int(meta["bits"]), int(meta["groupsize"])
    except (SafetensorError, KeyError, ValueError) as exc:
        raise WandaError(f"{path} is not a wanda grid record ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    return RecordedGrid(path, bits, groupsize, names)
