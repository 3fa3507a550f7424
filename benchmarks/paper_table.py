"""Reproduce the paper's comparison (Table 2 / the original code's LLaMA-2 table) on a named model (default: the bundled
SmolLM2-135M; ``--model gemma3-270m`` for Gemma 3 270M).

Runs dense, then magnitude / Wanda / SparseGPT at 50% unstructured, 4:8 and 2:4, plus the Wanda variant and
the four OBS ablations at 50% unstructured, each in its own process (so peak memory is per run). Writes
benchmarks/results/paper_table.{json,md,png} (paper_table_<family>.* for another model).

    python benchmarks/paper_table.py            # all runs (tens of minutes on 2 cores)
    python benchmarks/paper_table.py --only wanda:unstructured magnitude:2:4
    python benchmarks/paper_table.py --model gemma3-270m --only dense:unstructured wanda:unstructured wanda:2:4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import PROTOCOL, RESULTS

from wanda.models.bundled import NAMED_MODELS
from wanda.utils.io import atomic_write_text

RUNS = (
    [("dense", "unstructured", False)]
    + [(m, "unstructured", False) for m in ("wanda", "sparsegpt", "magnitude")]
    + [(m, p, False) for p in ("2:4", "4:8") for m in ("magnitude", "wanda", "sparsegpt")]
    + [("wanda", "unstructured", True)]
    + [
        (m, "unstructured", False)
        for m in ("ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter")
    ]
)
#: Runs whose wall time is compared with the two-forward-pass floor (the issue's targets); measuring the floor
#: costs two forward passes, so the other runs skip it unless --floor all.
FLOOR_RUNS = {("wanda", "unstructured", False), ("sparsegpt", "unstructured", False)}


def run_key(method: str, pattern: str, variant: bool) -> str:
    return f"{method}{'-variant' if variant else ''}:{pattern}"


def worker(method: str, pattern: str, variant: bool, floor: bool, model_name: str = "smollm2-135m") -> dict:
    """One configuration, in a fresh process: load, measure the floor, prune, evaluate."""
    import torch
    from common import protocol_data, two_forward_floor

    from wanda import PruneSettings, perplexity, prune
    from wanda.models import load_model
    from wanda.utils.resources import run_peak_rss_mb

    torch.manual_seed(0)
    start = time.perf_counter()
    loaded = load_model(model_name, dtype=PROTOCOL["dtype"], device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib, evals = protocol_data(tokenizer)
    out: dict = {"method": method, "pattern": pattern, "variant": variant}
    if method != "dense":
        # magnitude needs no forward pass at all, so it has no floor to compare with
        floor = two_forward_floor(model, calib, PROTOCOL["batch_size"]) if floor else float("nan")
        out["floor_seconds"] = floor
        settings = PruneSettings(
            prune_method=method,
            sparsity_type=pattern,
            use_variant=variant,
            sparsity_ratio=0.5 if pattern == "unstructured" else None,
        )
        report = prune(model, calib, settings, device="cpu", progress=False, batch_size=PROTOCOL["batch_size"])
        out.update(
            actual_sparsity=report.actual_sparsity,
            sparsity_over=report.sparsity_over,
            not_pruned=report.not_pruned_summary(),
            prune_seconds=report.prune_seconds,
            prune_wall_seconds=report.wall_seconds,
            peak_rss_mb_pruning=report.peak_rss_mb,
            wall_over_floor=report.wall_seconds / out["floor_seconds"],
        )
    else:
        out.update(actual_sparsity=0.0)
    out["ppl"] = {
        name: perplexity(model, windows, batch_size=PROTOCOL["batch_size"], progress=False)
        for name, windows in evals.items()
    }
    out["peak_rss_mb"] = run_peak_rss_mb()
    out["total_wall_seconds"] = time.perf_counter() - start
    return out


def _number(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)  # NaN: not measured


def markdown(rows: list[dict]) -> str:
    sets = list(rows[0]["ppl"])
    head = (
        ["method", "pattern"]
        + [f"ppl {s}" for s in sets]
        + [
            "sparsity",
            "mask+update s",
            "prune wall s",
            "floor s (2 fwd)",
            "wall / floor",
            "peak RSS pruning MB",
            "peak RSS run MB",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["method"] + (" (variant)" if r["variant"] else "")
        cells = [name, r["pattern"] if r["method"] != "dense" else "-"] + [f"{r['ppl'][s]:.2f}" for s in sets]
        if r["method"] == "dense":
            cells += ["0", "-", "-", "-", "-", "-"]
        else:
            cells += [
                f"{r['actual_sparsity']:.4f}",
                f"{r['prune_seconds']:.1f}",
                f"{r['prune_wall_seconds']:.1f}",
                _number(r["floor_seconds"], ".1f"),
                _number(r["wall_over_floor"], ".2f"),
                f"{r['peak_rss_mb_pruning']:.0f}",
            ]
        cells.append(f"{r['peak_rss_mb']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path, title: str = "SmolLM2-135M") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(rows[0]["ppl"])
    dense = next(r for r in rows if r["method"] == "dense")
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5))
    axes = axes if len(sets) > 1 else [axes]
    patterns = ("unstructured", "4:8", "2:4")
    methods = ("magnitude", "wanda", "sparsegpt")
    for ax, s in zip(axes, sets):
        width = 0.25
        for k, m in enumerate(methods):
            values = [
                next(
                    (r["ppl"][s] for r in rows if r["method"] == m and r["pattern"] == p and not r["variant"]),
                    float("nan"),
                )
                for p in patterns
            ]
            ax.bar([i + (k - 1) * width for i in range(len(patterns))], values, width, label=m)
        ax.axhline(dense["ppl"][s], color="black", linestyle="--", label="dense")
        ax.set_xticks(range(len(patterns)), [f"{p} 50%" if p == "unstructured" else p for p in patterns])
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"{title}, {s}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run keys such as wanda:unstructured or wanda-variant:unstructured")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--floor",
        choices=("targets", "all", "none"),
        default="targets",
        help="measure the two-forward-pass floor for the target runs only (Wanda and SparseGPT at "
        "50%% unstructured; default), for every run, or for none (saves two forward passes a run)",
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        choices=tuple(NAMED_MODELS),
        help="named model to run (default: smollm2-135m)",
    )
    parser.add_argument(
        "--eval_windows",
        type=int,
        default=PROTOCOL["eval_windows"],
        help=f"evaluation windows per set (default: the protocol's {PROTOCOL['eval_windows']}; fewer "
        "when time is short, recorded in the results)",
    )
    parser.add_argument(
        "--out",
        help="output path without extension (default: benchmarks/results/paper_table, "
        "or paper_table_<family> for a model other than smollm2-135m)",
    )
    parser.add_argument(
        "--collect",
        nargs="+",
        help="build the table from earlier runs instead: results JSON files "
        "or logs of this script (one JSON line per run), e.g. of runs done in parallel",
    )
    args = parser.parse_args()
    PROTOCOL["eval_windows"] = args.eval_windows  # read by protocol_data and written into the results
    if args.worker:
        method, variant, pattern, floor = json.loads(args.worker)
        print(json.dumps(worker(method, pattern, variant, floor, args.model)))
        return
    if args.out is None:
        family = args.model.split("-")[0]
        args.out = str(RESULTS / ("paper_table" if args.model == "smollm2-135m" else f"paper_table_{family}"))
    if args.collect:
        write_outputs(collect(args.collect), args.out, args.model)
        return
    runs = [r for r in RUNS if not args.only or run_key(*r) in args.only]
    rows = []
    for method, pattern, variant in runs:
        print(f"== {run_key(method, pattern, variant)}", file=sys.stderr, flush=True)
        floor = (
            method != "magnitude"
            and args.floor != "none"
            and (args.floor == "all" or (method, pattern, variant) in FLOOR_RUNS)
        )
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--eval_windows",
                str(args.eval_windows),
                "--worker",
                json.dumps([method, variant, pattern, floor]),
            ],
            capture_output=True,
            text=True,
            cwd=str(RESULTS.parent),
        )
        if proc.returncode:
            sys.exit(f"run {run_key(method, pattern, variant)} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        write_outputs(rows, args.out, args.model)  # after every run, so an interrupted benchmark keeps what it measured


def collect(paths: list[str]) -> list[dict]:
    """Runs from results files and logs, in the order of RUNS (the last occurrence of a run wins)."""
    found: dict[str, dict] = {}
    for path in paths:
        with open(path) as handle:
            text = handle.read()
        if text.lstrip().startswith("{") and '"runs"' in text[:2000]:
            runs = json.loads(text)["runs"]
        else:
            runs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        for run in runs:
            found[run_key(run["method"], run["pattern"], run["variant"])] = run
    return [found[run_key(*r)] for r in RUNS if run_key(*r) in found]


def write_outputs(rows: list[dict], out: str, model: str = "smollm2-135m") -> None:
    payload = {
        "model": f"{model} ({NAMED_MODELS[model].description}, dequantised to fp32)",
        "protocol": PROTOCOL,
        "runs": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out + ".json"), json.dumps(payload, indent=2) + "\n", overwrite=True)
    table = markdown(rows)
    atomic_write_text(Path(out + ".md"), table, overwrite=True)
    if any(r["method"] == "dense" for r in rows):
        plot(rows, out + ".png", model)
    print(table, file=sys.stderr)


if __name__ == "__main__":
    main()
