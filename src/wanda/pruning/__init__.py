"""Pruning a whole model: its settings, the per-layer ratios (profiles), the job over resident blocks
(``prune``) and the one over blocks streamed from disk (``streamed``). The walk itself is ``wanda.engine``'s."""
