"""Greedy generation with prefill and decode timed apart, as a user of ``model.generate`` sees them.

Why apart: prefill (the prompt in one forward pass) is compute bound, decoding (one token per forward pass) is
bound by memory bandwidth, so one tokens/s figure over both hides what a sparse kernel changes. A streamer is
called by ``generate`` once with the prompt (before any forward pass) and then once per new token (after the
forward pass that chose it), so the time from the first call to the second is the prefill, and the calls
after the second are the decode steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["GenerationTiming", "timed_generate"]


@dataclass
class GenerationTiming:
    """Tokens and seconds of one ``generate`` call (batch 1)."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float  # after the first new token: new_tokens - 1 decode steps
    tokens: list[int]  # the new token ids

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("tokens")
        out["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        return out


class _Stamps:
    """A ``generate`` streamer that records when each call arrives (the first carries the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def timed_generate(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, stop_at_eos: bool = True
) -> GenerationTiming:
    """Greedy ``model.generate`` of up to ``max_new_tokens`` after ``input_ids`` (1 x T), with the KV cache.

    ``stop_at_eos=False`` always generates ``max_new_tokens`` (for timing, so runs compare equal work).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"timed_generate takes one prompt (1 x T ids), got shape {tuple(input_ids.shape)}")
    stamps = _Stamps()
    extra: dict = {}
    if not stop_at_eos:
        extra["eos_token_id"] = None
        extra["min_new_tokens"] = max_new_tokens
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(pad, list):
            pad = pad[0]
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        streamer=stamps,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
        **extra,
    )
    new = out[0, input_ids.shape[1] :].tolist()
    t = stamps.times
    prefill = t[1] - t[0] if len(t) > 1 else float("nan")
    decode = t[-1] - t[1] if len(t) > 2 else 0.0
    return GenerationTiming(input_ids.shape[1], len(new), prefill, decode, new)
