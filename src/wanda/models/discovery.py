"""Generic discovery of decoder blocks and their linear layers.

No architecture is named here: the decoder blocks are the ``nn.ModuleList`` of identical modules that hold
``nn.Linear`` layers (the longest such list, preferring one whose length is ``config.num_hidden_layers``).
Embeddings and the LM head live outside the blocks and are therefore never pruned, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import WandaError


@dataclass
class DecoderLayout:
    """Where a model's repeated blocks are: ``model.get_submodule(path)[i]`` is block i."""

    path: str
    blocks: nn.ModuleList

    def block_name(self, index: int) -> str:
        return f"{self.path}.{index}"


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``module`` by qualified name, in registration (execution) order."""
    return {
        f"{prefix}.{name}" if prefix else name: child
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear)
    }


def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, nn.ModuleList)
        and len(children) > 0
        and len({type(c) for c in children}) == 1
        and any(isinstance(m, nn.Linear) for m in children[0].modules())
    )


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    candidates = [(name, m) for name, m in model.named_modules() if _is_block_list(m)]
    if not candidates:
        raise WandaError(
            f"{type(model).__name__} is not supported: found no decoder blocks (an nn.ModuleList of identical "
            "layers that contain nn.Linear). Supported are decoder-only transformers such as LLaMA, LLaMA-2, "
            "OPT, Mistral and Qwen2."
        )
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [c for c in candidates if len(c[1]) == expected]
    path, blocks = max(exact or candidates, key=lambda c: len(c[1]))
    return DecoderLayout(path, blocks)
