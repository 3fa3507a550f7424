"""Reading the original code's checkpoints into transformers models, so that they load without timm.

The original code downloads the official ConvNeXt weights (``downsample_layers.*``, ``stages.i.j.*``) and timm-format
ViT / DeiT weights (``blocks.i.attn.qkv``, ...). These functions rename their keys to transformers' and split
the fused qkv projection; nothing else changes (both formats store nn.Linear weights as (out, in)). Newer
timm ConvNeXt keys (``stem.*``, ``stages.i.blocks.j.*``) are read too.

Both originals use LayerNorm eps 1e-6 everywhere, where transformers' configs default to 1e-12 for the final
(and, in ViT, every) norm: ``CONFIG_OVERRIDES`` sets it so the converted model computes the same function.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import WandaError

__all__ = ["checkpoint_format", "to_transformers", "CONFIG_OVERRIDES"]

#: What the transformers config must say for a converted checkpoint to compute what the original did.
CONFIG_OVERRIDES = {"layer_norm_eps": 1e-6}


def checkpoint_format(state: dict[str, torch.Tensor]) -> str:
    """``transformers``, ``convnext_official``, ``convnext_timm`` or ``vit_timm`` (also DeiT), from the keys."""
    if "downsample_layers.0.0.weight" in state:
        return "convnext_official"
    if "stem.0.weight" in state and any(k.startswith("stages.") for k in state):
        return "convnext_timm"
    if "blocks.0.attn.qkv.weight" in state:
        return "vit_timm"
    return "transformers"


def _convnext(state: dict[str, torch.Tensor], official: bool) -> dict[str, torch.Tensor]:
    layer = {
        "dwconv": "dwconv",
        "conv_dw": "dwconv",
        "norm": "layernorm",
        "pwconv1": "pwconv1",
        "pwconv2": "pwconv2",
        "mlp.fc1": "pwconv1",
        "mlp.fc2": "pwconv2",
        "gamma": "layer_scale_parameter",
    }
    patterns = [
        (
            r"downsample_layers\.0\.0\.(.+)" if official else r"stem\.0\.(.+)",
            "convnext.embeddings.patch_embeddings.{0}",
        ),
        (r"downsample_layers\.0\.1\.(.+)" if official else r"stem\.1\.(.+)", "convnext.embeddings.layernorm.{0}"),
        (
            r"downsample_layers\.(\d+)\.(\d)\.(.+)" if official else r"stages\.(\d+)\.downsample\.(\d)\.(.+)",
            "convnext.encoder.stages.{0}.downsampling_layer.{1}.{2}",
        ),
        (
            r"stages\.(\d+)\.(\d+)\.(.+)" if official else r"stages\.(\d+)\.blocks\.(\d+)\.(.+)",
            "convnext.encoder.stages.{0}.layers.{1}.{2}",
        ),
        (r"norm\.(.+)" if official else r"head\.norm\.(.+)", "convnext.layernorm.{0}"),
        (r"head\.(.+)" if official else r"head\.fc\.(.+)", "classifier.{0}"),
    ]
    out = {}
    for key, value in state.items():
        for pattern, target in patterns:
            if match := re.fullmatch(pattern, key):
                groups = list(match.groups())
                if target.startswith("convnext.encoder.stages.{0}.layers"):
                    leaf, _, param = groups[2].rpartition(".")
                    if not leaf:  # gamma: a parameter of the block itself
                        leaf, param = param, ""
                    if leaf not in layer:
                        raise WandaError(f"unexpected ConvNeXt block key {key!r}")
                    groups[2] = f"{layer[leaf]}.{param}".rstrip(".")
                out[target.format(*groups)] = value
                break
        else:
            raise WandaError(f"unexpected key {key!r} in a ConvNeXt checkpoint; cannot convert it to transformers")
    return out


def _vit(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    base = model.base_model_prefix  # "vit" or "deit"
    distilled = hasattr(model, "distillation_classifier")
    heads = {"head": "cls_classifier", "head_dist": "distillation_classifier"} if distilled else {"head": "classifier"}
    fixed = {
        "cls_token": f"{base}.embeddings.cls_token",
        "dist_token": f"{base}.embeddings.distillation_token",
        "pos_embed": f"{base}.embeddings.position_embeddings",
    }
    block = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif match := re.fullmatch(r"patch_embed\.proj\.(weight|bias)", key):
            out[f"{base}.embeddings.patch_embeddings.projection.{match[1]}"] = value
        elif match := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            # fused (3 * D, D) in the order q, k, v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}.layers.{match[1]}.attention.{name}.{match[2]}"] = part.clone()
        elif (match := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)) and match[2] in block:
            out[f"{base}.layers.{match[1]}.{block[match[2]]}.{match[3]}"] = value
        elif match := re.fullmatch(r"(?:fc_)?norm\.(weight|bias)", key):
            out[f"{base}.layernorm.{match[1]}"] = value
        elif (match := re.fullmatch(r"(head|head_dist)\.(weight|bias)", key)) and match[1] in heads:
            out[f"{heads[match[1]]}.{match[2]}"] = value
        else:
            raise WandaError(
                f"unexpected key {key!r} in a timm ViT/DeiT checkpoint (e.g. a pre-logits layer or "
                "a distillation head for a non-distilled --model); cannot convert it to transformers"
            )
    return out


def to_transformers(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` in ``model``'s (a transformers ConvNeXt, ViT or DeiT classifier) keys; unchanged if it already is."""
    fmt = checkpoint_format(state)
    if fmt == "transformers":
        return state
    if fmt.startswith("convnext") != (model.base_model_prefix == "convnext"):
        raise WandaError(f"the checkpoint is a {fmt.split('_')[0]} but --model builds a {type(model).__name__}")
    if fmt == "vit_timm":
        return _vit(state, model)
    return _convnext(state, official=fmt == "convnext_official")
