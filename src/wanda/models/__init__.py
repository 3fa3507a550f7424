"""Finding the prunable structure of a model, and loading models (hub id, folder, GGUF, named models)."""

from .discovery import DecoderLayout, StructureOverride, find_decoder_layout, model_zero_counts
from .loading import (
    LoadedModel,
    ModelSettings,
    SparseKernelSettings,
    check_seqlen,
    context_length,
    default_seqlen,
    load_model,
    resolve_dtype,
)
from .matrices import (
    BlockMatrices,
    NotPruned,
    PrunableMatrix,
    find_linears,
    find_prunable,
    matrix_zero_counts,
    zero_share,
)

__all__ = [
    "DecoderLayout",
    "StructureOverride",
    "find_decoder_layout",
    "BlockMatrices",
    "NotPruned",
    "PrunableMatrix",
    "find_linears",
    "model_zero_counts",
    "matrix_zero_counts",
    "zero_share",
    "find_prunable",
    "LoadedModel",
    "ModelSettings",
    "SparseKernelSettings",
    "check_seqlen",
    "context_length",
    "default_seqlen",
    "load_model",
    "resolve_dtype",
]
