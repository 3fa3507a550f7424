"""``wanda eval``: perplexity and/or zero-shot accuracy of a saved model, without pruning it.

With ``--adapter`` the model is evaluated with a LoRA adapter attached unmerged (the seed's
``lora_ft/evaluate_ppl.py``); ``wanda finetune eval`` is this command.

Also home of the zero-shot flags, which the pruning job (``wanda --eval_zero_shot``) shares.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from ..data import evaluation_windows, resolve_source
from ..errors import WandaError
from ..eval import perplexity
from ..io import atomic_write_json, ensure_free
from ..models import default_seqlen, load_model
from ..models.bundled import BUNDLED_NAME
from ..resources import peak_rss_mb
from .common import Parser, guarded, setup_logging

log = logging.getLogger("wanda")

RESULTS_FILE = "results_eval.json"


def add_zero_shot_arguments(parser: Parser) -> None:
    """The zero-shot flags (lm-eval), as one argument group; read by ``ZeroShotSettings.from_namespace``."""
    from ..eval.zeroshot import SEED_TASKS

    z = parser.add_argument_group("zero-shot evaluation (with --eval_zero_shot)")
    z.add_argument("--tasks", default=None,
                   help=f"comma-separated lm-eval tasks (default: the paper's seven: {','.join(SEED_TASKS)})")
    z.add_argument("--num_fewshot", type=int, default=0, help="examples in each prompt (default: 0)")
    z.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N documents of each task, for quick runs (default: all)")
    z.add_argument("--eval_batch_size", default="8", help="requests per forward pass, or 'auto' (default: 8)")
    z.add_argument("--zero_shot_data", default=None,
                   help="folder with local copies of the task files (layout of shared/data/zeroshot), or 'hub' "
                   "to download them (default: $WANDA_DATA_DIR/zeroshot if it exists, else the hub)")


def build_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Evaluate a saved (pruned or dense) model: perplexity and/or zero-shot "
               "accuracy with lm-eval. Nothing is pruned or changed.")
    p.add_argument("--model", default=None, help="from_pretrained folder (e.g. written by --save_model), hub id, "
                   f".gguf file or '{BUNDLED_NAME}' (default: the bundled model)")
    p.add_argument("--adapter", "--lora_weights", dest="adapter", default=None,
                   help="LoRA adapter folder (written by 'wanda finetune lora') to evaluate attached, unmerged")
    p.add_argument("--eval_dataset", default=["wikitext2"], nargs="+",
                   help="perplexity sets: c4, wikitext2, ptb, wiki-summaries, a .txt/.json/.jsonl/.parquet file or "
                   "folder, or 'none' for zero-shot only (default: wikitext2)")
    p.add_argument("--eval_windows", type=int, default=None, help="evaluate on at most this many windows per set")
    p.add_argument("--seqlen", "--ctx_length", dest="seqlen", type=int, default=None, help="tokens per window (default: min(model context, 2048))")
    p.add_argument("--batch_size", type=int, default=8, help="perplexity windows per forward pass (default: 8)")
    p.add_argument("--text_field", default="text", help="field holding the text in json/jsonl/parquet (default: text)")
    p.add_argument("--eval_zero_shot", action="store_true", help="run zero-shot tasks (lm-eval)")
    add_zero_shot_arguments(p)
    r = p.add_argument_group("run settings")
    r.add_argument("--cache_dir", default="llm_weights", help="where hub weights are downloaded (default: llm_weights)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    r.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), float32, float16, bfloat16")
    r.add_argument("--save", default=None, help=f"folder for {RESULTS_FILE} (and zero_shot.json)")
    r.add_argument("--overwrite", action="store_true", help="replace existing results in --save")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _ppl_specs(args) -> list[str]:
    if [s.lower() for s in args.eval_dataset] == ["none"]:
        return []
    return [s for item in args.eval_dataset for s in item.split(",") if s]


def _check_args(args, specs: list[str]) -> None:
    if args.seqlen is not None and args.seqlen < 2:
        raise WandaError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise WandaError(f"--eval_windows must be at least 1, got {args.eval_windows}")
    if args.batch_size < 1:
        raise WandaError(f"--batch_size must be at least 1, got {args.batch_size}")
    zero_shot_flags = [flag for flag, value in (("--tasks", args.tasks), ("--limit", args.limit),
                                                 ("--zero_shot_data", args.zero_shot_data),
                                                 ("--num_fewshot", args.num_fewshot or None)) if value is not None]
    if zero_shot_flags and not args.eval_zero_shot:
        raise WandaError(f"{', '.join(zero_shot_flags)} only apply to zero-shot evaluation; add --eval_zero_shot")
    if not specs and not args.eval_zero_shot:
        raise WandaError("nothing to evaluate: --eval_dataset none without --eval_zero_shot")
    if args.adapter is not None and not (Path(args.adapter).expanduser() / "adapter_config.json").is_file():
        raise WandaError(f"{args.adapter} is not a LoRA adapter folder (no adapter_config.json); pass the "
                         "--output_dir of 'wanda finetune lora' or a checkpoint-N folder inside it")
    if args.save:
        ensure_free(Path(args.save) / RESULTS_FILE, args.overwrite, "result")
    if args.eval_zero_shot:
        from ..eval.zeroshot import check_zero_shot_args

        check_zero_shot_args(args)


def _attach_adapter(model, adapter: str):
    """The causal LM with the adapter's LoRA layers active inside it, so evaluation code needs no peft case."""
    from ..finetune import load_adapter

    peft_model = load_adapter(model, adapter)
    peft_model.eval()
    log.info("attached the LoRA adapter %s (unmerged)", adapter)
    return peft_model.get_base_model()


def run(argv: list[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose)
    specs = _ppl_specs(args)
    _check_args(args, specs)
    start = time.perf_counter()
    sources = [resolve_source(spec, "evaluation", args.text_field) for spec in specs]  # fail before loading

    loaded = load_model(args.model, args.cache_dir, args.dtype, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    seqlen = args.seqlen or default_seqlen(model)
    from ..eval.zeroshot import linear_zero_counts

    counts = linear_zero_counts(model)  # of the base weights, before an adapter adds its own matrices
    total = sum(size for _, size in counts.values())
    sparsity = sum(zeros for zeros, _ in counts.values()) / total if total else 0.0
    if args.adapter is not None:
        model = _attach_adapter(model, args.adapter)
    ppl = {}
    for source in sources:
        windows = evaluation_windows(source, tokenizer, seqlen, args.eval_windows)
        ppl[source.name] = perplexity(model, windows, batch_size=args.batch_size, desc=f"ppl {source.name}")
    label = (args.model or BUNDLED_NAME) + (f" + adapter {args.adapter}" if args.adapter else "")
    print(f"\n{label}: linear-layer sparsity {sparsity:.4f}" + (" (of the base weights)" if args.adapter else ""))
    if ppl:
        print(f"| eval set | perplexity (seqlen {seqlen}) |\n|---|---|")
        for name, value in ppl.items():
            print(f"| {name} | {value:.3f} |")
    sys.stdout.flush()

    zero_shot = None
    if args.eval_zero_shot:
        from ..eval.zeroshot import run_zero_shot

        zero_shot = run_zero_shot(model, tokenizer, args)
    if args.save:
        payload = {"model": args.model or BUNDLED_NAME, "adapter": args.adapter, "linear_sparsity": sparsity, "seqlen": seqlen,
                   "perplexity": ppl, "zero_shot": zero_shot, "total_wall_seconds": time.perf_counter() - start,
                   "peak_rss_mb": peak_rss_mb()}
        atomic_write_json(Path(args.save) / RESULTS_FILE, payload, args.overwrite)
        log.info("results written to %s", args.save)
    return 0


def main(argv: list[str], prog: str) -> None:
    guarded(lambda: run(argv, prog), prog)
