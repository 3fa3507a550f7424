"""Sparse-kernel CPU inference against dense torch: per matrix shape and for a whole 1.1B model.

Decoding reads every weight once per token, so its speed is bounded by memory read bandwidth. Each row
therefore measures the machine's read bandwidth in the same process (a torch sum over a 1 GiB buffer, far
beyond any cache; best of 5), the bytes a token reads, and the row's physical limit (bandwidth / bytes per
token) beside the achieved tokens/s, with CPU time beside wall time (CPU / wall ~ threads kept busy).

Rows, each measured in its own process (run it under the shared lock, one row per call):

- ``matrix-OUTxIN-PCT``: the LLaMA-7B shapes 4096x4096, 11008x4096 and 4096x11008, random fp32 weights pruned
  per output row by magnitude to PCT%, as ``nn.Linear`` with zeros and as ``SparseLinear``: decode (1 token)
  and prefill (128 tokens).
- ``build-1.1b``: writes the random 1.1B LLaMA-shaped model of ``streaming_memory.py`` (TinyLlama proportions)
  pruned per row by magnitude to 50% and 70% (embeddings and LM head dense), as dense-with-zeros folders.
- ``model-1.1b-dense``, ``model-1.1b-PCT-sparse``: load a folder (dense, or ``sparse_kernel=True``), decode
  greedily at batch 1 after a random prompt and prefill a longer one; peak RSS while generating (ru_maxrss
  after a reset of the high-water mark). The dense row is measured once, on the 50% folder: a dense layer
  reads every stored zero, so its speed does not depend on the sparsity.

    flock /tmp/wanda-heavy.lock python benchmarks/cpu_inference.py --only matrix-4096x4096-50 --resume
    python benchmarks/cpu_inference.py --rows          # the keys, in order
    python benchmarks/cpu_inference.py --markdown      # rewrite the MD and PNG from the JSON

Random weights suffice for speed: the kernel's work depends on the shape and the number of non-zeros, not on
their values; magnitude per row gives every row the same count, as Wanda's per-output comparison group does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS
from streaming_memory import LARGE, _word_tokenizer

from wanda.utils.io import atomic_write_text

OUT = RESULTS / "cpu_inference"
SCRATCH = Path(os.environ.get("WANDA_BENCH_SCRATCH", "/tmp/wanda-cpu-inference"))
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
SPARSITIES = (50, 70)
PREFILL_TOKENS = 128
MODEL = {"prompt_tokens": 32, "new_tokens": 32, "prefill_tokens": 128}
TARGETS = {
    "matrix_decode_50": 1.6,
    "model_decode_50": 1.4,
    "model_decode_70": 1.9,
    "prefill": 0.9,
    "model_generate_rss_50": 0.65,
}
ROWS = (
    [f"matrix-{o}x{i}-{p}" for p in SPARSITIES for o, i in SHAPES]
    + ["build-1.1b", "model-1.1b-dense"]
    + [f"model-1.1b-{p}-sparse" for p in SPARSITIES]
    + ["build-smollm2-50", "model-smollm2-dense", "model-smollm2-50-sparse"]
)


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a torch sum over a buffer far larger than the caches (best of ``repeats``)."""
    import torch

    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    nbytes = buf.numel() * 4
    del buf
    return nbytes / best / 1e9


def prune_rows(weight, pct: int):
    """Zero the ``pct``% smallest-magnitude weights of each row (exactly that many per row)."""
    k = weight.shape[1] * pct // 100
    if k == 0:
        return weight
    thr = weight.abs().kthvalue(k, dim=1, keepdim=True).values
    weight[weight.abs() <= thr] = 0
    return weight


def _timed(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median wall seconds, CPU seconds / wall seconds over the timed calls) of ``fn()``."""
    for _ in range(warmup):
        fn()
    walls = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - begin)
    cpu = time.process_time() - cpu0
    return statistics.median(walls), cpu / (time.perf_counter() - wall0)


def matrix_row(key: str) -> dict:
    import torch
    from torch import nn

    from wanda.eval.cpu_speed import layer_bytes
    from wanda.kernels import SparseLinear, get_kernel_path

    _, shape, pct = key.split("-")
    out_f, in_f = (int(v) for v in shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    weight = prune_rows(torch.randn(out_f, in_f, generator=gen) * 0.02, int(pct))
    dense = nn.Linear(in_f, out_f, bias=False)
    dense.weight = nn.Parameter(weight, requires_grad=False)
    sparse = SparseLinear.from_dense(dense)
    bandwidth = read_bandwidth_gbs()
    row = {
        "kind": "matrix",
        "shape": [out_f, in_f],
        "sparsity": 1 - sparse.nnz / (out_f * in_f),
        "dtype": "float32",
        "kernel_path": get_kernel_path(),
        "threads": torch.get_num_threads(),
        "bandwidth_gbs": bandwidth,
        "dense_bytes": layer_bytes(dense),
        "sparse_bytes": layer_bytes(sparse),
    }
    with torch.inference_mode():
        for phase, tokens, iters in (("decode", 1, 40), ("prefill", PREFILL_TOKENS, 5)):
            x = torch.randn(tokens, in_f, generator=gen)
            for variant, layer in (("dense", dense), ("sparse", sparse)):
                seconds, busy = _timed(lambda: layer(x), 3 if tokens == 1 else 1, iters)
                row[f"{variant}_{phase}_tokens_per_s"] = tokens / seconds
                row[f"{variant}_{phase}_cpu_per_wall"] = busy
            row[f"{phase}_speedup"] = row[f"sparse_{phase}_tokens_per_s"] / row[f"dense_{phase}_tokens_per_s"]
            torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4 * float(dense(x).abs().max()))
    for variant in ("dense", "sparse"):
        limit = bandwidth * 1e9 / row[f"{variant}_bytes"]
        row[f"{variant}_decode_limit_tokens_per_s"] = limit
        row[f"{variant}_decode_fraction_of_limit"] = row[f"{variant}_decode_tokens_per_s"] / limit
    return row


def _folder(pct: int, model: str = "1.1b") -> Path:
    return SCRATCH / (f"llama1.1b-mag{pct}" if model == "1.1b" else f"smollm2-wanda{pct}")


def build_smollm2() -> dict:
    """SmolLM2-135M (the bundled model) pruned by Wanda to 50% (4 calibration windows of 128 tokens, seed 0),
    saved with ``--save_format compressed``."""
    from wanda.data import calibration_windows, resolve_source
    from wanda.models import load_model
    from wanda.models.compressed import save_compressed
    from wanda.pruning.prune import prune
    from wanda.pruning.prune_settings import PruneSettings

    start = time.perf_counter()
    folder = _folder(50, "smollm2")
    if not (folder / "wanda_compressed.json").is_file():
        loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
        calib = calibration_windows(resolve_source("wiki-summaries", "calibration"), loaded.tokenizer, 4, 128, 0)
        prune(loaded.model, calib, PruneSettings(prune_method="wanda", sparsity_ratio=0.5), progress=False)
        tmp = folder.with_name(folder.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        save_compressed(loaded.model, tmp)
        loaded.tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    return {"kind": "build", "folders": {"50": str(folder)}, "seconds": time.perf_counter() - start}


def build_models() -> dict:
    """The random 1.1B model pruned to 50% and 70% (per row, magnitude), same base weights, written tensor by
    tensor (the full model never in memory)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from wanda.export.shards import write_shards

    start = time.perf_counter()
    config = LlamaConfig(**LARGE, tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    specs = [(name, tuple(p.shape), torch.float32) for name, p in skeleton.named_parameters()]
    shapes = {n: s for n, s, _ in specs}
    out = {}
    for pct in SPARSITIES:
        folder = _folder(pct)
        if (folder / "config.json").is_file():
            out[pct] = str(folder)
            continue

        def make(name: str, pct: int = pct) -> torch.Tensor:
            gen = torch.Generator().manual_seed(sum(map(ord, name)) * 7919)  # the same base weights per name
            if name.endswith("norm.weight"):
                return torch.ones(shapes[name])
            w = torch.randn(shapes[name], generator=gen) * 0.02
            if name.startswith("model.layers.") and name.endswith("proj.weight"):
                w = prune_rows(w, pct)
            return w

        tmp = folder.with_name(folder.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        write_shards(tmp, specs, make, "2GB")
        config.save_pretrained(tmp)
        _word_tokenizer().save_pretrained(tmp)
        tmp.rename(folder)
        out[pct] = str(folder)
    return {"kind": "build", "folders": out, "seconds": time.perf_counter() - start}


def model_row(key: str) -> dict:
    import torch

    from wanda.eval.cpu_speed import _current_rss_mb, bytes_per_token
    from wanda.eval.generation import timed_generate
    from wanda.kernels import SparseLinear, get_kernel_path
    from wanda.models import load_model
    from wanda.utils.resources import peak_rss_mb, reset_peak_rss

    parts = key.split("-")
    sparse = parts[-1] == "sparse"
    pct = int(parts[2]) if sparse else SPARSITIES[0]
    folder = _folder(pct, parts[1])
    if not (folder / "config.json").is_file():
        raise SystemExit(f"wanda: error: {folder} is missing; run the build-{parts[1]} row first")
    bandwidth = read_bandwidth_gbs()
    rss_before = _current_rss_mb()
    start = time.perf_counter()
    model = load_model(str(folder), None, "float32", "cpu", sparse_kernel=sparse).model
    load_s = time.perf_counter() - start
    load_peak = peak_rss_mb()
    resettable = reset_peak_rss()
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, MODEL["prompt_tokens"]), generator=gen)
    timed_generate(model, prompt[:, :8], 3, stop_at_eos=False)  # warm-up: kernels built, buffers allocated
    cpu0 = time.process_time()
    decode = timed_generate(model, prompt, MODEL["new_tokens"], stop_at_eos=False)
    cpu_per_wall = (time.process_time() - cpu0) / (decode.prefill_s + decode.decode_s)
    long = torch.randint(0, vocab, (1, MODEL["prefill_tokens"]), generator=gen)
    prefill = timed_generate(model, long, 1, stop_at_eos=False)
    nbytes = bytes_per_token(model)
    limit = bandwidth * 1e9 / nbytes
    return {
        "kind": "model",
        "variant": "sparse" if sparse else "dense",
        "sparsity_pct": pct,
        "kernel_path": get_kernel_path() if sparse else "dense torch",
        "threads": torch.get_num_threads(),
        "bandwidth_gbs": bandwidth,
        "sparse_linears": sum(isinstance(m, SparseLinear) for m in model.modules()),
        "bytes_per_token": nbytes,
        "decode_limit_tokens_per_s": limit,
        "load_s": load_s,
        "rss_before_load_mb": rss_before,
        "load_peak_rss_mb": load_peak,
        "generate_peak_rss_mb": peak_rss_mb() if resettable else None,
        "decode_tokens_per_s": decode.decode_tokens_per_s,
        "decode_fraction_of_limit": decode.decode_tokens_per_s / limit,
        "generate_cpu_per_wall": cpu_per_wall,
        "prefill_tokens_per_s": prefill.prefill_tokens_per_s,
        "tokens": decode.tokens,
        **MODEL,
    }


# ---- results -----------------------------------------------------------------------------------------------------


def load_results() -> dict:
    path = OUT.with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else {"rows": {}}


def _verdict(value: float | None, target: float, at_most: bool = False) -> str:
    if value is None:
        return "not measured"
    ok = value <= target if at_most else value >= target
    return f"{'met' if ok else 'MISSED'} ({value:.2f}x, target {'<=' if at_most else '>='} {target}x)"


def markdown(result: dict) -> str:
    rows = result["rows"]
    machine = result.get("machine", {})
    lines = [
        "# Sparse kernel vs dense torch on the CPU",
        "",
        f"CPU: {machine.get('cpu', '?')} ({machine.get('flags', '?')}; no AVX-512 reported, so the AVX2 path ran), "
        f"{machine.get('threads', '?')} threads, on 2 cores shared with other jobs (figures are noisy). fp32. "
        "Each row in its own process, with the read bandwidth (torch sum over 1 GiB, best of 5) measured in "
        "that process. Limit = bandwidth / bytes per token; 'of limit' = achieved / limit. CPU/wall = process "
        "CPU seconds per wall second while timed.",
        "",
        "## Matrices (random weights pruned per row by magnitude)",
        "",
        "| shape | sparsity | GB/s | MB dense | MB sparse | decode tok/s dense | sparse | x | dense of limit | "
        "sparse of limit | CPU/wall d/s | prefill (128) tok/s dense | sparse | x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ROWS:
        r = rows.get(key)
        if not r or r.get("kind") != "matrix":
            continue
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']:.2f} | {r['bandwidth_gbs']:.1f} | "
            f"{r['dense_bytes'] / 1e6:.1f} | {r['sparse_bytes'] / 1e6:.1f} | {r['dense_decode_tokens_per_s']:.1f} | "
            f"{r['sparse_decode_tokens_per_s']:.1f} | {r['decode_speedup']:.2f} | "
            f"{r['dense_decode_fraction_of_limit']:.2f} | {r['sparse_decode_fraction_of_limit']:.2f} | "
            f"{r['dense_decode_cpu_per_wall']:.1f}/{r['sparse_decode_cpu_per_wall']:.1f} | "
            f"{r['dense_prefill_tokens_per_s']:.0f} | {r['sparse_prefill_tokens_per_s']:.0f} | "
            f"{r['prefill_speedup']:.2f} |"
        )
    lines += [
        "",
        f"## Whole models: the random 1.1B LLaMA-shaped model (TinyLlama config, pruned per row by magnitude) "
        f"and SmolLM2-135M (pruned by Wanda, 4 calibration windows of 128 tokens, saved compressed); decode {MODEL['new_tokens']} greedy tokens after a "
        f"{MODEL['prompt_tokens']}-token prompt, prefill {MODEL['prefill_tokens']} tokens, batch 1)",
        "",
        "Embeddings and LM head stay dense and count in full in the bytes per token. The dense row is measured "
        "once (on the 50% folder): a dense layer reads its stored zeros, so its speed does not depend on them.",
        "",
        "| row | GB/s | MB per token | limit tok/s | decode tok/s | of limit | CPU/wall | prefill tok/s | "
        "peak RSS load MiB | peak RSS generating MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ROWS:
        r = rows.get(key)
        if not r or r.get("kind") != "model":
            continue
        gen_peak = r["generate_peak_rss_mb"]
        lines.append(
            f"| {key} | {r['bandwidth_gbs']:.1f} | {r['bytes_per_token'] / 1e6:.0f} | "
            f"{r['decode_limit_tokens_per_s']:.2f} | {r['decode_tokens_per_s']:.2f} | "
            f"{r['decode_fraction_of_limit']:.2f} | {r['generate_cpu_per_wall']:.1f} | "
            f"{r['prefill_tokens_per_s']:.1f} | {r['load_peak_rss_mb']:.0f} | "
            f"{'n/a' if gen_peak is None else f'{gen_peak:.0f}'} |"
        )
    lines += ["", "## Targets", ""]
    for line in targets(result):
        lines.append(f"- {line}")
    missing = [k for k in ROWS if k not in rows]
    lines += ["", "## Rows not run", ""]
    lines.append(
        "- "
        + (", ".join(missing) if missing else "none of this script's rows")
        + "; also not run here: Gemma 3 270M, 60% and 2:4, bf16, a dense 1.1B row at 70%, and the issue's "
        "longer protocol (128 new tokens after 128, prefill 1024: shortened so that each row fits in 2-3 minutes)."
    )
    return "\n".join(lines) + "\n"


def targets(result: dict) -> list[str]:
    rows = result["rows"]
    mats = [r for r in rows.values() if r.get("kind") == "matrix"]
    m50 = [r["decode_speedup"] for r in mats if round(r["sparsity"] * 100) == 50]
    pre = [r["prefill_speedup"] for r in mats]
    dense = rows.get("model-1.1b-dense")
    out = [
        "matrix decode at 50% >= 1.6x dense fp32: "
        + (
            f"{_verdict(min(m50), TARGETS['matrix_decode_50'])} worst shape; per shape "
            + ", ".join(f"{v:.2f}x" for v in m50)
            if m50
            else "not measured"
        ),
        "prefill >= 0.9x dense: "
        + (
            f"{_verdict(min(pre), TARGETS['prefill'])} worst matrix row; all " + ", ".join(f"{v:.2f}x" for v in pre)
            if pre
            else "not measured"
        ),
    ]
    for pct, name in ((50, "model_decode_50"), (70, "model_decode_70")):
        sp = rows.get(f"model-1.1b-{pct}-sparse")
        ratio = sp["decode_tokens_per_s"] / dense["decode_tokens_per_s"] if sp and dense else None
        out.append(f"1.1B decode at {pct}% >= {TARGETS[name]}x dense: {_verdict(ratio, TARGETS[name])}")
        if sp and dense:
            out.append(
                f"1.1B prefill at {pct}%: {sp['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}x dense"
            )
    smol, smol_dense = rows.get("model-smollm2-50-sparse"), rows.get("model-smollm2-dense")
    if smol and smol_dense:
        out.append(
            f"SmolLM2-135M at 50% (no target): decode "
            f"{smol['decode_tokens_per_s'] / smol_dense['decode_tokens_per_s']:.2f}x, prefill "
            f"{smol['prefill_tokens_per_s'] / smol_dense['prefill_tokens_per_s']:.2f}x dense"
        )
    sp = rows.get("model-1.1b-50-sparse")
    ratio = None
    if sp and dense and sp["generate_peak_rss_mb"] and dense["generate_peak_rss_mb"]:
        ratio = sp["generate_peak_rss_mb"] / dense["generate_peak_rss_mb"]
    out.append(
        "1.1B peak RSS while generating at 50% <= 0.65x dense: "
        + _verdict(ratio, TARGETS["model_generate_rss_50"], at_most=True)
    )
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels, decode, prefill = [], [], []
    for key in ROWS:
        r = rows.get(key)
        if r and r.get("kind") == "matrix":
            labels.append(f"{r['shape'][0]}x{r['shape'][1]}\n{round(r['sparsity'] * 100)}%")
            decode.append(r["decode_speedup"])
            prefill.append(r["prefill_speedup"])
    pairs = [("1.1B model", "model-1.1b-dense", f"model-1.1b-{p}-sparse", p) for p in SPARSITIES]
    pairs.append(("SmolLM2-135M", "model-smollm2-dense", "model-smollm2-50-sparse", 50))
    for name, dense_key, sparse_key, pct in pairs:
        dense, sp = rows.get(dense_key), rows.get(sparse_key)
        if sp and dense:
            labels.append(f"{name}\n{pct}%")
            decode.append(sp["decode_tokens_per_s"] / dense["decode_tokens_per_s"])
            prefill.append(sp["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"])
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.1), 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], decode, 0.4, label="decode (1 token)")
    ax.bar([x + 0.2 for x in xs], prefill, 0.4, label="prefill")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("sparse / dense tokens/s (fp32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict) -> None:
    """JSON, MD and PNG, each replaced atomically (the JSON accumulates rows; a rerun row replaces its own)."""
    atomic_write_text(OUT.with_suffix(".json"), json.dumps(result, indent=1) + "\n", overwrite=True)
    atomic_write_text(OUT.with_suffix(".md"), markdown(result), overwrite=True)
    if any(r.get("kind") == "matrix" for r in result["rows"].values()):
        plot(result, OUT.with_suffix(".png"))


def machine() -> dict:
    import torch

    from wanda.eval.cpu_speed import cpu_name

    flags = set()
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {
        "cpu": cpu_name(),
        "flags": " ".join(sorted(f for f in flags if f.startswith(("avx", "fma")))),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=ROWS, help="measure this row (replacing its earlier figures)")
    parser.add_argument("--resume", action="store_true", help="skip the row when the JSON already holds it")
    parser.add_argument("--rows", action="store_true", help="print the row keys in order and exit")
    parser.add_argument("--markdown", action="store_true", help="rewrite MD and PNG from the JSON and exit")
    args = parser.parse_args()
    if args.rows:
        print("\n".join(ROWS))
        return
    result = load_results()
    if args.markdown:
        write(result)
        return
    if args.only is None:  # every pending row, each under the lock in its own process
        for key in ROWS:
            if key not in load_results()["rows"]:
                cmd = ["flock", "/tmp/wanda-heavy.lock", sys.executable, __file__, "--only", key, "--resume"]
                os.spawnvp(os.P_WAIT, cmd[0], cmd)
        return
    if args.resume and args.only in result["rows"]:
        print(f"{args.only}: already in {OUT.with_suffix('.json').name}, skipped")
        return
    if args.only.startswith("matrix"):
        row = matrix_row(args.only)
    elif args.only == "build-1.1b":
        row = build_models()
    elif args.only == "build-smollm2-50":
        row = build_smollm2()
    else:
        row = model_row(args.only)
    result = load_results()  # re-read: another row may have finished meanwhile
    result["machine"] = machine()
    result["rows"][args.only] = row
    write(result)
    print(json.dumps({k: v for k, v in row.items() if k != "tokens"}))


if __name__ == "__main__":
    main()
