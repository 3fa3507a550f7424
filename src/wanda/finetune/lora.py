"""LoRA adapters on a pruned model through ``peft``: attach, load, and merge without losing a single zero.

A plain merge computes W' = W + s * B A. The low-rank update B A is dense, so every pruned weight of W (zero)
becomes s * (B A)_ij: this is how merging an adapter turns a 50% sparse model into a 33% sparse one. The
masked merge used here is W' = W + M * (s * B A), with M zero where W was pruned; since W is zero exactly
there, this equals applying the captured mask to the plain merge, which works for every adapter type that
``peft`` can merge.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import WandaError
from ..models import LoadedModel, find_decoder_layout, find_linears, load_model
from .adapter_base import base_name, check_adapter_base
from .config import LoraSettings
from .masks import PrunedMasks, apply_masks

log = logging.getLogger(__name__)

__all__ = [
    "default_target_modules",
    "attach_lora",
    "masked_merge",
    "plain_merge_revivals",
    "load_adapter",
    "load_with_adapter",
]


def _require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise WandaError(
            "LoRA needs the package peft; install it with: pip install 'wanda[finetune]' (or pip install peft)"
        )


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """Leaf names of the linear layers in the first decoder block (attention and MLP projections), in order."""
    layout = find_decoder_layout(model)
    names: list[str] = []
    for qualified in find_linears(layout.blocks[0]):
        leaf = qualified.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    return tuple(names)


def attach_lora(model: nn.Module, settings: LoraSettings):
    """Wrap ``model`` in a trainable ``peft.PeftModel``; the base weights are frozen."""
    _require_peft()
    from peft import LoraConfig, get_peft_model

    targets = list(settings.target_modules or default_target_modules(model))
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise WandaError(
            f"could not attach LoRA to {targets}: {str(exc).splitlines()[0]}; "
            "check --lora_target_modules against the model's layer names"
        ) from exc
    for config in peft_model.peft_config.values():  # a local base as its absolute path: checked from anywhere
        config.base_model_name_or_path = base_name(getattr(model, "name_or_path", None)) or None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info(
        "LoRA r=%d alpha=%g dropout=%g on %s: %d trainable of %d parameters",
        settings.lora_r,
        settings.lora_alpha,
        settings.lora_dropout,
        ",".join(targets),
        trainable,
        total,
    )
    return peft_model


@torch.no_grad()
def plain_merge_revivals(peft_model, masks: PrunedMasks) -> dict[str, int]:
    """How many pruned weights per matrix a plain (unmasked) merge would turn non-zero; nothing is changed."""
    base = peft_model.get_base_model()
    out = {}
    for name, mask in masks.items():
        module = base.get_submodule(name)
        if not hasattr(module, "get_delta_weight") or not getattr(module, "active_adapters", None):
            continue
        weight = module.weight
        merged = weight.clone()
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_A", {}):
                merged += module.get_delta_weight(adapter).to(weight.dtype)
        out[name] = int((mask.to(weight.device) & (merged != 0)).sum())
    return out


@torch.no_grad()
def masked_merge(peft_model, masks: PrunedMasks) -> nn.Module:
    """Merge the active adapter into the base weights, keeping every pruned weight zero; returns the plain model.

    ``masks``: captured from the base model before the adapter was attached (``capture_masks``).
    """
    try:
        merged = peft_model.merge_and_unload()
    except (ValueError, NotImplementedError) as exc:
        raise WandaError(f"peft cannot merge this adapter: {str(exc).splitlines()[0]}") from exc
    apply_masks(merged, masks)
    return merged


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """``model`` with the adapter saved in ``adapter_dir`` attached (unmerged), as a ``peft.PeftModel``; an
    adapter of another base is refused first (``check_adapter_base``)."""
    _require_peft()
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise WandaError(
            f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json); pass the "
            "--output_dir of 'wanda finetune lora' or a checkpoint-N folder inside it"
        )
    check_adapter_base(adapter_dir, model)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise WandaError(
            f"could not load the adapter {adapter_dir} onto the model: {str(exc).splitlines()[0][:300]}"
        ) from exc


def load_with_adapter(
    model_dir: str,
    adapter_dir: str | Path,
    cache_dir: str | None = "llm_weights",
    dtype: str | None = "auto",
    device: str | None = "auto",
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load ``model_dir`` as ``load_model`` does and attach the adapter unmerged, for evaluation.

    The returned ``model`` is the causal LM itself (``PeftModel.get_base_model()``) with the LoRA layers
    active inside it, so ``perplexity`` and anything else that takes a transformers causal LM work unchanged.
    """
    loaded = load_model(
        model_dir, cache_dir, dtype, device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    peft_model = load_adapter(loaded.model, adapter_dir)
    peft_model.eval()
    log.info("attached the LoRA adapter %s (unmerged)", adapter_dir)
    return LoadedModel(peft_model.get_base_model(), loaded.tokenizer, loaded.source)
