"""The layer-wise engine: capture the first block's inputs, then walk the blocks one at a time."""

from .capture import BlockInputs, capture_block_inputs
from .layerwise import BlockSource, LayerwiseEngine, ReadOnlyBlocks, ResidentBlocks, read_only

__all__ = [
    "BlockInputs",
    "capture_block_inputs",
    "LayerwiseEngine",
    "BlockSource",
    "ReadOnlyBlocks",
    "ResidentBlocks",
    "read_only",
]
