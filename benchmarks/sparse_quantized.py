"""Sparse and quantized together on the bundled SmolLM2-135M: dense, SparseGPT 50% and 2:4, each in fp32 and on
llama.cpp's Q8_0 and Q4_0 grids, by round-to-nearest and by GPTQ (inside SparseGPT's own column loop; plain GPTQ,
``--prune_method none``, for the dense model).

The quantized rows use the GGUF grids (blocks of 32, one fp16 scale each) so that every quantized row is a file
llama.cpp loads: the error GPTQ minimises is the error of that file, and round-to-nearest is gguf's own
``quants.quantize``. Each row reports WikiText-2 and held-out summaries perplexity and the size of the file a
user would ship (GGUF for the quantized rows, the ``compressed`` safetensors folder for a sparse fp32 model,
the dense folder for the dense one). For the GPTQ rows of the sparse models, llama.cpp (``llama-cpp-python``,
built from its PyPI source) computes the perplexity of the very file on the same WikiText-2 windows, fed the
same token ids.

Protocol: fp32 on CPU, 32 calibration windows of 1024 tokens from the wiki-summaries calibration part (seed 0),
as benchmarks/common.py; 16 evaluation windows of 1024 tokens per set (the paper table's 40 would take the 15
rows past a session on 2 cores; the comparisons here are between rows on the same windows). One worker process
per group of rows; results are written after every worker, so an interrupted run resumes (``--resume``).

    flock /tmp/wanda-heavy.lock python benchmarks/sparse_quantized.py            # every pending worker
    flock /tmp/wanda-heavy.lock python benchmarks/sparse_quantized.py --only 0.5:gptq-Q4_0
    flock /tmp/wanda-heavy.lock python benchmarks/sparse_quantized.py --llama_cpp   # rows run before it was built
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PROTOCOL, RESULTS, protocol_data

from wanda.utils.io import atomic_write_text

EVAL_WINDOWS = 16
PROTO = {**PROTOCOL, "eval_windows": EVAL_WINDOWS}
SPARSITIES = ("dense", "0.5", "2:4")
GRIDS = ("Q8_0", "Q4_0")
BITS = {"Q8_0": 8, "Q4_0": 4}
#: workers in priority order: the targets (50% fp32, round-to-nearest and GPTQ at 4 bits) first
WORKERS = [
    "0.5:fp32+rtn",
    "0.5:gptq-Q4_0",
    "0.5:gptq-Q8_0",
    "dense:fp32+rtn",
    "2:4:fp32+rtn",
    "2:4:gptq-Q4_0",
    "dense:gptq-Q4_0",
    "2:4:gptq-Q8_0",
    "dense:gptq-Q8_0",
    "0.5:sink-gptq-Q4_0",
    "0.5:sink-fp32+rtn",
    "dense:sink-gptq-Q4_0",
    "2:4:sink-gptq-Q4_0",
    "0.5:sink-gptq-Q8_0",
    "2:4:sink-fp32+rtn",
]
#: ``--sink_weight`` of the "+sink" rows: each calibration window's first token counted 64 times in the Hessian
SINK_WEIGHT = 64.0
#: scratch folder for the files whose size is measured and the GGUF files llama.cpp reads (outside the checkout)
OUT = Path(os.environ.get("WANDA_BENCH_SCRATCH", tempfile.gettempdir())) / "wanda-sparse-quantized"


def _prune_settings(sparsity: str, quantized: bool, sink_weight: float = 1.0):
    from wanda import PruneSettings

    if sparsity == "dense":
        return PruneSettings(prune_method="none", sink_weight=sink_weight) if quantized else None
    if sparsity == "2:4":
        return PruneSettings(prune_method="sparsegpt", sparsity_type="2:4", sink_weight=sink_weight)
    return PruneSettings(prune_method="sparsegpt", sparsity_ratio=float(sparsity), sink_weight=sink_weight)


def _block_matrices(model) -> list:
    from wanda.models import find_decoder_layout

    layout = find_decoder_layout(model)
    return [m.weight for i in range(len(layout.blocks)) for m in layout.matrices(i).prunable.values()]


def _sparsity(model) -> float:
    weights = _block_matrices(model)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _file_bytes(model, tokenizer, save_format: str, gguf_type: str | None, keep: Path | None = None) -> int:
    from wanda.export import save_model
    from wanda.export.save import folder_bytes

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        target = Path(tmp) / "model"
        save_model(model, tokenizer, target, save_format, gguf_type=gguf_type)
        size = folder_bytes(target)
        if keep is not None:
            (target / "model.gguf").replace(keep)
    return size


def _perplexities(model, evals: dict) -> dict[str, float]:
    from wanda import perplexity

    return {name: perplexity(model, w, batch_size=PROTO["batch_size"], progress=False) for name, w in evals.items()}


def _llama_cpp_perplexity(path: Path, windows) -> dict:
    """llama.cpp's perplexity of the GGUF file at ``path`` on ``windows`` (the same token ids as ours): the mean
    next-token NLL over each window's positions 1..n-1, every window evaluated from an empty context."""
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError as exc:
        return {"error": f"llama-cpp-python not importable: {exc}"}
    start = time.perf_counter()
    llm = Llama(
        model_path=str(path),
        n_ctx=windows.shape[1],
        n_batch=windows.shape[1],
        n_threads=os.cpu_count() or 1,
        logits_all=True,
        verbose=False,
    )
    total, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        total += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
        count += len(row) - 1
    return {"ppl": math.exp(total / count), "seconds": time.perf_counter() - start}


def worker(key: str) -> list[dict]:
    import torch

    from wanda import prune
    from wanda.models import load_model
    from wanda.quant import GGUFGrid, QuantSettings, rtn_quantize

    sparsity, job = key.rsplit(":", 1)
    sink = job.startswith("sink-")
    job, tag = job.removeprefix("sink-"), "+sink" if sink else ""
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", dtype=PROTO["dtype"], device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib, evals = protocol_data(tokenizer, PROTO)
    rows = []

    def row(label: str, **extra) -> dict:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        ppl = _perplexities(model, evals)
        return {
            "row": label,
            "sparsity": sparsity,
            "actual_sparsity": _sparsity(model),
            "ppl": ppl,
            "eval_wall_seconds": time.perf_counter() - wall0,
            "eval_cpu_seconds": time.process_time() - cpu0,
            **extra,
        }

    quantized = job.startswith("gptq-")
    settings = _prune_settings(sparsity, quantized, SINK_WEIGHT if sink else 1.0)
    prune_info = {}
    if settings is not None:
        grid_name = job.split("-", 1)[1] if quantized else None
        quant = QuantSettings(wbits=BITS[grid_name], groupsize=32, sym=True, gguf_type=grid_name) if quantized else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        report = prune(
            model, calib, settings, device="cpu", progress=False, batch_size=PROTO["batch_size"], quant=quant
        )
        prune_info = {
            "prune_wall_seconds": time.perf_counter() - wall0,
            "prune_cpu_seconds": time.process_time() - cpu0,
            "prune_seconds": report.prune_seconds,
        }
    if quantized:
        grid_name = job.split("-", 1)[1]
        keep = OUT / f"{sparsity.replace(':', 'of')}-gptq-{grid_name}{tag}.gguf"
        size = _file_bytes(model, tokenizer, "gguf", grid_name, keep=keep)
        result = row(
            f"{sparsity}@{grid_name}-gptq{tag}", grid=grid_name, quantizer="gptq", file_bytes=size, **prune_info
        )
        if sparsity != "dense" and "wikitext2" in evals:
            result["llama_cpp"] = _llama_cpp_perplexity(keep, evals["wikitext2"])
            result["gguf_file"] = str(keep)
        if "ppl" in result.get("llama_cpp", {}) or sparsity == "dense":
            keep.unlink()  # kept otherwise, for --llama_cpp once llama-cpp-python is installed
        return [result]
    fmt = "dense" if sparsity == "dense" else "compressed"
    rows.append(
        row(
            f"{sparsity}@fp32{tag}",
            grid="fp32",
            quantizer="-",
            file_bytes=_file_bytes(model, tokenizer, fmt, None),
            **prune_info,
        )
    )
    weights = _block_matrices(model)  # views into the model: writing them writes the model
    originals = [w.detach().clone() for w in weights]
    for grid_name in GRIDS:
        grid = GGUFGrid(grid_name)
        with torch.no_grad():
            for w, base in zip(weights, originals):
                w.copy_(rtn_quantize(base, grid, mask=base == 0))
        size = _file_bytes(model, tokenizer, "gguf", grid_name)
        rows.append(row(f"{sparsity}@{grid_name}-rtn{tag}", grid=grid_name, quantizer="rtn", file_bytes=size))
    return rows


def llama_cpp_pending(data: dict) -> None:
    """llama.cpp's perplexity for the rows whose GGUF file was kept because llama-cpp-python was missing."""
    from wanda.models import load_model

    pending = [r for r in data["rows"].values() if r.get("gguf_file") and "ppl" not in r.get("llama_cpp", {})]
    if not pending:
        return
    _, evals = protocol_data(load_model("smollm2-135m", dtype=PROTO["dtype"], device="cpu").tokenizer, PROTO)
    for r in pending:
        r["llama_cpp"] = _llama_cpp_perplexity(Path(r["gguf_file"]), evals["wikitext2"])
        if "ppl" in r["llama_cpp"]:
            Path(r["gguf_file"]).unlink()


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"protocol": PROTO, "rows": {}, "workers": []}


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def write_tables(data: dict) -> None:
    rows = data["rows"]
    lines = [
        "# Sparse and quantized together: SmolLM2-135M",
        "",
        f"Protocol: fp32 CPU, {PROTO['nsamples']} calibration windows of {PROTO['seqlen']} tokens (wiki-summaries, "
        f"seed {PROTO['seed']}), {EVAL_WINDOWS} evaluation windows per set. SparseGPT at 50% and 2:4; GPTQ in "
        "SparseGPT's column loop (plain GPTQ for dense); RTN = gguf's round-to-nearest. Q8_0/Q4_0: llama.cpp's "
        "block formats (32 weights, fp16 scale). Size: the file a user ships (GGUF; compressed or dense "
        'safetensors for fp32). "+sink": the same with --sink_weight '
        f"{SINK_WEIGHT:g} (each calibration window's first token counted {SINK_WEIGHT:g} times in the Hessian, "
        "for SparseGPT's mask as for GPTQ).",
        "",
        "| row | sparsity | WikiText-2 ppl | summaries ppl | llama.cpp WikiText-2 ppl | file MB | prune wall / CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for sparsity in SPARSITIES:
        plain = [f"{sparsity}@fp32"] + [f"{sparsity}@{g}-{q}" for g in GRIDS for q in ("rtn", "gptq")]
        for label in plain + [f"{label}+sink" for label in plain]:
            r = rows.get(label)
            if r is None:
                continue
            cpp = r.get("llama_cpp", {})
            cpp_text = _fmt(cpp.get("ppl"))
            if cpp.get("ppl") is not None:
                cpp_text += f" ({cpp['ppl'] / r['ppl']['wikitext2'] - 1:+.2%})"
            elif cpp.get("error"):
                cpp_text = "not run"
            timing = (
                f"{r['prune_wall_seconds']:.0f} / {r['prune_cpu_seconds']:.0f}" if "prune_wall_seconds" in r else "-"
            )
            lines.append(
                f"| {label} | {r['actual_sparsity']:.4f} | {_fmt(r['ppl'].get('wikitext2'))} | "
                f"{_fmt(r['ppl'].get('wiki-summaries'))} | {cpp_text} | {r['file_bytes'] / 1e6:.1f} | {timing} |"
            )
    lines += ["", *targets(rows), ""]
    atomic_write_text(RESULTS / "sparse_quantized.json", json.dumps(data, indent=2) + "\n", overwrite=True)
    atomic_write_text(RESULTS / "sparse_quantized.md", "\n".join(lines), overwrite=True)
    plot(rows)


def targets(rows: dict) -> list[str]:
    """Each target met or missed, with its figure (WikiText-2; "not measured" while a row is missing)."""

    def ppl(label):
        return rows.get(label, {}).get("ppl", {}).get("wikitext2")

    out = ["## Targets (WikiText-2 perplexity)", ""]
    for label, a, b, limit in (
        ("50% + 4-bit joint GPTQ <= 1.10x 50% fp32", "0.5@Q4_0-gptq", "0.5@fp32", 1.10),
        ("50% + 4-bit joint GPTQ <= 0.9x 50% + 4-bit round-to-nearest", "0.5@Q4_0-gptq", "0.5@Q4_0-rtn", 0.9),
        ("with the sink weight: <= 1.10x 50% fp32 (same mask rule)", "0.5@Q4_0-gptq+sink", "0.5@fp32+sink", 1.10),
        ("with the sink weight: <= 1.10x 50% fp32 (plain SparseGPT)", "0.5@Q4_0-gptq+sink", "0.5@fp32", 1.10),
        (
            "with the sink weight: <= 0.9x round-to-nearest (same mask rule)",
            "0.5@Q4_0-gptq+sink",
            "0.5@Q4_0-rtn+sink",
            0.9,
        ),
        (
            "with the sink weight: <= 0.9x round-to-nearest of plain SparseGPT",
            "0.5@Q4_0-gptq+sink",
            "0.5@Q4_0-rtn",
            0.9,
        ),
    ):
        if ppl(a) is None or ppl(b) is None:
            out.append(f"- {label}: not measured")
            continue
        ratio = ppl(a) / ppl(b)
        out.append(
            f"- {label}: **{'met' if ratio <= limit else 'missed'}**, {ratio:.3f}x ({ppl(a):.2f} vs {ppl(b):.2f})"
        )
    for label in [f"{s}@{g}-gptq{t}" for t in ("", "+sink") for s in ("0.5", "2:4") for g in GRIDS]:
        cpp = rows.get(label, {}).get("llama_cpp", {}).get("ppl")
        if cpp is not None and ppl(label) is not None:
            gap = abs(cpp / ppl(label) - 1)
            out.append(f"- llama.cpp within 1% of ours on {label}: **{'met' if gap <= 0.01 else 'missed'}**, {gap:.2%}")
    return out


def plot(rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = ["fp32", "Q8_0-rtn", "Q8_0-gptq", "Q4_0-rtn", "Q4_0-gptq", "Q4_0-gptq+sink"]
    width = 0.25
    for k, sparsity in enumerate(SPARSITIES):
        values = [rows.get(f"{sparsity}@{label}", {}).get("ppl", {}).get("wikitext2", math.nan) for label in labels]
        ax.bar([i + (k - 1) * width for i in range(len(labels))], values, width, label=sparsity)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M: SparseGPT sparsity x GGUF quantization")
    ax.legend(title="sparsity")
    fig.tight_layout()
    fig.savefig(RESULTS / "sparse_quantized.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=WORKERS, help="run these workers (default: every pending one)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the results JSON")
    parser.add_argument(
        "--llama_cpp", action="store_true", help="only run llama.cpp on the kept GGUF files of rows that lack it"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    path = RESULTS / "sparse_quantized.json"
    if args.llama_cpp:
        data = _load(path)
        llama_cpp_pending(data)
        write_tables(data)
        return
    data = _load(path) if args.resume else {"protocol": PROTO, "rows": {}, "workers": []}
    for key in args.only or WORKERS:
        if key in data["workers"]:
            continue
        print(f"[sparse_quantized] {key}", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--worker", key], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            continue
        for r in json.loads(done.stdout.strip().splitlines()[-1]):
            data["rows"][r["row"]] = r
        data["workers"].append(key)
        write_tables(data)
    write_tables(data)


if __name__ == "__main__":
    main()
