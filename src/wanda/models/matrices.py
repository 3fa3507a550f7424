"""The one enumeration of what is prunable inside a decoder block, and of what is not and why.

A prunable matrix is either the weight of an ``nn.Linear`` or one expert's slice of a fused 3-D expert
parameter, as recent ``transformers`` stores mixtures of experts (Mixtral, Qwen-MoE, DeepSeek, gpt-oss:
``gate_up_proj`` of shape (experts, 2 * intermediate, hidden), or (experts, hidden, 2 * intermediate) where the
experts module says ``is_transposed``). A fused ``gate_up_proj`` slice is two matrices, its gate and its up
rows (concatenated, or interleaved where the module says ``is_concatenated = False``), exactly as a dense
gated MLP has a ``gate_proj`` and an ``up_proj``; the two share their input, hence their statistic.

Every other parameter of the block is listed as not pruned, with its reason: a router (the gate that picks the
experts is never pruned: its few rows decide where every token goes), a norm, a bias or another vector, a
matrix in a layout this code does not know (a GPT-2 style ``Conv1D``, a 3-D parameter that is not per expert,
...), or a matrix the caller's override left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..kernels import SparseLinear

#: Reasons a block parameter is not pruned (the report groups by them).
ROUTER = "router"
NORM = "norm"
VECTOR = "bias or other vector"
UNSUPPORTED = "unsupported layout"
EXCLUDED = "excluded by the structure override"
NOT_TARGETED = "left out by --targets / --ignore"
UNOBSERVED = "unsupported layout: its per-expert inputs could not be observed"

_ROUTER_NAME = re.compile(r"(^|_)(gate|router)$")


@dataclass(frozen=True)
class PrunableMatrix:
    """One (out, in) weight matrix: ``module.<parameter>`` for a linear layer, or expert ``expert``'s slice of
    a fused 3-D parameter (``rows`` picks the gate or up half of a fused gate_up slice)."""

    name: str
    module: nn.Module
    parameter: str = "weight"
    expert: int | None = None
    transposed: bool = False
    rows: slice | None = None
    #: the input this matrix reads: matrices with the same key (the gate and up halves) share one statistic
    input_key: str = ""

    @property
    def weight(self) -> torch.Tensor:
        """A (out, in) view of the model's weight: writing into it writes into the model."""
        data = getattr(self.module, self.parameter).data
        if self.expert is not None:
            data = data[self.expert]
            if self.transposed:  # stored (in, out): the forward computes x @ W
                data = data.T
        return data if self.rows is None else data[self.rows]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclass(frozen=True)
class NotPruned:
    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class BlockMatrices:
    """What ``find_prunable`` found in one block: the matrices to prune (by qualified name, in registration
    order) and every other parameter with the reason it is left alone."""

    prunable: dict[str, PrunableMatrix] = field(default_factory=dict)
    not_pruned: list[NotPruned] = field(default_factory=list)


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_router(module_name: str, module: nn.Module) -> bool:
    last = module_name.rsplit(".", 1)[-1]
    cls = type(module).__name__
    return bool(_ROUTER_NAME.search(last)) or "Router" in cls or cls.endswith("Gate")


def _expert_count(module: nn.Module) -> int | None:
    count = getattr(module, "num_experts", None)
    return count if isinstance(count, int) and count > 0 else None


def _expert_matrices(
    module_name: str, module: nn.Module, parameter: str, param: nn.Parameter, prefix: str
) -> list[PrunableMatrix]:
    """A fused (experts, out, in) parameter (or (experts, in, out) when transposed) as per-expert matrices."""
    transposed = bool(getattr(module, "is_transposed", False))
    out_features = param.shape[2] if transposed else param.shape[1]
    split = parameter == "gate_up_proj" and getattr(module, "has_gate", True) and out_features % 2 == 0
    if split:
        half = out_features // 2
        if getattr(module, "is_concatenated", True):
            parts = {"gate": slice(0, half), "up": slice(half, out_features)}
        else:  # interleaved [gate0, up0, gate1, up1, ...] (gpt-oss)
            parts = {"gate": slice(0, None, 2), "up": slice(1, None, 2)}
    else:
        parts = {"": None}
    base = _qualify(prefix, _qualify(module_name, parameter))
    return [
        PrunableMatrix(
            f"{base}[{e}]" + (f".{part}" if part else ""),
            module,
            parameter,
            e,
            transposed,
            rows,
            input_key=f"{base}[{e}]",
        )
        for e in range(param.shape[0])
        for part, rows in parts.items()
    ]


def _included(relative: str, include: tuple[str, ...] | None) -> bool:
    return include is None or any(fnmatchcase(relative, p) for p in include)


def find_prunable(block: nn.Module, prefix: str = "", include: tuple[str, ...] | None = None) -> BlockMatrices:
    """Every weight matrix in ``block`` to prune, and every other parameter with its reason.

    ``include``: glob patterns of names relative to ``block``: a linear layer's module name
    (``"self_attn.*_proj"``) or a fused expert parameter's name (``"mlp.experts.down_proj"``); matrices matching
    none are listed as excluded. ``None`` prunes every matrix the generic rules find.
    """
    found = BlockMatrices()
    for module_name, module in block.named_modules():
        for parameter, param in module.named_parameters(recurse=False):
            relative = _qualify(module_name, parameter)
            qualified = _qualify(prefix, relative)
            shape = tuple(param.shape)
            if _is_router(module_name, module):
                reason = ROUTER
            elif "norm" in type(module).__name__.lower():
                reason = NORM
            elif param.dim() < 2 or parameter.endswith("bias"):  # per-expert biases are (experts, out)
                reason = VECTOR
            elif isinstance(module, nn.Linear) and parameter == "weight":
                reason = None
                relative = module_name  # a linear layer is named by its module, as before
                linear = _qualify(prefix, relative)
                matrices = [PrunableMatrix(linear, module, input_key=linear)]
            elif param.dim() == 3 and _expert_count(module) == param.shape[0]:
                reason = None
                matrices = _expert_matrices(module_name, module, parameter, param, prefix)
            else:
                reason = f"{UNSUPPORTED}: {param.dim()}-D parameter of {type(module).__name__}"
            if reason is None and not _included(relative, include):
                reason = EXCLUDED
            if reason is not None:
                found.not_pruned.append(NotPruned(qualified, shape, reason))
                continue
            for matrix in matrices:
                found.prunable[matrix.name] = matrix
    return found


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers among ``find_prunable``'s matrices (routers excluded), by qualified name: for
    code that needs the modules themselves (sparse-kernel export, LoRA targets)."""
    return {
        name: m.module for name, m in find_prunable(module, prefix).prunable.items() if isinstance(m.module, nn.Linear)
    }


def matrix_zero_counts(block: nn.Module, prefix: str = "") -> dict[str, tuple[int, int]]:
    """(exact zeros, size) of every matrix in ``block`` that the pruner finds (``find_prunable``: linear layers
    and each expert's slice of a fused expert parameter), and of every packed ``SparseLinear`` (its zeros are
    the unset mask bits); a LoRA adapter's own matrices (``lora_A``/``lora_B``) are dense by design and not
    counted. The one count behind every sparsity figure of a whole model, resident or streamed."""
    counts = {
        name: (int((matrix.weight == 0).sum()), matrix.weight.numel())
        for name, matrix in find_prunable(block, prefix).prunable.items()
        if not any(part.startswith("lora_") for part in name.split("."))
    }
    for name, module in block.named_modules():
        if isinstance(module, SparseLinear):
            size = module.in_features * module.out_features
            counts[_qualify(prefix, name)] = (size - module.nnz, size)
    return counts


def zero_share(counts: dict[str, tuple[int, int]]) -> float:
    """Zeros over all the counted weights (0 when there are none)."""
    total = sum(size for _, size in counts.values())
    return sum(zeros for zeros, _ in counts.values()) / total if total else 0.0
