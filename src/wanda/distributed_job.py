"""``torchrun --nproc_per_node N -m wanda.distributed_job ...``: the pruning job over N ranks, on the Python API.

It stands in for the ``wanda`` command until the command line (being regenerated from the settings dataclasses)
calls the same pieces, in the same places: ``init_ranks`` first, every step that can fail on one rank inside
``ranks.agreed``, ``prune(..., ranks=ranks)``, ``ranks.perplexity`` for each evaluation set, and writing on the
main rank only. Without a launcher it is an ordinary single-process run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from .config import PruneSettings
from .data import calibration_windows, evaluation_windows, resolve_source
from .devices import default_batch_size
from .distributed import DistributedSettings, Ranks, init_ranks
from .errors import WandaError
from .io import atomic_write_json, ensure_free
from .models import default_seqlen, load_model
from .pruning import PruneReport, prune

log = logging.getLogger("wanda")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # agreed over the ranks like any other bad input
        raise WandaError(message)


def _parser() -> _Parser:
    p = _Parser(prog="wanda.distributed_job", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--prune_method", default="wanda")
    p.add_argument("--sparsity_ratio", type=float, default=None)
    p.add_argument("--sparsity_type", default="unstructured")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib_dataset", default="wiki-summaries")
    p.add_argument("--eval_dataset", nargs="*", default=[])
    p.add_argument("--eval_windows", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--save", default=None, help="folder for results.json (main rank only)")
    p.add_argument("--save_model", default=None, help="folder for the pruned model (main rank only)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dist_timeout", type=float, default=DistributedSettings.dist_timeout)
    return p


def run(argv: list[str]) -> int:
    ranks = init_ranks(DistributedSettings(), device="auto")  # before parsing: a bad flag must reach every rank
    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return _run(argv, ranks)
    finally:
        ranks.close()


def _run(argv: list[str], ranks: Ranks) -> int:
    start = time.perf_counter()
    with ranks.agreed("reading the flags"):
        args = _parser().parse_args(argv)
        timeout = DistributedSettings(dist_timeout=args.dist_timeout).dist_timeout
        settings = PruneSettings(prune_method=args.prune_method, sparsity_ratio=args.sparsity_ratio,
                                 sparsity_type=args.sparsity_type)
        if args.nsamples < 1:
            raise WandaError(f"--nsamples must be at least 1, got {args.nsamples}")
        if ranks.is_main and args.save:
            ensure_free(Path(args.save) / "results.json", args.overwrite, "result")
        if ranks.is_main and args.save_model:
            ensure_free(args.save_model, args.overwrite, "model folder")
        device = str(ranks.select_device(args.device)) if ranks.distributed else args.device
    ranks.use_timeout(timeout)
    with ranks.agreed("loading the model and the data"):
        loaded = load_model(args.model, dtype=args.dtype, device=device)
        model = loaded.model
        block_device = ranks.device or next(model.parameters()).device
        batch_size = args.batch_size or default_batch_size(block_device)
        seqlen = args.seqlen or default_seqlen(model)
        calib = calibration_windows(resolve_source(args.calib_dataset, "calibration"), loaded.tokenizer,
                                    args.nsamples, seqlen, args.seed)
        evals = {}
        for spec in args.eval_dataset:
            source = resolve_source(spec, "evaluation")
            evals[source.name] = evaluation_windows(source, loaded.tokenizer, seqlen, args.eval_windows)
    report = prune(model, calib, settings, device=block_device, batch_size=batch_size, ranks=ranks)
    ppl = {name: ranks.perplexity(model, windows, batch_size=batch_size, desc=f"ppl {name}")
           for name, windows in evals.items()}
    with ranks.agreed("writing the results"):  # the others wait here until the main rank has written everything
        if ranks.is_main:
            _write(args, report, ppl, ranks, settings, seqlen, start, model, loaded.tokenizer)
    return 0


def _write(args: argparse.Namespace, report: PruneReport, ppl: dict[str, float], ranks: Ranks,
           settings: PruneSettings, seqlen: int, start: float, model: torch.nn.Module, tokenizer: object) -> None:
    print(f"{settings.method} {settings.pattern} over {ranks.world_size} rank(s): sparsity "
          f"{report.actual_sparsity:.4f}, {report.wall_seconds:.1f}s pruning wall, perplexity {ppl}")
    if args.save:
        payload = {"prune": report.to_dict(), "perplexity": ppl, "world_size": ranks.world_size,
                   "collective_seconds": ranks.collective_seconds, "seqlen": seqlen, "nsamples": args.nsamples,
                   "total_wall_seconds": time.perf_counter() - start}
        atomic_write_json(Path(args.save) / "results.json", payload, args.overwrite)
    if args.save_model:
        from .export import save_model

        save_model(model, tokenizer, args.save_model, "dense", args.overwrite)


def main(argv: list[str] | None = None) -> NoReturn:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code = run(list(sys.argv[1:] if argv is None else argv))
    except WandaError as exc:
        print(f"wanda: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
