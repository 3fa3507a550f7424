"""Export: compact sparse checkpoints, 2:4 semi-structured tensors, and speed-up measurement.

Pruning hands on dense weights with zeros; everything here is a separate step on such a model.
"""

from ..models.compressed import CompressionReport, is_compressed_folder, load_compressed, save_compressed
from .save import SAVE_FORMATS, SavedModel, save_model
from .semi_structured import (
    BACKENDS,
    SemiStructuredBackend,
    SparsifyReport,
    available_backends,
    backend_problem,
    check_24,
    gpu_problem,
    sparsify_linears,
)
from .speedup import SpeedupResult, SpeedupSettings, format_tables, run_speedup
from .timing import Timing, measure

__all__ = [
    "CompressionReport",
    "is_compressed_folder",
    "load_compressed",
    "save_compressed",
    "SAVE_FORMATS",
    "SavedModel",
    "save_model",
    "BACKENDS",
    "available_backends",
    "backend_problem",
    "SemiStructuredBackend",
    "SparsifyReport",
    "check_24",
    "gpu_problem",
    "sparsify_linears",
    "SpeedupResult",
    "SpeedupSettings",
    "format_tables",
    "run_speedup",
    "Timing",
    "measure",
]
