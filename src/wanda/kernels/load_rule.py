"""The load rule: which pruned matrices become ``SparseLinear`` and which stay a dense ``nn.Linear``.

Why: the sparse form pays only where it reads clearly fewer bytes and where the call is large enough for the
bytes to matter; elsewhere a converted matrix decodes slower than the dense one. One rule, used both when a
model is loaded for the sparse kernel (``wanda.models.sparse_load``) and by ``sparsify_linears``.
"""

from __future__ import annotations

import os

import torch

#: The load rule's thresholds: a matrix becomes a SparseLinear only when it has at least MIN_SPARSITY zeros
#: and at least MIN_WEIGHTS weights (out x in); otherwise it stays a dense nn.Linear. Below 30% zeros the
#: values + bitmask (0.7 x 4 + 1/8 = 2.9 of 4 bytes per weight) save too little to pay for the expand work.
#: Below 256 K weights a decode call is a few microseconds of weights against a fixed call overhead:
#: measured on SmolLM2-135M at 50% (``wanda speedup --device cpu``), 192x576 (110 K weights) decoded at 0.43x
#: dense, 576x576 (332 K) at 1.21x and 1536x576 at 2.00x; benchmarks/results/cpu_inference.md has the large
#: shapes. ``$WANDA_SPARSE_MIN_WEIGHTS`` overrides MIN_WEIGHTS (tests of tiny models set it to 0).
MIN_SPARSITY = 0.3
MIN_WEIGHTS = 262144


def min_weights() -> int:
    """The load rule's size threshold: ``$WANDA_SPARSE_MIN_WEIGHTS`` when set, else MIN_WEIGHTS."""
    raw = os.environ.get("WANDA_SPARSE_MIN_WEIGHTS", "").strip()
    if not raw:
        return MIN_WEIGHTS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        from ..errors import WandaError

        raise WandaError(f"WANDA_SPARSE_MIN_WEIGHTS must be a whole number >= 0, got {raw!r}")
    return value


def dense_reason(weight: torch.Tensor, min_sparsity: float = MIN_SPARSITY, least: int | None = None) -> str | None:
    """Why ``weight`` stays dense under the load rule ("zeros" or "size"), or None when it becomes sparse.

    ``least``: the size threshold in weights (None: ``min_weights()``). Sparsity is checked first, so a
    small dense matrix counts as "zeros".
    """
    if float((weight == 0).sum()) < min_sparsity * weight.numel():
        return "zeros"
    if weight.numel() < (min_weights() if least is None else least):
        return "size"
    return None


def describe_dense(reasons: dict[str, int], min_sparsity: float, least: int) -> str:
    """The load line's explanation of the matrices that stayed dense, e.g. "(2 under 30% zeros, 4 under
    262144 weights)"; empty when none did."""
    parts = []
    if reasons.get("zeros"):
        parts.append(f"{reasons['zeros']} under {min_sparsity:.0%} zeros")
    if reasons.get("size"):
        parts.append(f"{reasons['size']} under {least} weights")
    return f" ({', '.join(parts)})" if parts else ""
