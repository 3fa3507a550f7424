"""Perplexity as in the paper: mean next-token NLL over non-overlapping windows, exponentiated.

The LM head is applied to at most ``chunk_tokens`` positions of the batch at a time, so a window's
full-vocabulary logits (seqlen x vocab floats: 200 MB for 1024 x 49k in fp32) never exist at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _logit_cap(model: nn.Module) -> float | None:
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, chunk_tokens: int = 128,
               progress: bool = True, desc: str = "perplexity") -> float:
    """Perplexity of ``model`` on ``windows`` (n, seqlen) of token ids."""
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    body = model.base_model
    device = model.get_input_embeddings().weight.device
    cap = _logit_cap(model)
    total_nll = 0.0
    total_tokens = 0
    try:
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
            batch = batch.to(device)
            hidden = body(input_ids=batch, use_cache=False).last_hidden_state  # (b, seq, hidden)
            nll, tokens = window_nll(head, hidden, batch, chunk_tokens, cap)
            total_nll += nll
            total_tokens += tokens
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def window_nll(head: nn.Module, hidden: torch.Tensor, batch: torch.Tensor, chunk_tokens: int,
               cap: float | None) -> tuple[float, int]:
    """Summed next-token NLL of one batch from its final hidden states (b, seq, hidden), and its token count;
    the head sees at most ``chunk_tokens`` positions at a time."""
    hidden, targets = hidden[:, :-1], batch[:, 1:]
    step = max(1, chunk_tokens // batch.shape[0])  # positions per chunk, over the whole batch
    total_nll, total_tokens = 0.0, 0
    for start in range(0, hidden.shape[1], step):
        h = hidden[:, start : start + step]
        logits = head(h.to(head.weight.device)).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        t = targets[:, start : start + step].to(logits.device)
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum").item()
        total_tokens += t.numel()
    return total_nll, total_tokens
