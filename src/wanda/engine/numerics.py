"""Stopping a walk whose activations overflowed, at the block where it happened.

In half precision a block whose activations exceed 65504 (fp16's largest value) turns them into Inf, and the
next operation into NaN; every later statistic and mask would be computed from garbage and a broken model
written. One ``isfinite`` pass over a block's outputs is cheap beside the block's forward pass.
"""

from __future__ import annotations

import torch

from ..errors import WandaError

__all__ = ["check_finite_outputs"]


def check_finite_outputs(block_name: str, outputs: list[torch.Tensor]) -> None:
    """Raise, naming the block and what to do, if any of its outputs (batch, seq, hidden) is NaN or Inf."""
    bad = [out for out in outputs if not bool(torch.isfinite(out).all())]
    if not bad:
        return
    nan = sum(int(torch.isnan(out).sum()) for out in bad)
    inf = sum(int(torch.isinf(out).sum()) for out in bad)
    dtype = str(bad[0].dtype).removeprefix("torch.")
    raise WandaError(
        f"the outputs of block {block_name} became NaN or Inf ({nan} NaN, {inf} Inf in {dtype}), "
        "so pruning stopped there and nothing was written; the activations overflow this precision: "
        "rerun with --dtype bfloat16 or --dtype float32"
    )
