"""Weight quantization that keeps a pruned layer's zeros: grids holding 0 exactly and GPTQ (Frantar et al., ICLR
2023) with the pruning mask fixed."""

from .gptq import gptq_quantize, rtn_quantize
from .grid import BITS, Q4_0, Q8_0, GGUFGrid, Grid, GroupParams, QuantGrid
from .settings import QuantSettings

__all__ = [
    "BITS",
    "Q4_0",
    "Q8_0",
    "GGUFGrid",
    "Grid",
    "GroupParams",
    "QuantGrid",
    "QuantSettings",
    "gptq_quantize",
    "rtn_quantize",
]
