"""Training text as consecutive blocks of ``block_size`` tokens (the causal-LM recipe of ``run_clm.py``).

Documents are joined with the source's separator into one token stream, which is cut into non-overlapping
blocks; the remainder shorter than a block is dropped. Only as many documents are tokenized as the wanted
number of blocks needs, so ``max_train_samples`` on C4 does not tokenize the whole shard.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from ..data import TextSource, tokenize_stream
from ..errors import WandaError

log = logging.getLogger(__name__)

__all__ = ["BlockDataset", "training_blocks"]

#: Documents tokenized per call; large enough to amortise the tokenizer call, small enough to stop early.
_DOCS_PER_CHUNK = 256


def training_blocks(source: TextSource, tokenizer, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """(n, block_size) token ids: the first ``max_blocks`` (or all) consecutive blocks of ``source``."""
    if block_size < 2:
        raise WandaError(f"--block_size must be at least 2, got {block_size}")
    needed = None if max_blocks is None else max_blocks * block_size
    pieces: list[torch.Tensor] = []
    have = 0
    docs = source.documents
    for start in range(0, len(docs), _DOCS_PER_CHUNK):
        # every chunk ends with the separator, so consecutive chunks join exactly like the whole corpus would
        text = source.separator.join(docs[start : start + _DOCS_PER_CHUNK]) + source.separator
        ids = tokenize_stream(tokenizer, text)
        pieces.append(ids)
        have += ids.numel()
        if needed is not None and have >= needed:
            break
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    count = stream.numel() // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count < 1:
        raise WandaError(
            f"training corpus {source.name} has {stream.numel()} tokens, fewer than one block of {block_size}; "
            "lower --block_size or use a larger corpus"
        )
    log.info("training data: %d blocks of %d tokens from %s", count, block_size, source.name)
    return stream[: count * block_size].reshape(count, block_size)


class BlockDataset(Dataset):
    """Rows of token ids as causal-LM examples; the model shifts ``labels`` by one itself."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be (n, block_size), got shape {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.blocks[index]
        return {"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)}
