"""What pruning one matrix hands back to the engine, whichever method produced it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerResult:
    """What pruning one matrix produced: the new weight (zeros at ``mask``), for OBS its predicted loss, and for
    the methods that factorise the Hessian the dampening (fraction of its mean diagonal) finally used.
    ``quant_params``: the groups' parameters (``wanda.quant.GroupParams``, column order) when the method put the
    weight on ``LayerSettings.grid`` in its own loop; then ``obs_loss`` is that joint loop's loss."""

    weight: torch.Tensor
    mask: torch.Tensor
    obs_loss: float | None = None
    damping: float | None = None
    quant_params: list | None = None
