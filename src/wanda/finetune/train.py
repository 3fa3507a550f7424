"""One fine-tuning run of a pruned model with ``transformers.Trainer``: LoRA or mask-keeping full training.

The Trainer supplies the progress bar, the periodic loss log (``logging_steps``), checkpoints every
``save_steps`` (each marked complete when written whole, ``wanda.finetune.checkpoints``) and resuming
(optimizer, scheduler, RNG and data position) from the last complete one. This module
only chooses the pieces: the model (a ``peft`` wrapper, or the model itself under ``MaskKeepingTrainer``),
the ``TrainingArguments`` built from ``TrainSettings``, and the check of the zero pattern afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import WandaError
from ..eval import perplexity
from .checkpoints import CheckpointTrainer, resolve_checkpoint
from .config import FINETUNE_MODES, LoraSettings, TrainSettings
from .data import BlockDataset
from .keeper import MaskKeepingTrainer
from .lora import attach_lora
from .masks import PrunedMasks, capture_masks
from .verify import SparsityReport, verify_sparsity

log = logging.getLogger(__name__)

__all__ = [
    "FinetuneOutcome",
    "finetune",
    "resolve_checkpoint",
    "training_arguments",
    "evaluate_perplexity",
    "trained_causal_lm",
]


@dataclass
class FinetuneOutcome:
    mode: str
    #: ``peft.PeftModel`` (adapter unmerged) for ``lora``; the trained model itself for ``full``.
    model: nn.Module
    trainer: object
    #: The zero pattern captured before training.
    masks: PrunedMasks
    #: After training: for ``full`` the trained weights, for ``lora`` the frozen base weights.
    sparsity: SparsityReport
    global_step: int
    #: Mean training loss of this ``train()`` call (the Trainer's ``train_loss``).
    train_loss: float | None
    train_seconds: float
    resumed_from: str | None
    log_history: list[dict] = field(default_factory=list)


def trained_causal_lm(outcome_model: nn.Module) -> nn.Module:
    """The causal LM inside a ``PeftModel`` (LoRA layers active), or the model itself."""
    get_base = getattr(outcome_model, "get_base_model", None)
    return get_base() if callable(get_base) else outcome_model


def _precision(model: nn.Module, use_cpu: bool) -> dict:
    """Mixed precision matching the weights: bf16/fp16 weights train under the same autocast; fp32 weights
    train in fp32 on CPU and under bf16 (else fp16) autocast on a GPU."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        return {"bf16": True}
    if dtype == torch.float16:
        return {"fp16": True}
    if use_cpu:
        return {}
    return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}


def training_arguments(
    settings: TrainSettings,
    output_dir: str | Path,
    use_cpu: bool,
    precision: dict,
    report_to: str | list[str] = "none",
    progress: bool = True,
):
    from transformers import TrainingArguments

    if settings.gradient_checkpointing:
        # passed only when wanted: transformers 5 renamed it (activation_checkpointing) and warns on the old name
        precision = {
            **precision,
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
        }
    try:
        return _arguments(TrainingArguments, settings, output_dir, use_cpu, precision, report_to, progress)
    except ValueError as exc:  # an unknown --optim / --lr_scheduler_type / --report_to name, among others
        raise WandaError(f"invalid training setting: {str(exc).splitlines()[0][:300]}") from exc


def _arguments(
    TrainingArguments, settings: TrainSettings, output_dir, use_cpu: bool, precision: dict, report_to, progress: bool
):
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        lr_scheduler_type=settings.lr_scheduler_type,
        optim=settings.optim,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        eval_strategy="no",  # perplexity is measured once at the end, on wanda's evaluation windows
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=use_cpu,
        report_to=report_to,
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_pin_memory=not use_cpu,
        **precision,
    )


def finetune(
    model: nn.Module,
    tokenizer,
    train_blocks: torch.Tensor,
    settings: TrainSettings,
    output_dir: str | Path,
    mode: str = "lora",
    lora: LoraSettings | None = None,
    resume_from_checkpoint: str | None = None,
    report_to: str | list[str] = "none",
    progress: bool = True,
    callbacks: list | None = None,
    strict: bool = True,
) -> FinetuneOutcome:
    """Fine-tune the pruned ``model`` on ``train_blocks`` (n, block_size) token ids; checkpoints go to ``output_dir``.

    ``mode="lora"`` trains an adapter on the frozen weights; ``mode="full"`` trains every weight while the
    pruned ones stay exactly zero. Afterwards the zero pattern is checked: with ``strict``, ``SparsityLost``
    if a single pruned weight became non-zero (else the caller reads ``outcome.sparsity``, prints it, and calls
    ``raise_if_revived``). Nothing is saved here except the Trainer's checkpoints.
    """
    from transformers import default_data_collator

    if mode not in FINETUNE_MODES:
        raise WandaError(f"fine-tuning mode must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")
    masks = capture_masks(model)
    use_cpu = next(model.parameters()).device.type == "cpu"  # the Trainer trains where the model was loaded
    precision = _precision(model, use_cpu)
    args = training_arguments(settings, output_dir, use_cpu, precision, report_to, progress)
    common = dict(
        args=args,
        train_dataset=BlockDataset(train_blocks),
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    if mode == "lora":
        trained = attach_lora(model, lora or LoraSettings())
        trainer = CheckpointTrainer(model=trained, **common)
    elif mode == "full":
        trained = model
        trained.train()
        trainer = MaskKeepingTrainer(model=trained, masks=masks, **common)
    else:
        raise AssertionError(mode)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    seconds = time.perf_counter() - start
    trained.eval()
    report = verify_sparsity(trained_causal_lm(trained), masks)
    if strict:
        report.raise_if_revived("the fine-tuned model" if mode == "full" else "the frozen base model")
    loss = result.training_loss if result.training_loss is not None and math.isfinite(result.training_loss) else None
    log.info(
        "%s fine-tuning: %d steps, mean loss %s, %.1fs; sparsity %.4f, %d pruned weights non-zero",
        mode,
        trainer.state.global_step,
        f"{loss:.4f}" if loss is not None else "-",
        seconds,
        report.sparsity,
        report.revived,
    )
    return FinetuneOutcome(
        mode,
        trained,
        trainer,
        masks,
        report,
        trainer.state.global_step,
        loss,
        seconds,
        resume_from_checkpoint,
        list(trainer.state.log_history),
    )


def evaluate_perplexity(
    model: nn.Module, windows: dict[str, torch.Tensor], batch_size: int = 1, label: str = "", progress: bool = True
) -> dict[str, float]:
    """Perplexity of a causal LM (or a ``PeftModel``, adapter active) on each named set of windows."""
    lm = trained_causal_lm(model)
    return {
        name: perplexity(lm, w, batch_size=batch_size, desc=f"{label} ppl {name}".strip(), progress=progress)
        for name, w in windows.items()
    }
