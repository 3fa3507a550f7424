"""Fine-tuning pruned models without losing their sparsity: LoRA adapters and mask-keeping full training.

from wanda.finetune import LoraSettings, TrainSettings, finetune, masked_merge, training_blocks
outcome = finetune(model, tokenizer, blocks, TrainSettings(max_steps=100), "out", mode="lora")
merged = masked_merge(outcome.model, outcome.masks)      # every pruned weight is still exactly zero
verify_sparsity(merged, outcome.masks).raise_if_revived()
"""

from .config import FINETUNE_MODES, LoraSettings, TrainSettings
from .data import BlockDataset, training_blocks
from .keeper import MaskKeepingCallback, MaskKeepingTrainer
from .lora import (
    attach_lora,
    default_target_modules,
    load_adapter,
    load_with_adapter,
    masked_merge,
    plain_merge_revivals,
)
from .masks import PrunedMasks, apply_masks, capture_masks, mask_gradients
from .train import FinetuneOutcome, evaluate_perplexity, finetune, resolve_checkpoint, trained_causal_lm
from .verify import MatrixSparsity, SparsityLost, SparsityReport, verify_sparsity

__all__ = [
    "FINETUNE_MODES",
    "LoraSettings",
    "TrainSettings",
    "BlockDataset",
    "training_blocks",
    "MaskKeepingCallback",
    "MaskKeepingTrainer",
    "attach_lora",
    "default_target_modules",
    "load_adapter",
    "load_with_adapter",
    "masked_merge",
    "plain_merge_revivals",
    "PrunedMasks",
    "apply_masks",
    "capture_masks",
    "mask_gradients",
    "FinetuneOutcome",
    "evaluate_perplexity",
    "finetune",
    "resolve_checkpoint",
    "trained_causal_lm",
    "MatrixSparsity",
    "SparsityLost",
    "SparsityReport",
    "verify_sparsity",
]
