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
    nll, tokens = negative_log_likelihood(model, windows, batch_size, chunk_tokens, progress, desc)
    return math.exp(nll / tokens)


@torch.no_grad()
def negative_log_likelihood(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, chunk_tokens: int = 128,
                            progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """Summed next-token NLL over ``windows`` and the number of predicted tokens (sums, so that a distributed
    run can add those of its ranks; ``windows`` may be empty)."""
    if windows.shape[0] == 0:
        return 0.0, 0
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
            hidden, targets = hidden[:, :-1], batch[:, 1:]
            step = max(1, chunk_tokens // batch.shape[0])  # positions per chunk, over the whole batch
            for start in range(0, hidden.shape[1], step):
                h = hidden[:, start : start + step]
                logits = head(h.to(head.weight.device)).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                t = targets[:, start : start + step].to(logits.device)
                total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum").item()
                total_tokens += t.numel()
    finally:
        model.train(was_training)
    return total_nll, total_tokens
