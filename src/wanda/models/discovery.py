"""Generic discovery of decoder blocks, and the one override for models it gets wrong.

No architecture is named here: the decoder blocks are the ``nn.ModuleList`` of identical modules that hold a
weight matrix (an ``nn.Linear`` or a fused 3-D expert parameter; the longest such list, preferring one whose
length is ``config.num_hidden_layers``). Embeddings and the LM head live outside the blocks and are therefore
never pruned, as in the paper. What inside a block is pruned is decided by ``models.matrices.find_prunable``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import WandaError
from ..kernels import SparseLinear
from .matrices import NOT_TARGETED, BlockMatrices, NotPruned, find_prunable, matrix_zero_counts
from .targets import MatrixTargets


@dataclass(frozen=True)
class StructureOverride:
    """For a model the generic discovery gets wrong (Python API: ``prune(..., structure=...)``).

    ``blocks``: dotted path of the module list that holds the decoder blocks (``"transformer.h"``).
    ``prune``: glob patterns of the names, relative to a block, of the matrices to prune
    (``("self_attn.*_proj", "mlp.experts.*")``); every other matrix is reported as excluded.
    Either may be ``None``: the generic rule then decides.
    """

    blocks: str | None = None
    prune: tuple[str, ...] | None = None


@dataclass
class DecoderLayout:
    """Where a model's repeated blocks are: ``model.get_submodule(path)[i]`` is block i."""

    path: str
    blocks: nn.ModuleList
    #: glob patterns limiting what is pruned inside a block (``StructureOverride.prune``); None: everything found
    include: tuple[str, ...] | None = None
    #: the run's ``--targets`` / ``--ignore`` / ``--target_ratios`` (``wanda.models.targets``)
    targets: MatrixTargets = MatrixTargets()

    def block_name(self, index: int) -> str:
        return f"{self.path}.{index}"

    def matrices(self, index: int, block: nn.Module | None = None) -> BlockMatrices:
        """``find_prunable`` for block ``index`` (or ``block``, when the caller holds a moved copy), less the
        matrices the run's targets leave out, which are listed as not pruned with that reason."""
        found = find_prunable(self.blocks[index] if block is None else block, self.block_name(index), self.include)
        if self.targets.restricts:
            for name, matrix in list(found.prunable.items()):
                if not self.targets.selects(name):
                    found.not_pruned.append(NotPruned(name, matrix.shape, NOT_TARGETED))
                    del found.prunable[name]
        return found


def _holds_matrices(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, SparseLinear)) for m in module.modules()) or any(
        p.dim() == 3 for p in module.parameters()
    )


def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, nn.ModuleList)
        and len(children) > 0
        and len({type(c) for c in children}) == 1
        and _holds_matrices(children[0])
    )


def _overridden_blocks(model: nn.Module, path: str) -> nn.ModuleList:
    try:
        blocks = model.get_submodule(path)
    except AttributeError as exc:
        raise WandaError(f"structure override: {type(model).__name__} has no module {path!r}") from exc
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise WandaError(
            f"structure override: {path!r} in {type(model).__name__} is a {type(blocks).__name__}, "
            "not a non-empty nn.ModuleList of blocks"
        )
    return blocks


def find_decoder_layout(
    model: nn.Module, override: StructureOverride | None = None, targets: MatrixTargets | None = None
) -> DecoderLayout:
    include = override.prune if override is not None else None
    targets = targets or MatrixTargets()
    if override is not None and override.blocks is not None:
        return DecoderLayout(override.blocks, _overridden_blocks(model, override.blocks), include, targets)
    candidates = [(name, m) for name, m in model.named_modules() if _is_block_list(m)]
    if not candidates:
        raise WandaError(
            f"{type(model).__name__} is not supported: found no decoder blocks (an nn.ModuleList of identical "
            "layers holding nn.Linear or fused 3-D expert weights); name them with "
            "wanda.StructureOverride(blocks='path.to.layers') in the Python API"
        )
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [c for c in candidates if len(c[1]) == expected]
    path, blocks = max(exact or candidates, key=lambda c: len(c[1]))
    return DecoderLayout(path, blocks, include, targets)


def model_zero_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``matrix_zero_counts`` of every decoder block of a loaded model: the same matrices the pruner prunes
    (fused experts included), so ``wanda eval`` reports the figure ``wanda`` reported after pruning."""
    layout = find_decoder_layout(model)
    counts: dict[str, tuple[int, int]] = {}
    for index, block in enumerate(layout.blocks):
        counts.update(matrix_zero_counts(block, layout.block_name(index)))
    return counts
