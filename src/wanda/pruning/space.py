"""The bytes a pruning run will write, per folder, so that ``wanda.utils.space.check_space`` can refuse a run
whose disk cannot hold them before the first block instead of hours in.

A streamed run (``--offload disk``) writes, in its work folder, every pruned block (kept until the model is
saved) and, when the method reads statistics, the hidden states entering the next block: the new file is written
before the previous one is removed, so two of them at the peak (three under torchrun, where a rank keeps one
more). The calibration activations, when they leave RAM, are one memory-mapped file of nsamples x seqlen x
hidden values in the run's dtype (each walk's file replaces the last one's; the evaluation's windows come after
and reuse the folder). ``--save_model`` holds the weights: every tensor at the dtype the model holds it in
(dense), or each floating matrix of the blocks as its kept values plus a bitmask when that is smaller
(compressed, estimated at ``--sparsity_ratio``). docs/streaming.md writes the same formulas.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..engine.streaming import StreamSettings, activation_bytes, available_memory
from ..models.discovery import find_decoder_layout
from ..models.streaming import StreamedModel

__all__ = [
    "activation_bytes",
    "hidden_files_bytes",
    "saved_weights_bytes",
    "resident_needs",
    "grid_bytes",
    "streamed_needs",
    "activations_in_work_folder",
    "block_bytes",
]

#: (numel, dtype, pruned): one tensor as the sizing sees it.
Tensor = tuple[int, torch.dtype, bool]


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def hidden_files_bytes(nsamples: int, seqlen: int, hidden_size: int, dtype: torch.dtype, world_size: int = 1) -> int:
    """The hidden-state files a work folder holds at the peak: 2 (3 under torchrun) x nsamples x seqlen x hidden."""
    return (2 if world_size == 1 else 3) * activation_bytes(nsamples, seqlen, hidden_size, dtype)


def saved_weights_bytes(tensors: Iterable[Tensor], save_format: str, ratio: float) -> int | None:
    """The weights ``--save_model`` writes in ``save_format``: dense, every tensor's bytes; compressed, a pruned
    floating matrix as min(dense, kept x itemsize + ceil(numel / 8)) with kept = ceil((1 - ratio) x numel), the
    rest dense. None for the formats whose size is not estimated here (gguf, compressed-tensors)."""
    if save_format not in ("dense", "compressed"):
        return None
    total = 0
    for numel, dtype, pruned in tensors:
        dense = numel * _size(dtype)
        if save_format == "compressed" and pruned and dtype.is_floating_point:
            dense = min(dense, math.ceil((1 - ratio) * numel) * _size(dtype) + math.ceil(numel / 8))
        total += dense
    return total


def _resident_tensors(model: nn.Module) -> list[Tensor]:
    """The state dict as ``save_pretrained`` writes it (tied tensors once); a matrix of a block is pruned."""
    try:
        prefix = find_decoder_layout(model).path + "."
    except Exception:  # noqa: BLE001 - no decoder layout: size every tensor as dense
        prefix = None
    seen, out = set(), []
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.device.type != "meta" else name
        if key in seen:
            continue
        seen.add(key)
        pruned = prefix is not None and name.startswith(prefix) and tensor.dim() >= 2
        out.append((tensor.numel(), tensor.dtype, pruned))
    return out


def grid_bytes(model: nn.Module, groupsize: int) -> int:
    """The scales a ``--wbits`` prune records beside a dense or compressed save (``wanda.models.grid_record``):
    fp32, one per row and group of ``groupsize`` columns (-1: one per row) of every matrix of the blocks."""
    try:
        prefix = find_decoder_layout(model).path + "."
    except Exception:  # noqa: BLE001 - no decoder layout: nothing is quantized
        return 0
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(prefix):
            rows, cols = module.weight.shape
            total += 4 * rows * (1 if groupsize == -1 else -(-cols // groupsize))
    return total


def resident_needs(
    model: nn.Module, save_model: str | None, save_format: str, ratio: float, groupsize: int | None = None
) -> list:
    """``check_space``'s needs of a run with the model in memory: the saved model, if any, with the recorded
    scales of a ``--wbits`` run (``groupsize``: its ``--groupsize``; None without quantization)."""
    if save_model is None:
        return []
    count = saved_weights_bytes(_resident_tensors(model), save_format, ratio)
    if count is not None and groupsize is not None:
        count += grid_bytes(model, groupsize)
    return [] if count is None else [(save_model, count, f"the {save_format} model")]


def _streamed_tensors(streamed: StreamedModel) -> tuple[list[Tensor], int]:
    """Every checkpoint tensor at the dtype the model holds it in, and the bytes of the blocks' ones (the work
    folder's pruned blocks)."""
    prefix = streamed.layout.path + "."
    out, blocks = [], 0
    for name, info in streamed.checkpoint.entries.items():
        dtype = streamed.dtype_of(name) if info.dtype.is_floating_point else info.dtype
        inside = name.startswith(prefix)
        out.append((info.numel, dtype, inside and len(info.shape) >= 2))
        blocks += info.numel * _size(dtype) if inside else 0
    return out, blocks


def block_bytes(streamed: StreamedModel) -> int:
    """Block 0's tensors at the run's dtype: what one block in memory costs."""
    return sum(streamed.checkpoint.entries[n].numel for n in streamed.block_names(0)) * _size(streamed.dtype)


def activations_in_work_folder(need: int, block_bytes: int, stream: StreamSettings, device: torch.device) -> bool:
    """Without ``--offload_activations`` the activations leave RAM for the work folder when they would not fit
    in ``--memory_fraction`` of the available memory beside two blocks."""
    return need > available_memory(device) * stream.memory_fraction - 2 * block_bytes


def streamed_needs(
    streamed: StreamedModel,
    calibration_shape: tuple[int, int] | None,
    needs_hidden: bool,
    stream: StreamSettings,
    work_dir: str | Path,
    save_model: str | None,
    save_format: str,
    ratio: float,
    device: torch.device,
    world_size: int = 1,
) -> list:
    """``check_space``'s needs of a streamed run: the work folder (less the blocks a resumed run finds there),
    the activation file and the saved model."""
    tensors, blocks = _streamed_tensors(streamed)
    hidden = int(getattr(streamed.model.config, "hidden_size"))
    work = Path(work_dir)
    # a resumed run's finished blocks already take their space
    present = sum(f.stat().st_size for f in work.glob("block-*.safetensors")) if work.is_dir() else 0
    needs: list = [(work_dir, max(blocks - present, 0), "the pruned blocks")]
    if calibration_shape is not None:
        nsamples, seqlen = calibration_shape
        if needs_hidden:
            count = hidden_files_bytes(nsamples, seqlen, hidden, streamed.dtype, world_size)
            needs.append((work_dir, count, "the hidden states between blocks"))
        acts = activation_bytes(nsamples, seqlen, hidden, streamed.dtype)
        block = block_bytes(streamed)
        if stream.offload_activations:
            needs.append((stream.offload_activations, acts, "the activation file"))
        elif activations_in_work_folder(acts, block, stream, device):
            needs.append((work_dir, acts, "the activation file"))
    if save_model is not None:
        count = saved_weights_bytes(tensors, save_format, ratio)
        if count is not None:
            needs.append((save_model, count, f"the {save_format} model"))
    return needs
