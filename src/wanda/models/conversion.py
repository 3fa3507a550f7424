"""Checkpoints stored in another layout than the model's modules, read block by block with transformers' own
conversion mapping.

transformers loads some architectures from a layout unlike their modules: a Mixtral checkpoint holds one w1, w2
and w3 matrix per expert, the model one fused ``gate_up_proj`` and ``down_proj`` per block. ``from_pretrained``
renames and merges them with the mapping of ``transformers.conversion_mapping`` (and ``save_pretrained`` writes
the per-expert layout back). The streamed reader reads one block at a time, so it applies the same mapping to
that block's source tensors: each merged parameter is a ``ConvertedInfo`` entry of the checkpoint, whose sources
are read and merged by the library's own converter when the block is loaded. Nothing of the conversion itself is
written here, so a family transformers learns to convert streams as it loads.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import TensorInfo

__all__ = ["ConvertedInfo", "conversion_targets"]


@dataclass(frozen=True)
class ConvertedInfo:
    """A model parameter that transformers builds from several checkpoint tensors (in the converter's order)."""

    key: str  # the model's name
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[TensorInfo, ...]
    patterns: tuple[str, ...]  # the converter's source pattern each source matched
    converter: Any  # transformers' WeightConverter, used as a template

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self, read: Callable[[TensorInfo], torch.Tensor]) -> torch.Tensor:
        converter = copy.deepcopy(self.converter)
        for info, pattern in zip(self.sources, self.patterns):
            converter.add_tensor(self.key, info.key, pattern, read(info))
        return converter.convert(self.key)[self.key]


def conversion_targets(
    model: nn.Module, keys: list[str], wanted: set[str]
) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], Any]:
    """For the checkpoint ``keys`` the model's names do not hold as they are: those transformers renames one to
    one (key -> model name), those it merges (model name -> [(key, source pattern)], in its order) and the
    converters by source pattern. Keys it does not map either are left out of both."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # a transformers without conversion mappings loads every layout one to one
        return {}, {}, {}
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    meta = dict.fromkeys(wanted, True)
    renamed: dict[str, str] = {}
    merged: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in wanted:
            continue
        if pattern is None:
            renamed[key] = target
        else:
            merged.setdefault(target, []).append((key, pattern))
    return renamed, merged, by_pattern
