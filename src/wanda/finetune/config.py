"""Validated settings of fine-tuning: the LoRA adapter and the training run.

The CLI only turns flags into these objects; the library reads nothing else. Defaults follow the seed's
``lora_ft/finetune_lm.py`` (LoRA r=8, alpha=16, dropout 0.05, learning rate 1e-4, one epoch, block size
1024, warm-up 5 steps, a loss log every 10 steps, a checkpoint every 50) except where noted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import WandaError

__all__ = ["LoraSettings", "TrainSettings", "FINETUNE_MODES"]

#: ``lora``: train a low-rank adapter on the frozen pruned weights; ``full``: train every weight, keeping the
#: pruned ones exactly zero.
FINETUNE_MODES = ("lora", "full")


@dataclass
class LoraSettings:
    """A LoRA adapter (Hu et al., arXiv 2106.09685): W x + (alpha / r) * B A x with A: (r, in), B: (out, r)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    #: Module names (leaf names such as ``q_proj``) that get an adapter. ``None``: every linear layer inside
    #: the decoder blocks, i.e. the attention and MLP projections (the seed adapted only q_proj and v_proj).
    target_modules: tuple[str, ...] | None = None

    def validate(self) -> "LoraSettings":
        if self.r < 1:
            raise WandaError(f"--lora_r must be at least 1, got {self.r}")
        if not self.alpha > 0 or math.isinf(self.alpha):
            raise WandaError(f"--lora_alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise WandaError(f"--lora_dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            self.target_modules = tuple(t.strip() for t in self.target_modules if t.strip())
            if not self.target_modules:
                raise WandaError("--lora_target_modules is empty; name modules such as q_proj,v_proj or omit it")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainSettings:
    """One training run through ``transformers.Trainer``. Sizes are in sequences of ``block_size`` tokens."""

    #: Tokens per training sequence and per evaluation window. ``None``: min(model context, 1024), the seed's cap.
    block_size: int | None = None
    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    #: Optimizer steps to run; when positive it overrides ``num_train_epochs``.
    max_steps: int = -1
    #: Use only the first this many training sequences (``None``: all of them).
    max_train_samples: int | None = None
    #: Evaluate on at most this many windows per evaluation set (``None``: all; the seed used 128).
    max_eval_samples: int | None = None
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 8
    #: The seed forced 128 // batch size; here it is a plain setting (effective batch = batch x this).
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 5
    #: Decoupled (AdamW) weight decay; pruned weights stay zero whatever its value.
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 50
    #: Checkpoints kept in ``output_dir`` (the seed kept 15; a full fine-tuning checkpoint holds the optimizer
    #: state, three times the model, so fewer are kept here).
    save_total_limit: int = 3
    seed: int = 0
    gradient_checkpointing: bool = False

    def validate(self) -> "TrainSettings":
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "save_total_limit")
        for name in positive:
            if getattr(self, name) < 1:
                raise WandaError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 2:
            raise WandaError(f"--block_size must be at least 2, got {self.block_size}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise WandaError(f"--{name} must be at least 1, got {value}")
        if not self.learning_rate > 0 or math.isinf(self.learning_rate):
            raise WandaError(f"--learning_rate must be a positive number, got {self.learning_rate}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise WandaError(f"--num_train_epochs must be positive (or set --max_steps), got {self.num_train_epochs}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise WandaError(f"--max_steps must be a positive number of steps (or -1 to use epochs), "
                             f"got {self.max_steps}")
        if self.warmup_steps < 0:
            raise WandaError(f"--warmup_steps must be at least 0, got {self.warmup_steps}")
        if not 0.0 <= self.weight_decay < 1.0:
            raise WandaError(f"--weight_decay must be in [0, 1), got {self.weight_decay}")
        if not self.max_grad_norm >= 0:
            raise WandaError(f"--max_grad_norm must be at least 0 (0 disables clipping), got {self.max_grad_norm}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
