"""Pruning SmolLM2-135M over 1 and 2 ranks (torchrun, gloo, one CPU thread per rank): wall time, time in
collectives and each rank's share of the work.

Each rank's time is split by wrapping, in this script only, the engine's pieces with timers: capturing block 0's
inputs, the calibration forwards (with the statistics hooks), the statistics themselves (``add`` of the
accumulators), the solves (the method's function per layer), the re-run that produces the next block's inputs,
and the collectives (``Ranks.collective_seconds``, which includes waiting for a slower rank). From the measured
split the script also writes down what 8 ranks would take: the forward and statistics shares divided by 8, the
solves as the longest of the 8 ranks' shares when the measured per-layer times are dealt the way
``wanda.parallel.ranks.deal_layers`` deals them; collectives on 8 GPUs are estimated from bytes, not measured.

Usage (from the repository root; heavy, so under the shared lock)::

    flock /tmp/wanda-heavy.lock python benchmarks/distributed_scaling.py
    python benchmarks/distributed_scaling.py --methods wanda --nsamples 8      # quicker

Writes ``benchmarks/results/distributed_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="what to prune (default: %(default)s)")
    p.add_argument(
        "--calib_dataset",
        default="wiki-summaries",
        help="calibration and evaluation source (default: %(default)s: its calibration and held-out parts)",
    )
    p.add_argument("--methods", default="wanda,sparsegpt", help="comma-separated (default: %(default)s)")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default: %(default)s)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--eval_windows", type=int, default=8, help="held-out summaries windows (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=2, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--output", default=str(RESULTS / "distributed_scaling"), help="file stem")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank's output folder (set by torchrun runs)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- one rank ---------------------------------------------------------------------------------------------


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        return timed


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    import wanda.engine.layerwise as layerwise
    import wanda.methods.registry as registry
    from wanda import PruneSettings, prune
    from wanda.data import calibration_windows, evaluation_windows, resolve_source
    from wanda.eval.perplexity import ranked_perplexity
    from wanda.models import load_model
    from wanda.parallel.ranks import init_ranks
    from wanda.stats import Gram, InputRecorder, SquaredNorm

    ranks = init_ranks(device="cpu")
    timers = Timers()
    # the timers: every piece the engine runs, wrapped in place (this process only)
    layerwise.capture_block_inputs = timers.wrap("capture", layerwise.capture_block_inputs)
    layerwise.LayerwiseEngine.run_block = timers.wrap("forward_next_inputs", layerwise.LayerwiseEngine.run_block)
    for cls in (SquaredNorm, Gram):
        cls.add = timers.wrap("statistics", cls.add)
    enter, exit_ = InputRecorder.__enter__, InputRecorder.__exit__
    marks: list[float] = []
    InputRecorder.__enter__ = lambda self: (marks.append(time.perf_counter()), enter(self))[1]

    def recorder_exit(self, *exc):
        timers.seconds["calibration_forward_and_statistics"] += time.perf_counter() - marks.pop()
        return exit_(self, *exc)

    InputRecorder.__exit__ = recorder_exit
    solved: dict[str, float] = {}
    spec = registry.METHOD_SPECS[args.method]

    def solve(weight, stat, settings):
        start = time.perf_counter()
        try:
            return spec.prune(weight, stat, settings)
        finally:
            solved[f"{len(solved)}:{tuple(weight.shape)}"] = time.perf_counter() - start

    registry.METHOD_SPECS[args.method] = dataclasses.replace(spec, prune=solve)

    loaded = load_model(args.model, dtype="float32", device="cpu")
    calib = calibration_windows(
        resolve_source(args.calib_dataset, "calibration"), loaded.tokenizer, args.nsamples, args.seqlen, 0
    )
    evals = evaluation_windows(
        resolve_source(args.calib_dataset, "evaluation"), loaded.tokenizer, args.seqlen, args.eval_windows
    )
    start = time.perf_counter()
    report = prune(
        loaded.model,
        calib,
        PruneSettings(prune_method=args.method),
        device="cpu",
        batch_size=args.batch_size,
        ranks=ranks,
    )
    prune_wall = time.perf_counter() - start
    prune_collectives = ranks.collective_seconds
    start = time.perf_counter()
    ppl = ranked_perplexity(ranks, loaded.model, evals, batch_size=args.batch_size, progress=False)
    eval_wall = time.perf_counter() - start
    split = dict(timers.seconds)
    split["calibration_forward"] = split.pop("calibration_forward_and_statistics") - split.get("statistics", 0.0)
    split["solve"] = sum(solved.values())
    out = {
        "rank": ranks.rank,
        "world_size": ranks.world_size,
        "method": args.method,
        "prune_wall": prune_wall,
        "collectives_in_pruning": prune_collectives,
        "eval_wall": eval_wall,
        "eval_collectives": ranks.collective_seconds - prune_collectives,
        "ppl": ppl,
        "split": split,
        "layers_solved": len(solved),
        "layers": len(report.layers),
        "solve_seconds_per_layer": {l.name: l.prune_seconds for l in report.layers},
        "layer_shapes": {l.name: list(l.shape) for l in report.layers},
        "windows_here": ranks.local_windows(calib, args.batch_size).shape[0],
    }
    Path(args.worker, f"rank{ranks.rank}.json").write_text(json.dumps(out, indent=1))
    ranks.close()


# ---- the driver -------------------------------------------------------------------------------------------


def launch(args: argparse.Namespace, method: str, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(world),
            __file__,
            "--worker",
            folder,
            "--method",
            method,
            "--nsamples",
            str(args.nsamples),
            "--model",
            args.model,
            "--calib_dataset",
            args.calib_dataset,
            "--seqlen",
            str(args.seqlen),
            "--eval_windows",
            str(args.eval_windows),
            "--batch_size",
            str(args.batch_size),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        total = time.perf_counter() - start
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    for r in ranks:
        r["process_wall"] = total
    return ranks


def eight_gpu_estimate(one: dict) -> dict:
    """From the 1-rank split: what 8 ranks would take per run, forward and statistics divided by 8, solves as the
    longest share when the measured per-layer times are dealt as the job deals them."""
    from wanda.parallel.ranks import deal_layers

    split = one["split"]
    per_block: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for name, shape in one["layer_shapes"].items():
        block = name.rsplit(".", 2)[0]
        per_block[block][name] = tuple(shape)
    if one["method"] in ("wanda", "magnitude"):  # mask-only: every rank recomputes every mask
        solve8 = split["solve"]
    else:
        solve8 = 0.0
        for layers in per_block.values():
            owners = deal_layers(layers, 8)
            load = defaultdict(float)
            for name, rank in owners.items():
                load[rank] += one["solve_seconds_per_layer"][name]
            solve8 += max(load.values())
    parallel = (
        split.get("capture", 0)
        + split["calibration_forward"]
        + split.get("statistics", 0)
        + split.get("forward_next_inputs", 0)
    )
    rest = one["prune_wall"] - parallel - split["solve"]
    return {
        "parallel_work_1": parallel,
        "parallel_work_8": parallel / 8,
        "solve_1": split["solve"],
        "solve_8": solve8,
        "other_1": rest,
        "estimate_8": parallel / 8 + solve8 + rest,
        "speedup_8": one["prune_wall"] / (parallel / 8 + solve8 + rest),
    }


#: Assumed, not measured: NCCL bus bandwidth within an 8-GPU NVLink node, and across nodes (400 Gb/s InfiniBand).
NVLINK_BYTES_PER_S, INFINIBAND_BYTES_PER_S = 400e9, 50e9


def collective_bytes(hidden: int, intermediate: int, kv: int) -> dict[str, float]:
    """Bytes one LLaMA-style block sends: the Gram matrices (fp32, one per distinct input: q/k/v, o, gate/up,
    down) or the squared norms (fp64), and the weights of the block in bf16 (the OBS methods' broadcast)."""
    gram = 4 * (3 * hidden**2 + intermediate**2)
    norms = 8 * (3 * hidden + intermediate)
    weights = 2 * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate)
    return {"gram": gram, "norms": norms, "weights": weights}


def collective_estimates(ranks: int = 8) -> list[str]:
    rows = []
    for name, (hidden, inter, kv, blocks) in {
        "smollm2-135m": (576, 1536, 192, 30),
        "LLaMA-2-70B": (8192, 28672, 1024, 80),
    }.items():
        b = collective_bytes(hidden, inter, kv)
        ring = 2 * (ranks - 1) / ranks  # an all-reduce moves this many times the buffer over the slowest link
        for link, speed in (("NVLink node", NVLINK_BYTES_PER_S), ("2 nodes, InfiniBand", INFINIBAND_BYTES_PER_S)):
            sgpt = (b["gram"] * ring + b["weights"]) / speed * blocks
            wanda = b["norms"] * ring / speed * blocks
            rows.append(
                f"| {name} | {link} | {b['gram'] / 1e6:.1f} | {b['weights'] / 1e6:.1f} | {wanda * 1e3:.2f} | "
                f"{sgpt:.2f} |"
            )
    return rows


def markdown(runs: dict, args: argparse.Namespace, meta: dict) -> str:
    lines = [
        f"Distributed pruning of {args.model} on {meta['cpu']} ({meta['torch']}, fp32, gloo, 1 torch thread "
        f"per rank, {os.cpu_count()} cores shared with other jobs): {args.nsamples} calibration windows of "
        f"{args.seqlen} tokens in batches of {args.batch_size} from {args.calib_dataset}, perplexity on "
        f"{args.eval_windows} windows of its evaluation part. Seconds per rank; *collectives* includes waiting for the slower rank.",
        "",
        "| method | ranks | rank | windows | prune wall | capture | calib. forward | statistics | solve "
        "(layers) | next-input forward | collectives | eval wall | eval collectives | ppl | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (method, world), ranks in runs.items():
        base = max(r["prune_wall"] for r in runs[(method, 1)]) if (method, 1) in runs else None
        wall = max(r["prune_wall"] for r in ranks)
        for r in ranks:
            s = r["split"]
            lines.append(
                f"| {method} | {world} | {r['rank']} | {r['windows_here']} | {r['prune_wall']:.1f} | "
                f"{s.get('capture', 0):.1f} | {s['calibration_forward']:.1f} | {s.get('statistics', 0):.1f} | "
                f"{s['solve']:.1f} ({r['layers_solved']}) | {s.get('forward_next_inputs', 0):.1f} | "
                f"{r['collectives_in_pruning']:.1f} | {r['eval_wall']:.1f} | {r['eval_collectives']:.2f} | "
                f"{r['ppl']:.4f} | {'' if base is None or r['rank'] else f'{base / wall:.2f}x'} |"
            )
    lines += [
        "",
        "Expected with 8 ranks (from the 1-rank split above; not measured: there is no GPU in this task):",
        "",
        "| method | forward+statistics 1 rank | /8 | solve 1 rank | solve, longest of 8 shares | other | "
        "est. 8 ranks | est. speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (method, world), ranks in runs.items():
        if world != 1:
            continue
        e = eight_gpu_estimate(ranks[0])
        lines.append(
            f"| {method} | {e['parallel_work_1']:.1f} | {e['parallel_work_8']:.1f} | {e['solve_1']:.1f} | "
            f"{e['solve_8']:.1f} | {e['other_1']:.1f} | {e['estimate_8']:.1f} | {e['speedup_8']:.2f}x |"
        )
    lines += [
        "",
        f"Collectives on 8 GPUs, estimated from bytes (assumed bus bandwidth {NVLINK_BYTES_PER_S / 1e9:.0f} GB/s "
        f"in an NVLink node, {INFINIBAND_BYTES_PER_S / 1e9:.0f} GB/s between nodes; ring all-reduce; not "
        "measured): per block, the Gram matrices summed (fp32) and the solved weights broadcast (bf16); not "
        "counted: each collective's latency (two small object exchanges over gloo per block, about a "
        "millisecond each, plus a few NCCL calls).",
        "",
        "| model | link | Gram MB / block | weights MB / block | Wanda total ms | SparseGPT total s |",
        "|---|---|---:|---:|---:|---:|",
        *collective_estimates(),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT / "src"))
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    }
    runs: dict = {}
    for method in args.methods.split(","):
        for world in (int(w) for w in args.ranks.split(",")):
            runs[(method, world)] = launch(args, method, world)
            Path(args.output + ".json").write_text(
                json.dumps(
                    {
                        "meta": meta,
                        "settings": vars(args),
                        "runs": [{"method": m, "world_size": w, "ranks": r} for (m, w), r in runs.items()],
                    },
                    indent=1,
                )
            )
    text = markdown(runs, args, meta)
    Path(args.output + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
