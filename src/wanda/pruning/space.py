"""The bytes a pruning run will write, per folder, so that ``wanda.utils.space.check_space`` can refuse a run
whose disk cannot hold them before the first block instead of hours in.

A streamed run (``--offload disk``) writes, in its work folder, every pruned block (kept until the model is
saved) and, when the method reads statistics, the hidden states entering the next block: the new file is written
before the previous one is removed, so two of them at the peak (three under torchrun, where a rank keeps one
more). The calibration activations, when they leave RAM, are one memory-mapped file of nsamples x seqlen x
hidden values in the run's dtype (each walk's file replaces the last one's; the evaluation's windows come after
and reuse the folder). ``--save_model`` holds the weights: every tensor at the dtype the model holds it in
(dense), or each matrix the run prunes as its kept values plus a bitmask when that is smaller (compressed,
estimated at its ratio: ``--sparsity_ratio`` or its ``--target_ratios``; ``--targets``/``--ignore`` leave
matrices dense), or a block matrix at 34/32 (Q8_0) or 18/32 (Q4_0) bytes per weight (gguf), or each quantized
matrix at bits/8 per weight plus its scales (compressed-tensors). docs/streaming.md writes the same formulas.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from torch import nn

from ..engine.streaming import StreamSettings, activation_bytes, available_memory
from ..models.discovery import DecoderLayout, find_decoder_layout
from ..models.streaming import StreamedModel
from ..models.targets import MatrixTargets

__all__ = [
    "SavePlan",
    "Sized",
    "activation_bytes",
    "hidden_files_bytes",
    "saved_weights_bytes",
    "resident_needs",
    "grid_bytes",
    "streamed_needs",
    "activations_in_work_folder",
    "block_bytes",
]

#: Bytes per weight of the GGUF block types (32 weights: 32 int8 codes or 16 bytes of 4-bit codes, an fp16 scale).
GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18}
_GGUF_ALIGN = 32  # gguf pads every tensor's data to this


class Sized(NamedTuple):
    """One tensor as the sizing sees it: ``pruned``, a matrix of the blocks the run prunes (and quantizes)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pruned: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SavePlan:
    """What the size of ``--save_model``'s weights depends on: the format, the ratio and which matrices are
    pruned (``--targets``, ``--ignore``, ``--target_ratios``), the GGUF type or the pack-quantized grid."""

    save_format: str = "dense"
    ratio: float = 0.5
    targets: MatrixTargets = MatrixTargets()
    gguf_type: str | None = None
    wbits: int | None = None
    groupsize: int = -1

    @classmethod
    def of(cls, save_format: str, settings, quant=None) -> SavePlan:
        """From the run's ``PruneSettings`` and ``QuantSettings``."""
        return cls(
            save_format, settings.sparsity_ratio, settings.matrix_targets,
            getattr(quant, "gguf_type", None), getattr(quant, "wbits", None), _groupsize(quant),
        )  # fmt: skip


def _groupsize(quant) -> int:
    """The columns per group of the run's grid (32 for the GGUF types, whatever ``--groupsize`` says)."""
    grid = quant.grid() if quant is not None and getattr(quant, "wbits", None) is not None else None
    return -1 if grid is None else grid.groupsize


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def hidden_files_bytes(nsamples: int, seqlen: int, hidden_size: int, dtype: torch.dtype, world_size: int = 1) -> int:
    """The hidden-state files a work folder holds at the peak: 2 (3 under torchrun) x nsamples x seqlen x hidden."""
    return (2 if world_size == 1 else 3) * activation_bytes(nsamples, seqlen, hidden_size, dtype)


def _gguf_bytes(t: Sized, gguf_type: str) -> int:
    """As ``export.gguf.save_gguf`` writes it: a block matrix whose rows split into blocks of 32 in the type,
    other matrices in F16, the rest in F32, each padded to the alignment."""
    if ".layers." in t.name and len(t.shape) == 2 and t.shape[1] % 32 == 0:
        count = t.numel // 32 * GGUF_BLOCK_BYTES[gguf_type]
    else:
        count = t.numel * (2 if len(t.shape) == 2 else 4)
    return -(-count // _GGUF_ALIGN) * _GGUF_ALIGN


def _pack_quantized_bytes(t: Sized, bits: int, groupsize: int) -> int:
    """As compressed-tensors' pack-quantized layout stores a quantized (rows, cols) matrix: the codes packed
    into int32 words per row, one float32 scale per row and group, and the int64 shape."""
    rows, cols = t.shape
    groups = 1 if groupsize == -1 else math.ceil(cols / groupsize)
    return rows * math.ceil(cols * bits / 32) * 4 + rows * groups * 4 + 2 * 8


def saved_weights_bytes(tensors: Iterable[Sized], plan: SavePlan) -> int:
    """The weights ``--save_model`` writes. dense: every tensor's bytes; compressed: a pruned floating matrix
    as min(dense, kept x itemsize + ceil(numel / 8)) with kept = ceil((1 - ratio) x numel) at its own ratio
    (``--target_ratios``), the rest dense; gguf: ``_gguf_bytes``; compressed-tensors: each pruned (and so
    quantized) linear weight as ``_pack_quantized_bytes``, the rest dense."""
    total = 0
    for t in tensors:
        dense = t.numel * _size(t.dtype)
        if plan.save_format == "gguf":
            dense = _gguf_bytes(t, plan.gguf_type or "Q8_0")
        elif t.pruned and plan.save_format == "compressed" and t.dtype.is_floating_point:
            ratio = plan.targets.ratio(t.name.removesuffix(".weight"), plan.ratio)
            dense = min(dense, math.ceil((1 - ratio) * t.numel) * _size(t.dtype) + math.ceil(t.numel / 8))
        elif t.pruned and plan.save_format == "compressed-tensors" and len(t.shape) == 2 and plan.wbits:
            dense = _pack_quantized_bytes(t, plan.wbits, plan.groupsize)
        total += dense
    return total


def _pruned_names(model: nn.Module, layout: DecoderLayout | None, targets: MatrixTargets) -> set[str]:
    """The state-dict names of the parameters the run prunes: the layout's matrices less those ``targets``
    leave out."""
    if layout is None:
        return set()
    layout = dataclasses.replace(layout, targets=targets)
    modules = {id(m): name for name, m in model.named_modules()}
    return {
        f"{modules[id(m.module)]}.{m.parameter}"
        for index in range(len(layout.blocks))
        for m in layout.matrices(index).prunable.values()
        if id(m.module) in modules
    }


def _resident_tensors(model: nn.Module, targets: MatrixTargets) -> list[Sized]:
    """The state dict as ``save_pretrained`` writes it (tied tensors once)."""
    try:
        layout = find_decoder_layout(model)
    except Exception:  # noqa: BLE001 - no decoder layout: size every tensor as dense
        layout = None
    pruned = _pruned_names(model, layout, targets)
    seen, out = set(), []
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.device.type != "meta" else name
        if key in seen:
            continue
        seen.add(key)
        out.append(Sized(name, tuple(tensor.shape), tensor.dtype, name in pruned))
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


def resident_needs(model: nn.Module, save_model: str | None, plan: SavePlan) -> list:
    """``check_space``'s needs of a run with the model in memory: the saved model, if any, with the scales a
    ``--wbits`` run records beside a dense or compressed save (``grid_bytes``)."""
    if save_model is None:
        return []
    count = saved_weights_bytes(_resident_tensors(model, plan.targets), plan)
    if plan.wbits is not None and plan.save_format in ("dense", "compressed"):
        count += grid_bytes(model, plan.groupsize)
    return [(save_model, count, f"the {plan.save_format} model")]


def _streamed_tensors(streamed: StreamedModel, targets: MatrixTargets) -> tuple[list[Sized], int]:
    """Every checkpoint tensor at the dtype the model holds it in, and the bytes of the blocks' ones (the work
    folder's pruned blocks)."""
    prefix = streamed.layout.path + "."
    pruned = _pruned_names(streamed.model, streamed.layout, targets)
    out, blocks = [], 0
    for name, info in streamed.checkpoint.entries.items():
        dtype = streamed.dtype_of(name) if info.dtype.is_floating_point else info.dtype
        out.append(Sized(name, tuple(info.shape), dtype, name in pruned))
        blocks += info.numel * _size(dtype) if name.startswith(prefix) else 0
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
    plan: SavePlan,
    device: torch.device,
    world_size: int = 1,
) -> list:
    """``check_space``'s needs of a streamed run: the work folder (less the blocks a resumed run finds there),
    the activation file and the saved model."""
    tensors, blocks = _streamed_tensors(streamed, plan.targets)
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
        needs.append((save_model, saved_weights_bytes(tensors, plan), f"the {plan.save_format} model"))
    return needs
