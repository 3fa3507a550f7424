"""Mask selection: which weights to prune given their scores. ``True`` in a mask means *pruned*."""

from .checks import check_nm, mask_sparsity, overall_sparsity, zero_count, zero_fraction
from .select import (
    lowest_k_mask,
    matrix_mask,
    nm_mask,
    prune_count,
    row_mask,
    row_mask_count,
    row_spread_mask,
    select_mask,
    variant_mask,
)

__all__ = [
    "lowest_k_mask",
    "matrix_mask",
    "nm_mask",
    "row_mask",
    "row_mask_count",
    "row_spread_mask",
    "prune_count",
    "select_mask",
    "variant_mask",
    "check_nm",
    "mask_sparsity",
    "overall_sparsity",
    "zero_count",
    "zero_fraction",
]
