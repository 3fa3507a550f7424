"""The seed's main job: load, calibrate, prune, evaluate, save."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from ..config import METHODS, PruneSettings
from ..devices import default_batch_size
from ..data import calibration_windows, evaluation_windows, resolve_source
from ..errors import WandaError
from ..eval import perplexity
from ..io import atomic_write_json, atomic_write_text, ensure_free
from ..methods import get_method
from ..models import default_seqlen, load_model
from ..models.bundled import BUNDLED_NAME
from ..pruning import PruneReport, prune
from ..resources import run_peak_rss_mb
from .common import Parser, setup_logging

log = logging.getLogger("wanda")

#: The embedded default (no --model) follows the benchmark protocol so that it finishes in minutes on 2 cores.
#: The embedded default: the benchmark protocol's calibration (32 x 1024 tokens), and 20 windows per evaluation
#: set (the benchmark uses 40) so that dense and pruned perplexity on two sets fit the first run's 15 minutes.
BUNDLED_DEFAULTS = {"nsamples": 32, "seqlen": 1024, "eval_windows": 20}


def build_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Prune a causal language model with magnitude, Wanda, SparseGPT or the OBS "
               "ablations, then report its perplexity. With no --model, prunes the bundled SmolLM2-135M offline.")
    g = p.add_argument_group("the seed's flags")
    g.add_argument("--model", default=None, help="hub id, local from_pretrained folder, .gguf file, or "
                   f"'{BUNDLED_NAME}' (the bundled model; the default)")
    g.add_argument("--cache_dir", default="llm_weights", help="where hub weights are downloaded (default: llm_weights)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default: 0)")
    g.add_argument("--nsamples", type=int, default=None,
                   help=f"calibration windows (default: 128; {BUNDLED_DEFAULTS['nsamples']} for the bundled model)")
    g.add_argument("--sparsity_ratio", type=float, default=None,
                   help="fraction of weights to prune; default 0.5 for unstructured, N/M for N:M (must equal it)")
    g.add_argument("--sparsity_type", default="unstructured", help="'unstructured' or N:M such as 2:4, 4:8")
    g.add_argument("--prune_method", default="wanda", help=f"one of {', '.join(METHODS)} (default: wanda)")
    g.add_argument("--use_variant", action="store_true", help="Wanda's appendix variant (cumulative-sum threshold)")
    g.add_argument("--save", default=None, help="folder for log_{method}.txt and results_{method}.json")
    g.add_argument("--save_model", default=None, help="folder to write the pruned model and tokenizer to")
    g.add_argument("--save_format", default="dense", choices=("dense", "compressed"),
                   help="--save_model as a from_pretrained folder (dense, the default) or as non-zero values plus "
                   "bitmask / 2:4 indices (compressed: pruned matrices about 53%% of dense at 50%% sparsity; every wanda command and "
                   "wanda.export.load_compressed read it)")
    g.add_argument("--eval_zero_shot", action="store_true", help="also run zero-shot tasks (lm-eval)")
    r = p.add_argument_group("run settings")
    r.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: min(model context, 2048); "
                   f"{BUNDLED_DEFAULTS['seqlen']} for the bundled model)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    r.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), float32, float16, bfloat16")
    r.add_argument("--calib_dataset", default=None,
                   help="c4, wikitext2, ptb, wiki-summaries, or a .txt/.json/.jsonl/.parquet file or folder "
                   "(default: c4; wiki-summaries for the bundled model)")
    r.add_argument("--eval_dataset", default=None, nargs="+",
                   help="one or more evaluation sources as for --calib_dataset, or 'none' (default: wikitext2; "
                   "held-out wiki-summaries plus wikitext2 where available for the bundled model)")
    r.add_argument("--eval_windows", type=int, default=None, help="evaluate on at most this many windows per set "
                   f"(default: all; {BUNDLED_DEFAULTS['eval_windows']} for the bundled model)")
    r.add_argument("--eval_dense", action="store_true", help="also evaluate the model before pruning "
                   "(on by default for the bundled model)")
    r.add_argument("--text_field", default="text", help="field holding the text in json/jsonl/parquet (default: text)")
    r.add_argument("--batch_size", type=int, default=None,
                   help="windows per forward pass (default: 8 on a GPU, 2 on a CPU)")
    r.add_argument("--overwrite", action="store_true", help="replace existing results in --save / --save_model")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from .eval import add_zero_shot_arguments  # --tasks --num_fewshot --limit --eval_batch_size --zero_shot_data

    add_zero_shot_arguments(p)  # the same group as `wanda eval`
    return p


def _check_args(args, settings: PruneSettings) -> None:
    if args.nsamples is not None and args.nsamples < 1:
        raise WandaError(f"--nsamples must be at least 1, got {args.nsamples}")
    if args.seqlen is not None and args.seqlen < 2:
        raise WandaError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise WandaError(f"--eval_windows must be at least 1, got {args.eval_windows}")
    if args.save:
        for name in (f"log_{args.prune_method}.txt", f"results_{args.prune_method}.json"):
            ensure_free(Path(args.save) / name, args.overwrite, "result")
    if args.save_model:
        ensure_free(args.save_model, args.overwrite, "model folder")
    if args.eval_zero_shot:  # fail before pruning, not after it
        from ..eval.zeroshot import check_zero_shot_args

        check_zero_shot_args(args)


def _eval_specs(args, bundled: bool) -> list[str]:
    if args.eval_dataset:
        if [s.lower() for s in args.eval_dataset] == ["none"]:
            return []
        return [s for item in args.eval_dataset for s in item.split(",") if s]
    if not bundled:
        return ["wikitext2"]
    specs = ["wiki-summaries"]
    try:
        resolve_source("wikitext2", "evaluation")
        specs.append("wikitext2")
    except WandaError:
        log.info("WikiText-2 is not available offline (set WANDA_DATA_DIR to a folder with wikitext-2-raw/); "
                 "evaluating on the held-out summaries only")
    return specs


def _evaluate(model, windows: dict[str, torch.Tensor], batch_size: int, label: str) -> dict[str, float]:
    return {name: perplexity(model, w, batch_size=batch_size, desc=f"{label} ppl {name}") for name, w in windows.items()}


def _write_results(args, report: PruneReport, dense: dict, pruned: dict, extra: dict) -> None:
    save = Path(args.save)
    names = list(pruned)
    header = ["method", "actual_sparsity", "ppl_test"] + [f"ppl_{n}" for n in names[1:]]
    first = [f"{pruned[names[0]]:.4f}"] if names else ["nan"]
    row = [args.prune_method, f"{report.actual_sparsity:.4f}"] + first + [f"{pruned[n]:.4f}" for n in names[1:]]
    atomic_write_text(save / f"log_{args.prune_method}.txt", "\t".join(header) + "\n" + "\t".join(row) + "\n",
                      args.overwrite)
    payload = {"prune": report.to_dict(), "perplexity": {"dense": dense, "pruned": pruned}, **extra}
    atomic_write_json(save / f"results_{args.prune_method}.json", payload, args.overwrite)


def _print_table(args, report: PruneReport, dense: dict, pruned: dict) -> None:
    print(f"\n{args.prune_method} {report.settings['pattern']} (ratio {report.settings['sparsity_ratio']:g}) on "
          f"{args.model or BUNDLED_NAME}: actual sparsity {report.actual_sparsity:.4f}, pruning {report.prune_seconds:.1f}s "
          f"(mask and update), {report.wall_seconds:.1f}s wall")
    if pruned:
        print("| eval set | dense ppl | pruned ppl |")
        print("|---|---|---|")
        for name, value in pruned.items():
            d = f"{dense[name]:.3f}" if name in dense else "-"
            print(f"| {name} | {d} | {value:.3f} |")
    sys.stdout.flush()


def run(argv: list[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose)
    settings = PruneSettings(prune_method=args.prune_method, sparsity_ratio=args.sparsity_ratio,
                             sparsity_type=args.sparsity_type, use_variant=args.use_variant)
    _check_args(args, settings)
    bundled = args.model in (None, BUNDLED_NAME)
    for key, value in BUNDLED_DEFAULTS.items():
        if getattr(args, key) is None and bundled:
            setattr(args, key, value)
    if args.nsamples is None:
        args.nsamples = 128
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    loaded = load_model(args.model, args.cache_dir, args.dtype, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    device = torch.device("cuda") if next(model.parameters()).is_cuda else torch.device("cpu")
    if args.batch_size is None:
        args.batch_size = default_batch_size(device)
    seqlen = args.seqlen or default_seqlen(model)
    log.info("sequence length %d", seqlen)

    eval_windows = {}
    for spec in _eval_specs(args, bundled):
        source = resolve_source(spec, "evaluation", args.text_field)
        eval_windows[source.name] = evaluation_windows(source, tokenizer, seqlen, args.eval_windows)

    calib = None
    if get_method(args.prune_method).statistic is not None:
        calib_spec = args.calib_dataset or ("wiki-summaries" if bundled else "c4")
        source = resolve_source(calib_spec, "calibration", args.text_field)
        calib = calibration_windows(source, tokenizer, args.nsamples, seqlen, args.seed)
        log.info("calibration: %d windows of %d tokens from %s", calib.shape[0], seqlen, source.name)

    dense = _evaluate(model, eval_windows, args.batch_size, "dense") if (args.eval_dense or bundled) else {}
    report = prune(model, calib, settings, device=device, batch_size=args.batch_size)
    pruned = _evaluate(model, eval_windows, args.batch_size, "pruned")

    extra = {"model": args.model or BUNDLED_NAME, "seqlen": seqlen, "nsamples": args.nsamples, "seed": args.seed,
             "calib_dataset": args.calib_dataset, "eval_dataset": list(eval_windows),
             "total_wall_seconds": time.perf_counter() - start, "peak_rss_mb": run_peak_rss_mb()}
    if args.eval_zero_shot:
        from ..eval.zeroshot import run_zero_shot  # built by the zero-shot issue

        extra["zero_shot"] = run_zero_shot(model, tokenizer, args)
    _print_table(args, report, dense, pruned)
    if args.save:
        _write_results(args, report, dense, pruned, extra)
        log.info("results written to %s", args.save)
    if args.save_model:
        from ..export import save_model

        save_model(model, tokenizer, args.save_model, args.save_format, args.overwrite)
    return 0
