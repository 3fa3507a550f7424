"""Which layers of an image classifier are pruned, found from the model's structure.

Pruned, as in the paper, are the matrix multiplications inside the backbone's repeated blocks: every
``nn.Linear`` and every pointwise convolution (1x1 kernel, one group, stride 1, no padding, which is a linear
map of each pixel's channels). The stem (patch embedding), depthwise and downsampling convolutions, norms and
the classifier head stay dense.

Nothing here looks at a layer's number of outputs or at a model's name:

- the **blocks** are the outermost ``nn.ModuleList``/``nn.Sequential`` containers whose children all have one
  type and each hold a prunable layer (ViT/DeiT's transformer layers, ConvNeXt's stages);
- the **head** is what the model's own API calls its classifier: for a ``transformers`` model, everything
  outside ``model.base_model``; for a ``timm`` model, ``pretrained_cfg["classifier"]`` (a name or a tuple of
  names, e.g. DeiT's ``head`` and ``head_dist``) or else ``get_classifier()``. The blocks are searched in the
  backbone only, and a head layer found among them is an error, never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import WandaError

__all__ = ["ClassifierLayout", "find_layout", "is_pointwise_conv", "is_prunable", "matrix_view"]


def is_pointwise_conv(module: nn.Module) -> bool:
    """A dense 1x1 convolution that maps each pixel's channels independently (a linear layer per pixel)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
    )


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_pointwise_conv(module)


def matrix_view(module: nn.Module):
    """The weight as an (out_features, in_features) view sharing storage: a conv's (out, in, 1, 1) flattened."""
    weight = module.weight.data
    return weight.view(weight.shape[0], -1) if weight.dim() == 4 else weight


@dataclass
class ClassifierLayout:
    """``prunable``: qualified name -> layer, in registration order; ``head``: the classifier's layers."""

    blocks: list[str]
    prunable: dict[str, nn.Module]
    head: dict[str, nn.Module]


def _is_block_stack(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, (nn.ModuleList, nn.Sequential))
        and len(children) > 0
        and len({type(c) for c in children}) == 1
        and not is_prunable(children[0])
        and all(any(is_prunable(m) for m in child.modules()) for child in children)
    )


def _outermost_stacks(module: nn.Module, prefix: str, skip: set[int]) -> list[tuple[str, nn.Module]]:
    if id(module) in skip:
        return []
    if _is_block_stack(module):
        return [(prefix, module)]
    found = []
    for name, child in module.named_children():
        found += _outermost_stacks(child, f"{prefix}.{name}" if prefix else name, skip)
    return found


def _head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level modules of the classifier head by qualified name (see the module docstring)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model and hasattr(model, "config"):  # transformers
        return {name: child for name, child in model.named_children() if child is not base}
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if names:  # timm
        names = (names,) if isinstance(names, str) else tuple(names)
        return {name: model.get_submodule(name) for name in names}
    if hasattr(model, "get_classifier"):  # timm without a config naming it
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head:
                return {name: head}
    raise WandaError(
        f"cannot find the classifier head of {type(model).__name__}: supported are transformers image classifiers "
        "(the head is what lies outside model.base_model) and timm models (pretrained_cfg['classifier'] or "
        "get_classifier())"
    )


def find_layout(model: nn.Module) -> ClassifierLayout:
    head_modules = _head_modules(model)
    head = {
        f"{prefix}.{name}" if name else prefix: layer
        for prefix, module in head_modules.items()
        for name, layer in module.named_modules()
        if isinstance(layer, (nn.Linear, nn.Conv2d))
    }
    skip = {id(m) for m in head_modules.values()}
    stacks = _outermost_stacks(model, "", skip)
    if not stacks:
        raise WandaError(
            f"{type(model).__name__}: found no repeated blocks holding linear or 1x1 convolution layers outside the "
            "classifier head; supported are ConvNeXt, DeiT and ViT image classifiers from transformers or timm"
        )
    prunable = {
        f"{path}.{name}": layer for path, stack in stacks for name, layer in stack.named_modules() if is_prunable(layer)
    }
    clash = [name for name, layer in prunable.items() if any(layer is h for h in head.values())]
    if clash:  # only a model that reuses its head inside a block could get here
        raise WandaError(f"the classifier head {clash} was found inside the backbone blocks; refusing to prune it")
    return ClassifierLayout([path for path, _ in stacks], prunable, head)
