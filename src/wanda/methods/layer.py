"""What a method receives for one matrix: its ratio, its pattern and the method's own settings, nothing of the
run around it (profiles, targets, ranks), so a method is a pure function of one matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..masks.pattern import SparsityPattern

__all__ = ["LayerSettings"]


@dataclass(frozen=True)
class LayerSettings:
    """``ratio``: the fraction this matrix loses (the profile's and the targets' choice for it, already made);
    ``pattern``: unstructured or N:M; ``params``: the method's own settings object (``MethodSpec.settings``);
    ``grid``: with ``--wbits``, the quantization grid (``wanda.quant.Grid``) that a method with a column loop
    (``MethodSpec.quantizes``) rounds to inside that loop; the engine quantizes every other method's result."""

    ratio: float
    pattern: SparsityPattern
    params: Any = None
    grid: Any = None
