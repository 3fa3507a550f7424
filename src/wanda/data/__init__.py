"""Text sources for calibration and evaluation, and seeded token windows drawn from them."""

from .sources import NAMED_SOURCES, TextSource, load_documents, resolve_source
from .summaries import summaries_split
from .windows import calibration_windows, evaluation_windows, tokenize_documents, tokenize_stream

__all__ = [
    "NAMED_SOURCES",
    "TextSource",
    "load_documents",
    "resolve_source",
    "summaries_split",
    "calibration_windows",
    "evaluation_windows",
    "tokenize_documents",
    "tokenize_stream",
]
