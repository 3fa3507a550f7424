"""Evaluation of (pruned) models: perplexity; zero-shot tasks live beside it."""

from .perplexity import perplexity

__all__ = ["perplexity"]
