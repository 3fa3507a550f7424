"""Seeded token windows: calibration samples and non-overlapping evaluation windows.

Randomness comes from numpy's PCG64 generator seeded with ``seed``, which gives the same stream on every
machine and platform, so the same seed always selects the same windows.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import WandaError
from ..utils.resources import release_memory
from .sources import TextSource

log = logging.getLogger(__name__)


#: Texts longer than this are tokenized in pieces (at document boundaries): a fast tokenizer's encoding of a
#: 4 MB string holds ~600 MB of offsets and token strings at its peak. Shorter texts (WikiText-2 test is
#: 1.3 MB) are tokenized whole, exactly as the papers' protocol does.
CHUNK_CHARS = 2_000_000


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Token ids of one long text, (tokens,). Long inputs are fine: windows are cut afterwards."""
    previous = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e30)  # silence the "sequence longer than the model" warning
    try:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    finally:
        if previous is not None:
            tokenizer.model_max_length = previous


def tokenize_documents(
    tokenizer, documents: list[str], separator: str, chunk_chars: int = CHUNK_CHARS, max_tokens: int | None = None
) -> torch.Tensor:
    """Token ids of ``separator.join(documents)``, tokenized in pieces of about ``chunk_chars`` characters.

    Each piece ends with the separator and the next starts at a document, so only the special tokens of the
    first piece are kept; the result equals whole-text tokenization whenever the text fits in one piece.
    With ``max_tokens``, pieces stop once that many tokens are there (the result then holds at least
    ``max_tokens`` tokens, or all of them): the first N tokens are the same either way.
    """
    pieces: list[torch.Tensor] = []
    group: list[str] = []
    size = 0

    def flush(last: bool) -> None:
        text = separator.join(group) + ("" if last else separator)
        ids = tokenize_stream(tokenizer, text)
        if pieces:  # drop the BOS (or other leading special tokens) the tokenizer adds to every call
            ids = _strip_leading_special(tokenizer, ids)
        pieces.append(ids)

    for doc in documents:
        if group and size + len(doc) > chunk_chars:
            flush(last=False)
            group, size = [], 0
            if max_tokens is not None and sum(piece.numel() for piece in pieces) >= max_tokens:
                break
        group.append(doc)
        size += len(doc) + len(separator)
    else:
        flush(last=True)
    stream = torch.cat(pieces)
    release_memory()  # the tokenizer's transient buffers (hundreds of MB for a few MB of text)
    return stream


def _strip_leading_special(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    start = 0
    while start < ids.numel() and int(ids[start]) in special:
        start += 1
    return ids[start:]


def _from_stream(stream: torch.Tensor, nsamples: int, seqlen: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, stream.numel() - seqlen, size=nsamples, endpoint=True)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def _from_documents(
    source: TextSource, tokenizer, nsamples: int, seqlen: int, rng: np.random.Generator, max_tries_per_sample: int = 200
) -> torch.Tensor:
    """The paper's C4 protocol: a random window from each of ``nsamples`` random documents longer than it."""
    windows = []
    tries = 0
    while len(windows) < nsamples:
        tries += 1
        if tries > max_tries_per_sample * nsamples:
            raise WandaError(
                f"{source.name}: found only {len(windows)} documents longer than {seqlen} tokens in {tries - 1} "
                f"draws; lower --seqlen or --nsamples"
            )
        doc = source.documents[int(rng.integers(len(source.documents)))]
        ids = tokenize_stream(tokenizer, doc)
        if ids.numel() <= seqlen:
            continue
        start = int(rng.integers(0, ids.numel() - seqlen))
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def calibration_windows(source: TextSource, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) token ids drawn at random from ``source``.

    Stream sources need at least nsamples * seqlen tokens, so that the windows can cover distinct text.
    """
    if nsamples < 1 or seqlen < 2:
        raise WandaError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if seed < 0:
        raise WandaError(f"--seed must be at least 0, got {seed}")
    rng = np.random.Generator(np.random.PCG64(seed))
    if source.sampling == "documents":
        return _from_documents(source, tokenizer, nsamples, seqlen, rng)
    stream = tokenize_documents(tokenizer, source.documents, source.separator)
    needed = nsamples * seqlen
    if stream.numel() < needed:
        raise WandaError(
            f"calibration corpus {source.name} has {stream.numel()} tokens, but {nsamples} windows of {seqlen} "
            f"tokens need {needed}; use a larger corpus or lower --nsamples/--seqlen"
        )
    return _from_stream(stream, nsamples, seqlen, rng)


def evaluation_windows(source: TextSource, tokenizer, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens from the start of the joined corpus
    (the paper's WikiText-2 protocol; the tail shorter than a window is dropped)."""
    limits = [n for n in (source.max_eval_windows, max_windows) if n is not None]
    needed = min(limits) * seqlen if limits else None
    stream = tokenize_documents(tokenizer, source.documents, source.separator, max_tokens=needed)
    count = stream.numel() // seqlen
    for limit in limits:
        count = min(count, limit)
    if count < 1:
        raise WandaError(
            f"evaluation corpus {source.name} has {stream.numel()} tokens, fewer than one window of {seqlen}; "
            "lower --seqlen or use a larger corpus"
        )
    return stream[: count * seqlen].reshape(count, seqlen)
