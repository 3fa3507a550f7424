"""Validated settings of fine-tuning: the LoRA adapter and the training run.

The CLI only turns flags into these objects; the library reads nothing else. Defaults follow the original code's
``lora_ft/finetune_lm.py`` (LoRA r=8, alpha=16, dropout 0.05, learning rate 1e-4, one epoch, block size
1024, warm-up 5 steps, a loss log every 10 steps, a checkpoint every 50) except where noted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..utils.declare import SettingsMixin, require, require_seed, setting

__all__ = ["LoraSettings", "TrainSettings", "FINETUNE_MODES", "BLOCK_SIZE_CAP"]

#: ``lora``: train a low-rank adapter on the frozen pruned weights; ``full``: train every weight, keeping the
#: pruned ones exactly zero.
FINETUNE_MODES = ("lora", "full")
#: The original code capped the block size at 1024 tokens (``run_clm.py``'s default).
BLOCK_SIZE_CAP = 1024


@dataclass(frozen=True)
class LoraSettings(SettingsMixin):
    """A LoRA adapter (Hu et al., arXiv 2106.09685): W x + (alpha / r) * B A x with A: (r, in), B: (out, r)."""

    _argument_group_name: ClassVar[str] = "LoRA (peft)"

    lora_r: int = setting(8, "adapter rank")
    lora_alpha: float = setting(16.0, "scale alpha; the update is alpha/r * BA")
    lora_dropout: float = setting(0.05, "dropout on the adapter input")
    lora_target_modules: str | None = setting(
        None,
        "comma-separated module names, e.g. q_proj,v_proj (the original code's); default: every linear layer in the "
        "decoder blocks (attention and MLP projections)",
    )
    merge: str | None = setting(
        None,
        "also write the merged model, pruned weights kept at zero (default DIR: OUTPUT_DIR/merged)",
        nargs="?",
        const="",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        require(self.lora_r >= 1, f"--lora_r must be at least 1, got {self.lora_r}")
        require(
            self.lora_alpha > 0 and not math.isinf(self.lora_alpha),
            f"--lora_alpha must be a positive number, got {self.lora_alpha}",
        )
        require(0.0 <= self.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(
            self.lora_target_modules is None or bool(self.target_modules),
            "--lora_target_modules is empty; name modules such as q_proj,v_proj or omit it",
        )

    @property
    def target_modules(self) -> tuple[str, ...] | None:
        """Leaf module names that get an adapter; None: every linear layer inside the decoder blocks."""
        if self.lora_target_modules is None:
            return None
        return tuple(t.strip() for t in self.lora_target_modules.split(",") if t.strip())


@dataclass(frozen=True)
class TrainSettings(SettingsMixin):
    """One training run through ``transformers.Trainer``. Sizes are in sequences of ``block_size`` tokens."""

    _argument_group_name: ClassVar[str] = "training (transformers.Trainer)"

    block_size: int | None = setting(
        None,
        "tokens per training sequence and evaluation window (default: "
        f"min(context, {BLOCK_SIZE_CAP}), the original code's cap)",
    )
    learning_rate: float = setting(1e-4, "peak learning rate")
    num_train_epochs: float = setting(1.0, "passes over the training blocks")
    max_steps: int = setting(-1, "optimizer steps; overrides --num_train_epochs if > 0")
    max_train_samples: int | None = setting(None, "use the first N training blocks (default: all)")
    max_eval_samples: int | None = setting(
        None, "evaluate on at most N windows per set (default: all; the original code used 128)"
    )
    per_device_train_batch_size: int = setting(1, "blocks per step per device")
    per_device_eval_batch_size: int = setting(8, "windows per forward pass")
    gradient_accumulation_steps: int = setting(
        1, "micro-batches per optimizer step (the original code forced 128 / batch size)"
    )
    warmup_steps: int = setting(5, "linear warm-up steps (the original code's)")
    weight_decay: float = setting(0.0, "decoupled (AdamW) weight decay; pruned weights stay zero whatever it is")
    lr_scheduler_type: str = setting("linear", "a transformers scheduler name")
    optim: str = setting("adamw_torch", "a transformers optimizer name")
    max_grad_norm: float = setting(1.0, "gradient clipping norm, 0 = off")
    logging_steps: int = setting(10, "log the loss every N steps")
    save_steps: int = setting(50, "checkpoint every N steps")
    save_total_limit: int = setting(
        3,
        "checkpoints kept (the original code kept 15; a full fine-tuning checkpoint holds the "
        "optimizer state, three times the model)",
    )
    seed: int = setting(0, "seed of initialisation and data order")
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory")

    def __post_init__(self) -> None:
        require_seed(self.seed)
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
            "save_total_limit",
        )
        for name in positive:
            require(getattr(self, name) >= 1, f"--{name} must be at least 1, got {getattr(self, name)}")
        require(
            self.block_size is None or self.block_size >= 2, f"--block_size must be at least 2, got {self.block_size}"
        )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"--{name} must be at least 1, got {value}")
        require(
            self.learning_rate > 0 and not math.isinf(self.learning_rate),
            f"--learning_rate must be a positive number, got {self.learning_rate}",
        )
        require(
            self.max_steps > 0 or self.num_train_epochs > 0,
            f"--num_train_epochs must be positive (or set --max_steps), got {self.num_train_epochs}",
        )
        require(
            self.max_steps > 0 or self.max_steps == -1,
            f"--max_steps must be a positive number of steps (or -1 to use epochs), got {self.max_steps}",
        )
        require(self.warmup_steps >= 0, f"--warmup_steps must be at least 0, got {self.warmup_steps}")
        require(0.0 <= self.weight_decay < 1.0, f"--weight_decay must be in [0, 1), got {self.weight_decay}")
        require(
            self.max_grad_norm >= 0,
            f"--max_grad_norm must be at least 0 (0 disables clipping), got {self.max_grad_norm}",
        )
