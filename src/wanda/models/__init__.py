"""Finding the prunable structure of a model, and loading models (hub id, folder, GGUF, bundled)."""

from .discovery import DecoderLayout, find_decoder_layout, find_linears
from .loading import LoadedModel, ModelSettings, check_seqlen, context_length, default_seqlen, load_model, resolve_dtype

__all__ = ["DecoderLayout", "find_decoder_layout", "find_linears", "LoadedModel", "ModelSettings", "check_seqlen", "context_length", "default_seqlen", "load_model", "resolve_dtype"]
