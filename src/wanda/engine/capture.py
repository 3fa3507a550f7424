"""Capturing what the first decoder block receives, for every calibration sample.

A forward pre-hook on block 0 records the hidden states and *every* other argument the model passes to its
blocks (attention mask, position ids, rotary embeddings, cache position, ... whatever the installed
``transformers`` version uses), then aborts the forward pass: nothing past the embeddings is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_DROPPED_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


class _Captured(Exception):
    """Raised by the pre-hook to stop the forward pass once block 0's inputs are known."""


@dataclass
class BlockInputs:
    """Per calibration batch: hidden states (batch, seq, hidden) plus the other arguments of the block call."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors, also inside tuples, lists and dicts, leaving everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> BlockInputs:
    """Run the model on ``input_ids`` (n, seq) in batches, stopping at ``first_block``."""
    captured = BlockInputs()

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for key in _DROPPED_KWARGS:
            kwargs.pop(key, None)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.hidden.append(hidden.detach().to(device))
        captured.args.append(to_device(tuple(args[1:]), device))
        captured.kwargs.append(to_device(kwargs, device))
        raise _Captured

    embed_device = model.get_input_embeddings().weight.device
    handle = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(embed_device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured
