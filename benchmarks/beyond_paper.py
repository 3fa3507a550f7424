"""Beyond the paper on the bundled SmolLM2-135M: OWL layer-wise sparsity, RIA, DSnoT, at 50-70% and N:M.

The paper-table protocol (benchmarks/common.py: fp32 on CPU, 32 calibration windows of 1024 tokens, 40
evaluation windows of WikiText-2 test and of the held-out summaries), one configuration per process, runs
ordered so that the issue's targets are measured first. Writes benchmarks/results/beyond_paper.{json,md,png}
after every run. Rows that this code computes exactly as before (dense, and magnitude / Wanda / SparseGPT where
the new code paths are not involved) can be taken from paper_table.json with ``--import_paper_table``; they are
marked as such, and their times come from that earlier session.

    python benchmarks/beyond_paper.py                      # every run, in priority order (hours on 2 cores)
    python benchmarks/beyond_paper.py --only wanda@0.5 owl+wanda@0.7
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import PROTOCOL, RESULTS

from wanda.utils.io import atomic_write_text

#: label -> PruneSettings fields
METHODS = {
    "magnitude": {"prune_method": "magnitude"},
    "wanda": {"prune_method": "wanda"},
    "sparsegpt": {"prune_method": "sparsegpt"},
    "ria": {"prune_method": "ria"},
    "wanda+dsnot": {"prune_method": "wanda", "dsnot": True},
    "ria+dsnot": {"prune_method": "ria", "dsnot": True},
    "owl+wanda": {"prune_method": "wanda", "sparsity_profile": "owl"},
    "owl+sparsegpt": {"prune_method": "sparsegpt", "sparsity_profile": "owl"},
    "owl+ria+dsnot": {"prune_method": "ria", "dsnot": True, "sparsity_profile": "owl"},
    "admm": {"prune_method": "admm"},
    "alps": {"prune_method": "alps"},
    "owl+alps": {"prune_method": "alps", "sparsity_profile": "owl"},
    "atp+alps": {"prune_method": "alps", "sparsity_profile": "atp"},
}
#: OWL's lambda swept as its paper does (it searches lambda in {0.02, 0.05, 0.08, 0.1, 0.2} per model): run with
#: --only, outside the grid. The value is chosen on the held-out summaries, never on WikiText-2, whose perplexity
#: the 70% target reads.
OWL_SWEEP = {
    f"owl(lambda={lam})+wanda": {"prune_method": "wanda", "sparsity_profile": "owl", "owl_lambda": lam}
    for lam in (0.12, 0.2)
}
#: DSnoT on every layer (--dsnot_skip none) rather than the reference code's attention-only default: outside
#: the grid, at 50% and 2:4, where the targets are.
DSNOT_ALL = {"wanda+dsnot(all layers)": {"prune_method": "wanda", "dsnot": True, "dsnot_skip": "none"}}
#: every label a run key may carry
ALL_METHODS = {**METHODS, **OWL_SWEEP, **DSNOT_ALL}
#: ratios are unstructured; "2:4" and "4:8" are N:M
LEVELS = ("0.5", "0.6", "0.7", "2:4", "4:8")
#: The issue's targets first (50%: Wanda, SparseGPT, RIA, DSnoT; 70%: Wanda, OWL+Wanda; 2:4), then the rest.
#: On a shared, loaded machine a run takes 10-30 minutes, so the most likely candidate for each target comes first.
PRIORITY = [
    "wanda@0.5",
    "ria@0.5",
    "wanda@0.7",
    "owl+wanda@0.7",
    "wanda@2:4",
    "sparsegpt@0.5",
    "dense@-",
    "ria@2:4",
    "ria+dsnot@2:4",
    "wanda+dsnot@0.5",
    "ria+dsnot@0.5",
    "wanda+dsnot@2:4",
    "owl+ria+dsnot@0.7",
    "ria@0.7",
    # then one curve per method over 50-70% (the plot), the cheap magnitude rows among them
    "wanda@0.6",
    "sparsegpt@0.7",
    "sparsegpt@0.6",
    "magnitude@0.6",
    "magnitude@0.7",
    "owl+wanda@0.6",
    "ria@0.6",
    "owl+wanda@0.5",
    # ADMM-Grad and ALPS against SparseGPT (each at its targets first), then the profiles with ALPS
    "alps@0.7",
    "alps@2:4",
    "alps@0.6",
    "alps@0.5",
    "admm@0.7",
    "admm@2:4",
    "sparsegpt@4:8",
    "alps@4:8",
    "owl+alps@0.7",
    "atp+alps@0.7",
]
#: Runs that also measure the two-forward-pass floor (it does not depend on the method).
FLOOR_RUNS = {"wanda@0.5"}


def defined(method: str, level: str) -> bool:
    """OWL and ATP are defined for unstructured sparsity only (wanda.methods.owl, wanda.pruning.profiles)."""
    return not (method.startswith(("owl", "atp")) and ":" in level)


def all_runs() -> list[str]:
    rest = [f"{m}@{l}" for l in LEVELS for m in METHODS if defined(m, l)]
    sweep = [f"{m}@0.7" for m in OWL_SWEEP] + [f"{m}@{l}" for m in DSNOT_ALL for l in ("0.5", "2:4")]
    return PRIORITY + [r for r in rest if r not in PRIORITY] + sweep


def settings_of(key: str) -> dict:
    method, level = key.split("@")
    kw = dict(ALL_METHODS[method])
    if ":" in level:
        kw["sparsity_type"] = level
    else:
        kw["sparsity_ratio"] = float(level)
    return kw


def worker(key: str, floor: bool, sets: list[str] | None = None) -> dict:
    """One configuration in a fresh process: load, (floor), prune, evaluate."""
    import torch
    from common import protocol_data, two_forward_floor

    from wanda import PruneSettings, perplexity, prune
    from wanda.models import load_model
    from wanda.utils.resources import run_peak_rss_mb

    torch.manual_seed(0)
    start = time.perf_counter()
    loaded = load_model("smollm2-135m", dtype=PROTOCOL["dtype"], device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib, evals = protocol_data(tokenizer)
    method, level = key.split("@")
    out: dict = {"key": key, "method": method, "level": level, "source": "this benchmark"}
    if method != "dense":
        out["floor_seconds"] = two_forward_floor(model, calib, PROTOCOL["batch_size"]) if floor else float("nan")
        settings = PruneSettings(**settings_of(key))
        cpu_start = time.process_time()
        report = prune(model, calib, settings, device="cpu", progress=False, batch_size=PROTOCOL["batch_size"])
        # CPU seconds of this process: on a machine shared with other jobs the wall time depends on their load
        out["prune_cpu_seconds"] = time.process_time() - cpu_start
        ratios = [layer.ratio for layer in report.layers]
        out.update(
            settings=settings.to_dict(),
            actual_sparsity=report.actual_sparsity,
            prune_seconds=report.prune_seconds,
            prune_wall_seconds=report.wall_seconds,
            profile_seconds=report.profile_seconds,
            peak_rss_mb_pruning=report.peak_rss_mb,
            layer_ratio_min=min(ratios),
            layer_ratio_max=max(ratios),
            layers=[{"name": l.name, "ratio": l.ratio, "sparsity": l.sparsity} for l in report.layers],
        )
    else:
        out.update(actual_sparsity=0.0)
    out["ppl"] = {
        name: perplexity(model, windows, batch_size=PROTOCOL["batch_size"], progress=False)
        for name, windows in evals.items()
        if not sets or name in sets
    }
    out["peak_rss_mb"] = run_peak_rss_mb()
    out["total_wall_seconds"] = time.perf_counter() - start
    return out


#: Rows measured again here rather than imported: every figure a target compares with. Wanda's activation norms
#: are accumulated in fp64 since paper_table.json was made (exact, so that ranks can split the sum), which moves
#: near-tied mask choices (50%: 53.03 there, 53.37 here), and the targets' SparseGPT and dense references are
#: rerun so that each target compares runs of one code version.
MEASURED_HERE = ("dense@-", "sparsegpt@0.5")


def import_paper_table() -> dict[str, dict]:
    """The magnitude and SparseGPT rows of paper_table.json (same protocol, unchanged code path), keyed as
    here; Wanda's rows and ``MEASURED_HERE`` are measured by this benchmark."""
    path = RESULTS / "paper_table.json"
    if not path.is_file():
        return {}
    found = {}
    for run in json.loads(path.read_text())["runs"]:
        if run["variant"] or run["method"] not in ("dense", "magnitude", "sparsegpt"):
            continue
        level = "-" if run["method"] == "dense" else ("0.5" if run["pattern"] == "unstructured" else run["pattern"])
        key = f"{run['method']}@{level}"
        if key not in MEASURED_HERE:
            found[key] = {**run, "key": key, "level": level, "source": "paper_table.json (earlier session)"}
    return found


def _number(value, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def wanda_wall(rows: dict[str, dict]) -> float:
    """Wanda's pruning wall time at 50% measured here (its cost does not depend on the ratio or N:M)."""
    row = rows.get("wanda@0.5")
    return row["prune_wall_seconds"] if row and row["source"] == "this benchmark" else float("nan")


def wanda_cpu(rows: dict[str, dict]) -> float:
    row = rows.get("wanda@0.5")
    return row.get("prune_cpu_seconds", float("nan")) if row else float("nan")


def markdown(rows: dict[str, dict]) -> str:
    floor = next(
        (
            r["floor_seconds"]
            for r in rows.values()
            if r.get("floor_seconds") == r.get("floor_seconds")
            and r.get("floor_seconds") is not None
            and r["source"] == "this benchmark"
        ),
        float("nan"),
    )
    sets = ["wikitext2", "wiki-summaries"]
    head = (
        ["method", "sparsity"]
        + [f"ppl {s}" for s in sets]
        + [
            "achieved",
            "layer ratios",
            "mask s",
            "prune wall s",
            "wall / floor",
            "wall / Wanda's",
            "prune CPU s",
            "CPU / Wanda's",
            "source",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(
        rows.values(),
        key=lambda r: (
            LEVELS.index(r["level"]) if r["level"] in LEVELS else -1,
            list(ALL_METHODS).index(r["method"]) if r["method"] in ALL_METHODS else -1,
        ),
    )
    for r in ordered:
        level = r["level"] if ":" in r["level"] or r["level"] == "-" else f"{float(r['level']):.0%}"
        cells = [r["method"], level] + [_number(r["ppl"].get(s), ".2f") for s in sets]
        if r["method"] == "dense":
            cells += ["0", "-", "-", "-", "-", "-", "-", "-"]
        else:
            own = r["source"] == "this benchmark"
            spread = f"{r['layer_ratio_min']:.3f}-{r['layer_ratio_max']:.3f}" if "layer_ratio_min" in r else "-"
            cells += [
                f"{r['actual_sparsity']:.4f}",
                spread,
                f"{r['prune_seconds']:.1f}",
                f"{r['prune_wall_seconds']:.1f}",
                _number(r["prune_wall_seconds"] / floor if own else float("nan"), ".2f"),
                _number(r["prune_wall_seconds"] / wanda_wall(rows) if own else float("nan"), ".2f"),
                _number(r.get("prune_cpu_seconds"), ".1f"),
                _number(r.get("prune_cpu_seconds", float("nan")) / wanda_cpu(rows), ".2f"),
            ]
        cells.append("here" if r["source"] == "this benchmark" else "paper_table")
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"\nFloor: two plain forward passes over the calibration set, {floor:.1f} s (measured once, in the Wanda "
        "50% run; it does not depend on the method). `mask s`: mask selection and weight update summed over "
        "layers; `prune wall s`: all of pruning including forward passes and OWL's dense walk; `prune CPU s`: the "
        "CPU time of the pruning process (the machine was shared with other jobs, so wall times carry their "
        "load; CPU time much less so).\n"
    )
    return "\n".join(lines) + "\n" + note


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = ["wikitext2", "wiki-summaries"]
    fig, axes = plt.subplots(1, len(sets), figsize=(13, 5))
    dense = rows.get("dense@-")
    for ax, s in zip(axes, sets):
        # 13 methods: the default 10-colour cycle would repeat, so each method gets its own tab20 colour
        colours = plt.get_cmap("tab20").colors
        for index, method in enumerate(METHODS):
            points = [
                (float(l), rows[f"{method}@{l}"]["ppl"][s])
                for l in ("0.5", "0.6", "0.7")
                if s in rows.get(f"{method}@{l}", {}).get("ppl", {})
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=method, color=colours[index % len(colours)])
        if dense:
            ax.axhline(dense["ppl"][s], color="black", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("unstructured sparsity")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"SmolLM2-135M, {s}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


#: The issue's cost bound: "at most 1.15x Wanda's wall time" (50%), "at Wanda's cost" (2:4, the same bound here).
COST_BOUND = 1.15


def _cost(row: dict, rows: dict[str, dict]) -> tuple[float, float]:
    """(wall, CPU) time of pruning over Wanda's at 50%, both measured in this benchmark."""
    base = rows.get("wanda@0.5", {})
    if row.get("source") != "this benchmark" or base.get("source") != "this benchmark":
        return float("nan"), float("nan")
    return (
        row["prune_wall_seconds"] / base["prune_wall_seconds"],
        row.get("prune_cpu_seconds", float("nan")) / base.get("prune_cpu_seconds", float("nan")),
    )


def _ppl(rows: dict[str, dict], key: str) -> float:
    return rows.get(key, {}).get("ppl", {}).get("wikitext2", float("nan"))


def _cheap_best(rows: dict[str, dict], level: str, exclude: tuple[str, ...]) -> tuple[str, float, float, float] | None:
    """The lowest WikiText-2 perplexity at ``level`` among this benchmark's runs within the cost bound (both
    wall and CPU time ratios, so that another job's load cannot make a slow method look cheap)."""
    found = []
    for key, row in rows.items():
        if row["level"] != level or row["method"] in exclude:
            continue
        wall, cpu = _cost(row, rows)
        if wall <= COST_BOUND and cpu <= COST_BOUND:
            found.append((_ppl(rows, key), key, wall, cpu))
    if not found:
        return None
    ppl, key, wall, cpu = min(found)
    return key, ppl, wall, cpu


def targets(rows: dict[str, dict]) -> list[str]:
    """The issue's three targets on WikiText-2, each met, missed, or not yet measured, with the figures."""
    lines = []
    sparsegpt, best = _ppl(rows, "sparsegpt@0.5"), _cheap_best(rows, "0.5", ("sparsegpt",))
    if best is None or sparsegpt != sparsegpt:
        lines.append("- 50% unstructured, a method within 1.15x Wanda's time at or below SparseGPT: not measured yet")
    else:
        key, ppl, wall, cpu = best
        verdict = "**met**" if ppl <= sparsegpt else "**missed**"
        lines.append(
            f"- 50% unstructured, a method within {COST_BOUND}x Wanda's time at or below SparseGPT's "
            f"{sparsegpt:.2f}: {verdict}; the best such method is {key} at {ppl:.2f} ({wall:.2f}x Wanda's "
            f"wall time, {cpu:.2f}x its CPU time)"
        )
    wanda70, owl70 = _ppl(rows, "wanda@0.7"), _ppl(rows, "owl+wanda@0.7")
    if owl70 == owl70 and wanda70 == wanda70:
        verdict = "**met**" if owl70 <= 0.6 * wanda70 else "**missed**"
        lines.append(
            f"- 70% unstructured, OWL+Wanda at most 0.6x Wanda: {verdict}; {owl70:.1f} against "
            f"{wanda70:.1f} ({owl70 / wanda70:.2f}x)"
        )
    else:
        lines.append("- 70% unstructured, OWL+Wanda at most 0.6x Wanda: not measured yet")
    swept = [
        (rows[f"{m}@0.7"]["ppl"]["wiki-summaries"], m)
        for m in ("owl+wanda", *OWL_SWEEP)
        if "wiki-summaries" in rows.get(f"{m}@0.7", {}).get("ppl", {})
    ]
    if len(swept) > 1 and wanda70 == wanda70:
        chosen = min(swept)[1]
        tuned = _ppl(rows, f"{chosen}@0.7")
        verdict = "**met**" if tuned <= 0.6 * wanda70 else "**missed**"
        lines.append(
            f"- the same with OWL's lambda chosen on the held-out summaries (lowest summaries perplexity "
            f"among {', '.join(m for _, m in sorted(swept, key=lambda t: t[1]))}): {chosen}, {verdict}; "
            f"{tuned:.1f} against {wanda70:.1f} ({tuned / wanda70:.2f}x)"
            + (
                ""
                if any(m == "owl+wanda" for _, m in swept)
                else "; the default lambda's row has no summaries figure, so it is not among them"
            )
        )
    wanda24, best = _ppl(rows, "wanda@2:4"), _cheap_best(rows, "2:4", ("sparsegpt", "wanda"))
    if best is None or wanda24 != wanda24 or rows.get("wanda@2:4", {}).get("source") != "this benchmark":
        lines.append("- 2:4, a method at Wanda's cost at most 0.8x Wanda: not measured yet")
    else:
        key, ppl, wall, cpu = best
        verdict = "**met**" if ppl <= 0.8 * wanda24 else "**missed**"
        lines.append(
            f"- 2:4, a method at Wanda's cost (within {COST_BOUND}x its time) at most 0.8x Wanda's "
            f"{wanda24:.2f} (= {0.8 * wanda24:.2f}): {verdict}; the best such method is {key} at {ppl:.2f} "
            f"({ppl / wanda24:.2f}x; {wall:.2f}x Wanda's wall time, {cpu:.2f}x its CPU time)"
        )
    return lines


#: The ADMM/ALPS targets: WikiText-2 perplexity at most this fraction of SparseGPT's at the same level, at most
#: ``RECONSTRUCTION_COST`` times SparseGPT's prune wall time.
RECONSTRUCTION_TARGETS = {"2:4": 0.85, "0.7": 0.70, "0.6": 0.90, "0.5": 0.97}
RECONSTRUCTION_COST = 2.5
#: Levels compared with SparseGPT in the same way but without a perplexity target (the issue sets none at 4:8).
RECONSTRUCTION_UNTARGETED = ("4:8",)


def reconstruction_targets(rows: dict[str, dict]) -> list[str]:
    """ADMM-Grad, ALPS and the profiles with ALPS against SparseGPT at the same level, each met or missed."""
    lines = []
    levels = {**RECONSTRUCTION_TARGETS, **dict.fromkeys(RECONSTRUCTION_UNTARGETED)}
    for level, bound in levels.items():
        base = rows.get(f"sparsegpt@{level}")
        for method in ("alps", "admm", "owl+alps", "atp+alps"):
            row = rows.get(f"{method}@{level}")
            if not defined(method, level):
                continue
            asked = "no perplexity target" if bound is None else f"perplexity at most {bound}x SparseGPT's"
            head = f"- {method} at {level}: {asked}, wall time at most {RECONSTRUCTION_COST}x"
            if row is None or base is None:
                lines.append(f"{head}: not measured yet")
                continue
            ratio = _ppl(rows, row["key"]) / _ppl(rows, base["key"])
            wall = row["prune_wall_seconds"] / base["prune_wall_seconds"]
            cpu = row.get("prune_cpu_seconds", float("nan")) / base.get("prune_cpu_seconds", float("nan"))
            verdict = "" if bound is None else ("**met**, " if ratio <= bound else "**missed**, ")
            cost = "**met**" if wall <= RECONSTRUCTION_COST else "**missed**"
            origin = "" if base["source"] == "this benchmark" else " (SparseGPT's row from paper_table.json)"
            lines.append(
                f"{head}: perplexity {verdict}{_ppl(rows, row['key']):.2f} against {_ppl(rows, base['key']):.2f} "
                f"({ratio:.2f}x); wall time {cost}, {wall:.2f}x ({_number(cpu, '.2f')}x CPU time){origin}"
            )
    return lines


def write_outputs(rows: dict[str, dict], out: str) -> None:
    payload = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32)",
        "protocol": PROTOCOL,
        "not_defined": [f"{m}@{l}" for l in LEVELS for m in METHODS if not defined(m, l)],
        "runs": list(rows.values()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out + ".json"), json.dumps(payload, indent=2) + "\n", overwrite=True)
    text = (
        markdown(rows)
        + "\nTargets (WikiText-2 perplexity, from the rows above):\n\n"
        + "\n".join(targets(rows))
        + "\n\nADMM-Grad and ALPS against SparseGPT at the same level (WikiText-2 perplexity; prune wall time):\n\n"
        + "\n".join(reconstruction_targets(rows))
        + "\n"
    )
    atomic_write_text(Path(out + ".md"), text, overwrite=True)
    plot(rows, Path(out + ".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run keys such as wanda@0.5, owl+wanda@0.7, ria+dsnot@2:4")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--import_paper_table",
        action="store_true",
        help="take dense and plain magnitude/Wanda/SparseGPT rows from paper_table.json unless rerun",
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output JSON and skip them")
    parser.add_argument("--out", default=str(RESULTS / "beyond_paper"), help="output path without extension")
    parser.add_argument(
        "--eval_sets",
        nargs="*",
        help="evaluate only these sets (e.g. wikitext2, which the targets "
        "use: half the evaluation time on a loaded machine); default both",
    )
    args = parser.parse_args()
    if args.worker:
        key, floor, sets = json.loads(args.worker)
        print(json.dumps(worker(key, floor, sets)))
        return
    rows: dict[str, dict] = import_paper_table() if args.import_paper_table else {}
    if args.resume and Path(args.out + ".json").is_file():
        # the runs measured here; imported rows come from import_paper_table as it reads now
        rows.update(
            {
                r["key"]: r
                for r in json.loads(Path(args.out + ".json").read_text())["runs"]
                if r["source"] == "this benchmark"
            }
        )
    todo = [
        k
        for k in all_runs()
        if (not args.only or k in args.only)
        and not (args.resume and rows.get(k, {}).get("source") == "this benchmark")
        and not (args.import_paper_table and k in rows and not args.only)
    ]
    for key in todo:
        print(f"== {key}", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps([key, key in FLOOR_RUNS, args.eval_sets])],
            capture_output=True,
            text=True,
            cwd=str(RESULTS.parent),
        )
        if proc.returncode:
            print(f"run {key} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        rows[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({k: v for k, v in rows[key].items() if k != "layers"}), file=sys.stderr, flush=True)
        write_outputs(rows, args.out)  # after every run, so an interrupted benchmark keeps what it measured


if __name__ == "__main__":
    main()
