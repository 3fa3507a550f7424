"""Perplexity as in the paper: mean next-token NLL over non-overlapping windows, exponentiated.

The logits are the model's own: after its LM head, whatever the model's ``forward`` does to them (Granite
divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma-2 and 3 soft-cap them), so the result
equals ``exp(model(ids, labels=ids).loss)``. They are made for at most ``chunk_tokens`` positions at a time, so
a window's full-vocabulary logits (seqlen x vocab floats: 200 MB for 1024 x 49k in fp32, 1 GB for Gemma 3's
262k vocabulary) never exist at once.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import MoeModelOutputWithPast


class _GivenHidden(nn.Module):
    """Stands in for a causal LM's body and returns hidden states computed earlier, so that the LM's own
    ``forward`` applies its head and its logit post-processing to them (and nothing else runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    @property
    def decoder(self) -> "_GivenHidden":  # OPT's forward calls ``self.model.decoder(...)``
        return self

    def forward(self, *args, **kwargs) -> MoeModelOutputWithPast:
        # the MoE output type: a mixture-of-experts LM's forward also reads ``router_logits`` (None here)
        return MoeModelOutputWithPast(last_hidden_state=self.hidden)


@contextmanager
def _head_only(model: nn.Module) -> Iterator[_GivenHidden]:
    """Swap the model's body for a ``_GivenHidden`` for the duration."""
    prefix = model.base_model_prefix
    body = getattr(model, prefix)
    stub = _GivenHidden()
    setattr(model, prefix, stub)
    try:
        yield stub
    finally:
        setattr(model, prefix, body)


def model_logits(model: nn.Module, hidden: torch.Tensor, stub: _GivenHidden) -> torch.Tensor:
    """The logits ``model`` makes from final hidden states ``hidden`` (batch, positions, hidden), in fp32."""
    stub.hidden = hidden
    dummy = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    return model(input_ids=dummy, use_cache=False).logits.float()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    chunk_tokens: int = 128,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of ``model`` on ``windows`` (n, seqlen) of token ids; ``inf`` or ``nan`` if the model's
    losses are (a broken model is never reported as a number)."""
    total_nll, total_tokens = negative_log_likelihood(model, windows, batch_size, chunk_tokens, progress, desc)
    return nll_to_perplexity(total_nll, total_tokens)


@torch.no_grad()
def negative_log_likelihood(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    chunk_tokens: int = 128,
    progress: bool = True,
    desc: str = "perplexity",
) -> tuple[float, int]:
    """Summed next-token NLL over ``windows`` and the number of predicted tokens (sums, so that a distributed
    run can add those of its ranks; ``windows`` may be empty)."""
    if windows.shape[0] == 0:
        return 0.0, 0
    was_training = model.training
    model.eval()
    body = getattr(model, model.base_model_prefix)
    device = model.get_input_embeddings().weight.device
    total_nll = 0.0
    total_tokens = 0
    try:
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
            batch = batch.to(device)
            hidden = body(input_ids=batch, use_cache=False).last_hidden_state  # (b, seq, hidden)
            nll, tokens = batch_nll(model, hidden, batch, chunk_tokens)
            total_nll += nll
            total_tokens += tokens
    finally:
        model.train(was_training)
    return total_nll, total_tokens


def batch_nll(model: nn.Module, hidden: torch.Tensor, batch: torch.Tensor, chunk_tokens: int) -> tuple[float, int]:
    """Summed next-token NLL of one batch from its final hidden states (b, seq, hidden), and the number of
    tokens predicted; the logits exist for at most ``chunk_tokens`` positions at a time."""
    hidden, targets = hidden[:, :-1], batch[:, 1:]
    step = max(1, chunk_tokens // batch.shape[0])  # positions per chunk, over the whole batch
    total_nll, total_tokens = 0.0, 0
    with _head_only(model) as stub:
        for start in range(0, hidden.shape[1], step):
            logits = model_logits(model, hidden[:, start : start + step], stub)
            t = targets[:, start : start + step].to(logits.device)
            total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum").item()
            total_tokens += t.numel()
    return total_nll, total_tokens


def nll_to_perplexity(total_nll: float, total_tokens: int) -> float:
    mean = total_nll / total_tokens
    return math.exp(mean) if math.isfinite(mean) else mean
