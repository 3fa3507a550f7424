"""``wanda finetune``: recover accuracy after pruning without losing the sparsity.

    wanda finetune lora  --model PRUNED --output_dir OUT [--merge [DIR]]   # LoRA adapter (seed: lora_ft)
    wanda finetune full  --model PRUNED --output_dir OUT                   # all weights, zeros kept
    wanda finetune merge --model PRUNED --adapter OUT --output DIR         # masked merge of a saved adapter
    wanda finetune eval  --model PRUNED --adapter OUT                      # seed: lora_ft/evaluate_ppl.py

After any training or merge the sparsity of every pruned matrix is printed, and the job fails (exit 2) if a
single pruned weight became non-zero.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..data import resolve_source
from ..errors import WandaError
from ..finetune.config import BLOCK_SIZE_CAP, LoraSettings, TrainSettings
from ..models import ModelSettings, default_seqlen
from ..utils.declare import SettingsMixin, setting
from ..utils.io import atomic_directory, atomic_write_json, claim, ensure_free
from ..utils.overlap import check_disjoint
from ..utils.resources import peak_rss_mb
from ..utils.space import check_space, weights_bytes
from .common import SOURCE_HELP, LogSettings, TextSettings, print_perplexities

log = logging.getLogger("wanda")

RESULTS_FILE = "finetune_results.json"


@dataclass(frozen=True)
class PrunedModelSettings(ModelSettings):
    model: str = setting(
        help="the pruned model: a from_pretrained folder (e.g. written by wanda --save_model), hub "
        "id, .gguf file or the bundled model's name",
        aliases=["--model_name_or_path"],
    )


@dataclass(frozen=True)
class TrainingDataSettings(TextSettings):
    _argument_group_name: ClassVar[str] = "data"

    dataset: str | None = setting(
        None,
        f"training text: {SOURCE_HELP}; its calibration/train part is used "
        "(default: c4; wiki-summaries for the bundled model)",
        aliases=["--dataset_name"],
    )
    eval_dataset: list[str] | None = setting(
        None,
        "perplexity sets after training, as for --dataset, or 'none' (default: the evaluation part of "
        "--dataset: C4 validation, WikiText-2 test, held-out summaries; a local file is used as is)",
    )

    def specs(self, train_spec: str) -> list[str]:
        if self.eval_dataset is None:
            return [train_spec]
        if [v.lower() for v in self.eval_dataset] == ["none"]:
            return []
        return [s for item in self.eval_dataset for s in item.split(",") if s]


@dataclass(frozen=True)
class TrainingOutputSettings(SettingsMixin):
    _argument_group_name: ClassVar[str] = "output and resuming"

    output_dir: str = setting(help=f"checkpoints, the final adapter or model, and {RESULTS_FILE}")
    overwrite_output_dir: bool = setting(
        False, "start afresh: delete old checkpoints in --output_dir instead of resuming from the last"
    )
    resume_from_checkpoint: str | None = setting(
        None, "a checkpoint-N folder to resume from (default: the last one in --output_dir, if any)"
    )
    do_train: bool = setting(False, "train (with neither --do_train nor --do_eval: both)")
    do_eval: bool = setting(False, "measure perplexity at the end; alone, evaluates what --output_dir already holds")
    report_to: str = setting("none", "transformers logging integrations")

    @property
    def steps(self) -> tuple[bool, bool]:
        """(train, evaluate): both when neither flag is given."""
        return (True, True) if not (self.do_train or self.do_eval) else (self.do_train, self.do_eval)


@dataclass(frozen=True)
class MergeSettings(SettingsMixin):
    adapter: str = setting(help="adapter folder (the --output_dir of 'lora', or a checkpoint)")
    output: str = setting(help="folder for the merged model and tokenizer")
    overwrite: bool = setting(False, "replace an existing --output")


#: The settings of ``wanda finetune lora|full|merge``.
LORA_JOB = (PrunedModelSettings, TrainingDataSettings, TrainSettings, LoraSettings, TrainingOutputSettings, LogSettings)
FULL_JOB = (PrunedModelSettings, TrainingDataSettings, TrainSettings, TrainingOutputSettings, LogSettings)
MERGE_JOB = (PrunedModelSettings, MergeSettings, LogSettings)


def _training_dtype(model: ModelSettings, mode: str) -> str:
    if mode != "full":
        return model.dtype
    # AdamW on half-precision weights loses small updates; fp32 weights train under autocast on a GPU
    if model.dtype == "auto":
        return "float32"
    if model.dtype in ("float16", "fp16"):
        raise WandaError(
            "full fine-tuning needs float32 or bfloat16 weights (float16 ones cannot be trained "
            "with gradient scaling); omit --dtype to train fp32 weights under autocast"
        )
    return model.dtype


def _eval_windows(
    specs: list[str], tokenizer, text_field: str, seqlen: int, max_windows: int | None
) -> dict[str, torch.Tensor]:
    from ..data import evaluation_windows

    return {
        (source := resolve_source(spec, "evaluation", text_field)).name: evaluation_windows(
            source, tokenizer, seqlen, max_windows
        )
        for spec in specs
    }


def _print_sparsity(title: str, report) -> None:
    print(
        f"\n{title}: sparsity {report.sparsity:.4f} over {len(report.matrices)} pruned matrices, "
        f"{report.revived} pruned weights non-zero"
    )
    print(report.table())
    sys.stdout.flush()


def _save_merged(merged, tokenizer, target: Path, overwrite: bool, report) -> None:
    with atomic_directory(target, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "merge_report.json", report.to_dict())
    log.info("merged model written to %s", target)


def _masked_merge_step(peft_model, masks, tokenizer, target: Path, overwrite: bool):
    """Merge with every pruned weight kept at zero, check it, save it; returns (merged model, report, revivals)."""
    from ..finetune import masked_merge, plain_merge_revivals, verify_sparsity

    plain = sum(plain_merge_revivals(peft_model, masks).values())
    merged = masked_merge(peft_model, masks)
    report = verify_sparsity(merged, masks)
    _print_sparsity(f"masked merge (a plain merge would have made {plain} pruned weights non-zero)", report)
    report.raise_if_revived("the merged model")
    _save_merged(merged, tokenizer, target, overwrite, report)
    return merged, report, plain


def _evaluate_saved(
    model: ModelSettings,
    data: TrainingDataSettings,
    train: TrainSettings,
    out: TrainingOutputSettings,
    mode: str,
    eval_specs: list[str],
) -> int:
    """``--do_eval`` alone: perplexity of what an earlier run left in ``--output_dir``."""
    from ..finetune import evaluate_perplexity, load_with_adapter

    output_dir = Path(out.output_dir)
    if mode == "lora":
        loaded = load_with_adapter(
            model.model,
            output_dir,
            model.cache_dir,
            model.dtype,
            model.device,
            trust_remote_code=model.trust_remote_code,
            allow_pickle=model.allow_pickle,
        )
    else:
        loaded = model.replace(model=str(output_dir)).load(_training_dtype(model, mode))
    block_size = train.block_size or default_seqlen(loaded.model, BLOCK_SIZE_CAP)
    windows = _eval_windows(eval_specs, loaded.tokenizer, data.text_field, block_size, train.max_eval_samples)
    label = "adapter" if mode == "lora" else "fine-tuned"
    print_perplexities(
        {label: evaluate_perplexity(loaded.model, windows, train.per_device_eval_batch_size, label)}, block_size
    )
    return 0


def run_training(
    model: ModelSettings,
    data: TrainingDataSettings,
    train: TrainSettings,
    out: TrainingOutputSettings,
    lora: LoraSettings | None = None,
) -> int:
    from ..finetune import evaluate_perplexity, finetune, resolve_checkpoint, training_blocks
    from ..finetune.checkpoints import save_final
    from ..finetune.train import training_arguments

    mode = "lora" if lora is not None else "full"
    dtype = _training_dtype(model, mode)
    do_train, do_eval = out.steps
    output_dir = Path(out.output_dir)
    merge_dir = None
    if lora is not None and lora.merge is not None:
        merge_dir = Path(lora.merge) if lora.merge else output_dir / "merged"
    train_spec = data.dataset or ("wiki-summaries" if model.bundled else "c4")
    eval_specs = data.specs(train_spec)
    inputs = {"--model": model.model, "--dataset": train_spec, "--eval_dataset": eval_specs}
    # --merge may live inside --output_dir (its default, OUTPUT_DIR/merged) but not be it or hold it: the
    # merged folder is replaced as a whole, which would take the adapter and the checkpoints with it
    check_disjoint(inputs, {"--output_dir": output_dir, "--merge": merge_dir})
    if merge_dir is not None:
        ensure_free(merge_dir, out.overwrite_output_dir, "merged model folder")
    if not do_train:
        if merge_dir is not None:
            raise WandaError(
                "--merge merges a freshly trained adapter; to merge a saved one use: "
                "wanda finetune merge --model MODEL --adapter OUTPUT_DIR --output DIR"
            )
        return _evaluate_saved(model, data, train, out, mode, eval_specs)
    # one run per --output_dir, for the whole run: two would interleave their checkpoints and results
    with claim(output_dir):
        training_arguments(train, output_dir, True, {}, out.report_to)  # a bad --optim etc. fails before loading
        checkpoint = resolve_checkpoint(output_dir, out.resume_from_checkpoint, out.overwrite_output_dir)
        start = time.perf_counter()
        torch.manual_seed(train.seed)
        # text first: a missing corpus fails before the model loads
        source = resolve_source(train_spec, "calibration", data.text_field)
        if do_eval:
            for spec in eval_specs:
                resolve_source(spec, "evaluation", data.text_field)
            if any(Path(spec).exists() and spec == train_spec for spec in eval_specs):
                log.warning(
                    "evaluating on %s, the file it trains on; pass --eval_dataset for held-out text", train_spec
                )

        loaded = model.load(dtype)
        if merge_dir is not None:  # before any training step
            check_space([(merge_dir, weights_bytes(loaded.model), "the merged model")])
        if lora is not None and checkpoint is not None:  # resuming an adapter: it must be this base's
            from ..finetune.adapter_base import check_adapter_base

            check_adapter_base(checkpoint, loaded.model)
        tokenizer = loaded.tokenizer
        block_size = train.block_size or default_seqlen(loaded.model, BLOCK_SIZE_CAP)
        blocks = training_blocks(source, tokenizer, block_size, train.max_train_samples)
        windows = (
            _eval_windows(eval_specs, tokenizer, data.text_field, block_size, train.max_eval_samples) if do_eval else {}
        )

        outcome = finetune(
            loaded.model,
            tokenizer,
            blocks,
            train,
            output_dir,
            mode=mode,
            lora=lora,
            resume_from_checkpoint=checkpoint,
            report_to=out.report_to,
            strict=False,
        )
        what = "frozen base weights" if mode == "lora" else "fine-tuned model"
        _print_sparsity(f"after training ({what})", outcome.sparsity)
        outcome.sparsity.raise_if_revived(f"the {what}")
        save_final(outcome.trainer, output_dir)
        log.info("%s written to %s", "adapter" if mode == "lora" else "model", output_dir)

        label = "adapter" if mode == "lora" else "fine-tuned"
        batch = train.per_device_eval_batch_size
        ppl = {label: evaluate_perplexity(outcome.model, windows, batch, label)} if windows else {}
        results = {
            "mode": mode,
            "model": model.model,
            "dataset": train_spec,
            "block_size": block_size,
            "train_blocks": int(blocks.shape[0]),
            "settings": train.to_dict(),
            "lora": lora.to_dict() if lora else None,
            "global_step": outcome.global_step,
            "train_loss": outcome.train_loss,
            "train_seconds": outcome.train_seconds,
            "resumed_from": outcome.resumed_from,
            "loss_log": [e for e in outcome.log_history if "loss" in e],
            "sparsity": outcome.sparsity.to_dict(),
        }
        if merge_dir is not None:
            merged, report, plain = _masked_merge_step(
                outcome.model, outcome.masks, tokenizer, merge_dir, out.overwrite_output_dir
            )
            if windows:
                ppl["merged"] = evaluate_perplexity(merged, windows, batch, "merged")
            results["merged"] = {"path": str(merge_dir), "sparsity": report.to_dict(), "plain_merge_revived": plain}
        if ppl:
            print()
            print_perplexities(ppl, block_size)
        results.update(perplexity=ppl, total_wall_seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
        atomic_write_json(output_dir / RESULTS_FILE, results, overwrite=True)
        log.info("results written to %s", output_dir / RESULTS_FILE)
        return 0


def run_lora(model, data, train, lora, out, logging_settings) -> int:
    return run_training(model, data, train, out, lora)


def run_full(model, data, train, out, logging_settings) -> int:
    return run_training(model, data, train, out)


def run_merge(model: ModelSettings, merge: MergeSettings, logging_settings: LogSettings) -> int:
    from ..finetune import capture_masks, load_adapter

    target = Path(merge.output)
    check_disjoint({"--model": model.model, "--adapter": merge.adapter}, {"--output": target})
    ensure_free(target, merge.overwrite, "merged model folder")
    loaded = model.load()
    check_space([(target, weights_bytes(loaded.model), "the merged model")])
    masks = capture_masks(loaded.model)
    _masked_merge_step(load_adapter(loaded.model, merge.adapter), masks, loaded.tokenizer, target, merge.overwrite)
    return 0
