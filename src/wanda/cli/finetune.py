"""``wanda finetune``: recover accuracy after pruning without losing the sparsity.

    wanda finetune lora  --model PRUNED --output_dir OUT [--merge [DIR]]   # LoRA adapter (seed: lora_ft)
    wanda finetune full  --model PRUNED --output_dir OUT                   # all weights, zeros kept
    wanda finetune merge --model PRUNED --adapter OUT --output DIR         # masked merge of a saved adapter
    wanda finetune eval  --model PRUNED --adapter OUT                      # seed: lora_ft/evaluate_ppl.py

After any training or merge the sparsity of every pruned matrix is printed, and the command fails (exit 2)
if a single pruned weight became non-zero.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from ..data import evaluation_windows, resolve_source
from ..errors import WandaError
from ..io import atomic_directory, atomic_write_json, ensure_free
from ..models import default_seqlen, load_model
from ..models.bundled import BUNDLED_NAME
from ..resources import peak_rss_mb
from .common import Parser, guarded, setup_logging

log = logging.getLogger("wanda")

RESULTS_FILE = "finetune_results.json"
#: The seed capped the block size at 1024 tokens (``run_clm.py``'s default).
BLOCK_SIZE_CAP = 1024


def _model_arguments(p: Parser, required: bool = True) -> None:
    p.add_argument("--model", "--model_name_or_path", dest="model", required=required,
                   help=f"the pruned model: a from_pretrained folder (e.g. written by wanda --save_model), hub id, "
                   f".gguf file or '{BUNDLED_NAME}'")
    r = p.add_argument_group("run settings")
    r.add_argument("--cache_dir", default="llm_weights", help="where hub weights are downloaded (default: llm_weights)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    r.add_argument("--dtype", default="auto", help="auto (fp32 on CPU; bf16/fp16 on GPU for LoRA, fp32 weights "
                   "under bf16/fp16 autocast for full fine-tuning), float32, float16, bfloat16")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _training_arguments(p: Parser, mode: str) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--dataset", "--dataset_name", dest="dataset", default=None,
                   help="training text: c4 (the seed's, through datasets), wikitext2, ptb, wiki-summaries (offline), "
                   "or a .txt/.json/.jsonl/.parquet file or folder; its calibration/train part is used "
                   f"(default: c4; wiki-summaries for {BUNDLED_NAME})")
    d.add_argument("--eval_dataset", nargs="+", default=None,
                   help="perplexity sets after training, as for --dataset, or 'none' (default: the evaluation part "
                   "of --dataset: C4 validation, WikiText-2 test, held-out summaries; a local file is used as is)")
    d.add_argument("--text_field", default="text", help="field holding the text in json/jsonl/parquet (default: text)")
    t = p.add_argument_group("training (transformers.Trainer)")
    t.add_argument("--block_size", type=int, default=None,
                   help=f"tokens per training sequence and evaluation window (default: min(context, {BLOCK_SIZE_CAP}))")
    t.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    t.add_argument("--num_train_epochs", type=float, default=1.0, help="passes over the training blocks (default: 1)")
    t.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --num_train_epochs if > 0")
    t.add_argument("--max_train_samples", type=int, default=None, help="use the first N training blocks (default: all)")
    t.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on at most N windows per set")
    t.add_argument("--per_device_train_batch_size", type=int, default=1, help="blocks per step per device (default: 1)")
    t.add_argument("--per_device_eval_batch_size", type=int, default=8, help="windows per forward pass (default: 8)")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step (default: 1; the seed used 128 / batch size)")
    t.add_argument("--warmup_steps", type=int, default=5, help="linear warm-up steps (default: 5, the seed's)")
    t.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    t.add_argument("--lr_scheduler_type", default="linear", help="a transformers scheduler name (default: linear)")
    t.add_argument("--optim", default="adamw_torch", help="a transformers optimizer name (default: adamw_torch)")
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm, 0 = off (default: 1)")
    t.add_argument("--logging_steps", type=int, default=10, help="log the loss every N steps (default: 10)")
    t.add_argument("--save_steps", type=int, default=50, help="checkpoint every N steps (default: 50)")
    t.add_argument("--save_total_limit", type=int, default=3, help="checkpoints kept (default: 3)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)")
    t.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    t.add_argument("--report_to", default="none", help="transformers logging integrations (default: none)")
    o = p.add_argument_group("output and resuming")
    o.add_argument("--output_dir", required=True, help="checkpoints, the final " +
                   ("adapter" if mode == "lora" else "model") + f", and {RESULTS_FILE}")
    o.add_argument("--overwrite_output_dir", action="store_true",
                   help="start afresh: delete old checkpoints in --output_dir instead of resuming from the last")
    o.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N folder to resume from (default: the last one in --output_dir, if any)")
    o.add_argument("--do_train", action="store_true", help="train (with neither --do_train nor --do_eval: both)")
    o.add_argument("--do_eval", action="store_true",
                   help="measure perplexity at the end; alone, evaluates what --output_dir already holds")


def build_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Fine-tune a pruned model without losing its sparsity (LoRA or mask-keeping "
               "full fine-tuning), merge adapters with the zero pattern kept, and evaluate base model + adapter.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{lora,full,merge,eval}")
    lora = sub.add_parser("lora", help="train a LoRA adapter on the frozen pruned weights")
    _model_arguments(lora)
    _training_arguments(lora, "lora")
    a = lora.add_argument_group("LoRA (peft)")
    a.add_argument("--lora_r", type=int, default=8, help="adapter rank (default: 8)")
    a.add_argument("--lora_alpha", type=float, default=16.0,
                   help="scale alpha; the update is alpha/r * BA (default: 16)")
    a.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the adapter input (default: 0.05)")
    a.add_argument("--lora_target_modules", default=None,
                   help="comma-separated module names, e.g. q_proj,v_proj (the seed's); default: every linear layer "
                   "in the decoder blocks (attention and MLP projections)")
    a.add_argument("--merge", nargs="?", const="", default=None, metavar="DIR",
                   help="also write the merged model, pruned weights kept at zero (default DIR: OUTPUT_DIR/merged)")
    full = sub.add_parser("full", help="train every weight; pruned weights stay exactly zero")
    _model_arguments(full)
    _training_arguments(full, "full")
    merge = sub.add_parser("merge", help="merge a saved adapter into the pruned model, keeping every zero")
    _model_arguments(merge)
    merge.add_argument("--adapter", required=True, help="adapter folder (the --output_dir of 'lora', or a checkpoint)")
    merge.add_argument("--output", required=True, help="folder for the merged model and tokenizer")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    # 'eval' is 'wanda eval' (run() hands it over before parsing); listed here so --help shows it.
    sub.add_parser("eval", help="perplexity of a model plus an unmerged --adapter: the same as 'wanda eval'")
    return p


# -- shared pieces -----------------------------------------------------------------------------------------

def _specs(values: list[str] | None) -> list[str]:
    if values is None:
        return []
    if [v.lower() for v in values] == ["none"]:
        return []
    return [s for item in values for s in item.split(",") if s]


def _train_settings(args):
    from ..finetune import TrainSettings

    return TrainSettings(
        block_size=args.block_size, learning_rate=args.learning_rate, num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, lr_scheduler_type=args.lr_scheduler_type, optim=args.optim,
        max_grad_norm=args.max_grad_norm, logging_steps=args.logging_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
    ).validate()


def _lora_settings(args):
    from ..finetune import LoraSettings

    targets = tuple(args.lora_target_modules.split(",")) if args.lora_target_modules is not None else None
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        target_modules=targets).validate()


def _dtype(args, mode: str) -> str:
    if mode != "full":
        return args.dtype
    # AdamW on half-precision weights loses small updates; fp32 weights train under autocast on a GPU
    if args.dtype in (None, "auto"):
        return "float32"
    if args.dtype in ("float16", "fp16"):
        raise WandaError("full fine-tuning needs float32 or bfloat16 weights (float16 ones cannot be trained "
                         "with gradient scaling); omit --dtype to train fp32 weights under autocast")
    return args.dtype


def _eval_windows(specs: list[str], tokenizer, text_field: str, seqlen: int, max_windows: int | None
                  ) -> dict[str, torch.Tensor]:
    windows = {}
    for spec in specs:
        source = resolve_source(spec, "evaluation", text_field)
        windows[source.name] = evaluation_windows(source, tokenizer, seqlen, max_windows)
    return windows


def _print_ppl(ppl: dict[str, dict[str, float]], seqlen: int) -> None:
    if not ppl:
        return
    columns = list(ppl)
    sets = list(dict.fromkeys(name for values in ppl.values() for name in values))
    print(f"\n| eval set (seqlen {seqlen}) | " + " | ".join(f"{c} ppl" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in sets:
        cells = [f"{ppl[c][name]:.3f}" if name in ppl[c] else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def _print_sparsity(title: str, report) -> None:
    print(f"\n{title}: sparsity {report.sparsity:.4f} over {len(report.matrices)} pruned matrices, "
          f"{report.revived} pruned weights non-zero")
    print(report.table())
    sys.stdout.flush()


def _save_merged(merged, tokenizer, target: Path, overwrite: bool, report) -> None:
    with atomic_directory(target, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "merge_report.json", report.to_dict())
    log.info("merged model written to %s", target)


# -- sub-commands ----------------------------------------------------------------------------------------

def _run_training(args, mode: str) -> int:
    from ..finetune import (evaluate_perplexity, finetune, masked_merge, plain_merge_revivals, resolve_checkpoint,
                            training_blocks, verify_sparsity)
    from ..finetune.train import training_arguments

    settings = _train_settings(args)
    lora = _lora_settings(args) if mode == "lora" else None
    dtype = _dtype(args, mode)
    do_train, do_eval = (True, True) if not (args.do_train or args.do_eval) else (args.do_train, args.do_eval)
    output_dir = Path(args.output_dir)
    merge_dir = None
    if mode == "lora" and args.merge is not None:
        merge_dir = Path(args.merge) if args.merge else output_dir / "merged"
        ensure_free(merge_dir, args.overwrite_output_dir, "merged model folder")
    bundled = args.model == BUNDLED_NAME
    train_spec = args.dataset or ("wiki-summaries" if bundled else "c4")
    eval_specs = _specs(args.eval_dataset) if args.eval_dataset is not None else [train_spec]
    if not do_train:
        if merge_dir is not None:
            raise WandaError("--merge merges a freshly trained adapter; to merge a saved one use: "
                             "wanda finetune merge --model MODEL --adapter OUTPUT_DIR --output DIR")
        return _evaluate_saved(args, mode, settings, eval_specs)
    training_arguments(settings, output_dir, True, {}, args.report_to)  # a bad --optim etc. fails before loading
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    # text first: a missing corpus fails before the model loads
    source = resolve_source(train_spec, "calibration", args.text_field)
    eval_sources = [resolve_source(spec, "evaluation", args.text_field) for spec in eval_specs] if do_eval else []
    if any(Path(spec).exists() and spec == train_spec for spec in eval_specs) and do_eval:
        log.warning("evaluating on %s, the file it trains on; pass --eval_dataset for held-out text", train_spec)

    loaded = load_model(args.model, args.cache_dir, dtype, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    block_size = settings.block_size or default_seqlen(model, BLOCK_SIZE_CAP)
    blocks = training_blocks(source, tokenizer, block_size, settings.max_train_samples)
    windows = {s.name: evaluation_windows(s, tokenizer, block_size, settings.max_eval_samples) for s in eval_sources}

    outcome = finetune(model, tokenizer, blocks, settings, output_dir, mode=mode, lora=lora,
                       resume_from_checkpoint=checkpoint, report_to=args.report_to, strict=False)
    what = "frozen base weights" if mode == "lora" else "fine-tuned model"
    _print_sparsity(f"after training ({what})", outcome.sparsity)
    outcome.sparsity.raise_if_revived(f"the {what}")
    outcome.trainer.save_model(str(output_dir))
    log.info("%s written to %s", "adapter" if mode == "lora" else "model", output_dir)

    label = "adapter" if mode == "lora" else "fine-tuned"
    ppl = {label: evaluate_perplexity(outcome.model, windows, settings.per_device_eval_batch_size, label)} \
        if windows else {}
    results = {"mode": mode, "model": args.model, "dataset": train_spec, "block_size": block_size,
               "train_blocks": int(blocks.shape[0]), "settings": settings.to_dict(),
               "lora": lora.to_dict() if lora else None, "global_step": outcome.global_step,
               "train_loss": outcome.train_loss, "train_seconds": outcome.train_seconds,
               "resumed_from": outcome.resumed_from,
               "loss_log": [e for e in outcome.log_history if "loss" in e], "sparsity": outcome.sparsity.to_dict()}
    if merge_dir is not None:
        revivals = plain_merge_revivals(outcome.model, outcome.masks)
        merged = masked_merge(outcome.model, outcome.masks)
        report = verify_sparsity(merged, outcome.masks)
        plain = sum(revivals.values())
        _print_sparsity(f"masked merge (a plain merge would have made {plain} pruned weights non-zero)", report)
        report.raise_if_revived("the merged model")
        if windows:
            ppl["merged"] = evaluate_perplexity(merged, windows, settings.per_device_eval_batch_size, "merged")
        _save_merged(merged, tokenizer, merge_dir, args.overwrite_output_dir, report)
        results["merged"] = {"path": str(merge_dir), "sparsity": report.to_dict(),
                             "plain_merge_revived": plain}
    _print_ppl(ppl, block_size)
    results.update(perplexity=ppl, total_wall_seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
    atomic_write_json(output_dir / RESULTS_FILE, results, overwrite=True)
    log.info("results written to %s", output_dir / RESULTS_FILE)
    return 0


def _evaluate_saved(args, mode: str, settings, eval_specs: list[str]) -> int:
    """``--do_eval`` alone: perplexity of what an earlier run left in ``--output_dir``."""
    from ..finetune import evaluate_perplexity, load_with_adapter

    output_dir = Path(args.output_dir)
    if mode == "lora":
        loaded = load_with_adapter(args.model, output_dir, args.cache_dir, args.dtype, args.device)
    else:
        loaded = load_model(str(output_dir), args.cache_dir, _dtype(args, mode), args.device)
    block_size = settings.block_size or default_seqlen(loaded.model, BLOCK_SIZE_CAP)
    windows = _eval_windows(eval_specs, loaded.tokenizer, args.text_field, block_size, settings.max_eval_samples)
    label = "adapter" if mode == "lora" else "fine-tuned"
    _print_ppl({label: evaluate_perplexity(loaded.model, windows, settings.per_device_eval_batch_size, label)},
               block_size)
    return 0


def _run_merge(args) -> int:
    from ..finetune import capture_masks, load_adapter, masked_merge, plain_merge_revivals, verify_sparsity

    target = Path(args.output)
    ensure_free(target, args.overwrite, "merged model folder")
    loaded = load_model(args.model, args.cache_dir, args.dtype, args.device)
    masks = capture_masks(loaded.model)
    peft_model = load_adapter(loaded.model, args.adapter)
    plain = sum(plain_merge_revivals(peft_model, masks).values())
    merged = masked_merge(peft_model, masks)
    report = verify_sparsity(merged, masks)
    _print_sparsity(f"masked merge (a plain merge would have made {plain} pruned weights non-zero)", report)
    report.raise_if_revived("the merged model")
    _save_merged(merged, loaded.tokenizer, target, args.overwrite, report)
    return 0


def run(argv: list[str], prog: str) -> int:
    if argv[:1] == ["eval"]:
        from .eval import run as run_eval

        return run_eval(argv[1:], f"{prog} eval")
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose)
    if args.command in ("lora", "full"):
        return _run_training(args, args.command)
    if args.command == "merge":
        return _run_merge(args)
    raise WandaError(f"unknown command {args.command!r}; use lora, full, merge or eval")


def main(argv: list[str], prog: str) -> None:
    guarded(lambda: run(argv, prog), prog)
