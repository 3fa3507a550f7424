"""Sparse CPU kernels: pruned nn.Linear layers stored as bitmask + packed non-zero values.

Decoding one token is bound by memory bandwidth, not arithmetic: every weight is read once per token.
A 50%-sparse fp32 matrix stored as its non-zeros plus a one-bit mask costs 0.5 * 4 + 1/8 = 2.125 bytes per
weight instead of 4, so a kernel that streams the compressed form can approach a ~1.9x speedup; int8 codes
with one fp32 scale per 128 columns of a row cost 0.5 + 1/8 + 4/128 = 0.656 (``packing``).
"""

from wanda.kernels.load_rule import MIN_SPARSITY, MIN_WEIGHTS, dense_reason, describe_dense, min_weights
from wanda.kernels.sparse_linear import (
    KERNEL_PATHS,
    PREFILL_TILE_ROWS,
    SparseLinear,
    available_paths,
    get_kernel_path,
    scratch_bytes,
    set_kernel_path,
    sparsify_linears,
)

__all__ = [
    "KERNEL_PATHS",
    "MIN_SPARSITY",
    "MIN_WEIGHTS",
    "PREFILL_TILE_ROWS",
    "dense_reason",
    "describe_dense",
    "min_weights",
    "SparseLinear",
    "scratch_bytes",
    "available_paths",
    "get_kernel_path",
    "set_kernel_path",
    "sparsify_linears",
]
