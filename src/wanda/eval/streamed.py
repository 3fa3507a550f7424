"""Perplexity computed block by block, for models that do not fit in memory.

The same walk as pruning (``wanda.engine.LayerwiseEngine`` over ``StreamedBlocks``): every evaluation window
goes through block i before block i+1 is read from disk. At the end the model's own code after the blocks
(final norm, OPT's output projection, ...) runs once per batch with the block list swapped for a stand-in that
hands back the walked hidden states, and the head (with the model's logit post-processing) is applied in
chunks by ``perplexity``'s own ``batch_nll``: with the same
batch size the operations, and so the result, are the in-memory evaluation's.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..engine import LayerwiseEngine
from ..engine.streaming import StreamedBlocks
from ..models.streaming import StreamedModel
from .perplexity import batch_nll, nll_to_perplexity

__all__ = ["streamed_nll", "streamed_perplexity"]


class _Replay(nn.Module):
    """Stands in for the decoder blocks: returns the hidden states already computed for this batch."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@contextmanager
def _replaying(model: nn.Module, path: str, replay: _Replay) -> Iterator[None]:
    parent_name, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, leaf)
    setattr(parent, leaf, nn.ModuleList([replay]))
    try:
        yield
    finally:
        setattr(parent, leaf, blocks)


def streamed_perplexity(
    streamed: StreamedModel,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    chunk_tokens: int = 128,
    activations: Path | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``streamed`` (built ``with_head``) on ``windows`` (n, seqlen), one block resident at a time.

    ``activations``: a folder for the windows' hidden states (n x seqlen x hidden values) instead of RAM."""
    return nll_to_perplexity(*streamed_nll(streamed, windows, device, batch_size, chunk_tokens, activations, progress))


@torch.no_grad()
def streamed_nll(
    streamed: StreamedModel,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    chunk_tokens: int = 128,
    activations: Path | None = None,
    progress: bool = True,
) -> tuple[float, int]:
    """Summed next-token NLL over ``windows`` and the number of predicted tokens (sums, so that a distributed
    run can add those of its ranks)."""
    model = streamed.model
    source = StreamedBlocks(streamed, torch.device(device), activations=activations)
    engine = LayerwiseEngine(model, device, batch_size, progress, streamed.layout, source)
    try:
        inputs = engine.walk(windows)
        replay = _Replay(engine.block_returns_tuple)
        body = getattr(model, model.base_model_prefix)
        embed_device = model.get_input_embeddings().weight.device
        total_nll, total_tokens = 0.0, 0
        with _replaying(model, streamed.layout.path, replay):
            for hidden, batch in zip(inputs.hidden, windows.split(batch_size)):
                replay.hidden = hidden
                batch = batch.to(embed_device)
                final = body(input_ids=batch, use_cache=False).last_hidden_state
                nll, tokens = batch_nll(model, final, batch, chunk_tokens)
                total_nll += nll
                total_tokens += tokens
    finally:
        source.close()
    return total_nll, total_tokens
