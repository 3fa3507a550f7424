"""The original code's pruning-speed table, measured on whatever hardware runs this script.

Pruning speed is the mask-and-update time of every linear layer summed over the model, without the forward
passes that collect the calibration statistics (``PruneReport.prune_seconds``; the GPU is synchronised around
each layer). Two models:

* ``smollm2-135m``, the bundled real SmolLM2-135M (30 blocks, hidden 576, MLP 1536), calibrated on 32
  windows of 512 tokens from wiki-summaries;
* LLaMA-7B-shaped random blocks (hidden 4096, MLP 11008, 32 heads): a few blocks with random weights and a
  1024-token vocabulary (the embeddings are never pruned, so the vocabulary does not change the timing), on
  4 windows of 512 random tokens. Mask-and-update time does not depend on the number of calibration tokens
  (the statistics are (in,) norms or (in, in) Hessians either way), so few windows keep it quick; the
  per-block time times 32 estimates a full LLaMA-7B.

Usage (from the repository root)::

    nice -n 10 python benchmarks/pruning_speed.py                  # CPU here, GPU where there is one
    python benchmarks/pruning_speed.py --llama_blocks 3 --methods wanda,sparsegpt

Writes ``benchmarks/results/pruning_speed_<device>.json`` and ``.md`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from wanda import PruneSettings, prune
from wanda.data import calibration_windows, resolve_source
from wanda.models import load_model

log = logging.getLogger("pruning_speed")
RESULTS = Path(__file__).resolve().parent / "results"
#: Full LLaMA-7B depth, for the per-block extrapolation.
LLAMA_7B_BLOCKS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="comma-separated (default: %(default)s)")
    p.add_argument("--patterns", default="unstructured,2:4", help="comma-separated (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default: 512)")
    p.add_argument("--smollm_windows", type=int, default=32, help="calibration windows for smollm2-135m (0: skip)")
    p.add_argument("--llama_blocks", type=int, default=2, help="LLaMA-7B-shaped blocks (0: skip; default: 2)")
    p.add_argument("--llama_windows", type=int, default=4, help="calibration windows for the 7B-shaped blocks")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (default 0: torch's default). On a shared, overloaded machine use 1: "
        "with more, every small element-wise op waits for a descheduled worker thread (60x slower here)",
    )
    p.add_argument("--output", default=None, help="file stem (default: benchmarks/results/pruning_speed_<device>)")
    return p.parse_args(argv)


def _device_tag(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().removeprefix("nvidia ")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _environment(device: torch.device) -> dict:
    env = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "code": _code_version(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
            env["cpu"] = names[0] if names else platform.processor()
        except OSError:
            env["cpu"] = platform.processor()
    return env


def _code_version() -> str:
    """The commit the measured code comes from, with ``+dirty`` when ``src/wanda`` has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src/wanda"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _layer_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def _summarise(model_name: str, blocks: int, method: str, pattern: str, report) -> dict:
    per_type: dict[str, list[float]] = {}
    for layer in report.layers:
        per_type.setdefault(_layer_type(layer.name), []).append(layer.prune_seconds)
    return {
        "model": model_name,
        "blocks": blocks,
        "method": method,
        "pattern": pattern,
        "prune_seconds": report.prune_seconds,
        "per_block_seconds": report.prune_seconds / blocks,
        "wall_seconds": report.wall_seconds,
        "actual_sparsity": report.actual_sparsity,
        "calibration_tokens": report.calibration_tokens,
        "per_layer_type_mean_seconds": {k: statistics.mean(v) for k, v in per_type.items()},
        "layers": [{"name": l.name, "shape": list(l.shape), "seconds": l.prune_seconds} for l in report.layers],
    }


def _run(model, calib, method: str, pattern: str, device: torch.device):
    settings = PruneSettings(prune_method=method, sparsity_type=pattern)
    return prune(model, calib if method != "magnitude" else None, settings, device=device, progress=False)


def bench_smollm(args, device: torch.device, dtype: str) -> list[dict]:
    rows = []
    tokenizer = load_model("smollm2-135m", dtype=dtype, device=str(device)).tokenizer
    calib = calibration_windows(
        resolve_source("wiki-summaries", "calibration"), tokenizer, args.smollm_windows, args.seqlen, seed=0
    )
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            model = load_model("smollm2-135m", dtype=dtype, device=str(device)).model  # fresh weights every run
            report = _run(model, calib, method, pattern, device)
            rows.append(_summarise("smollm2-135m", len(model.model.layers), method, pattern, report))
            log.info("smollm2-135m %s %s: %.2f s", method, pattern, report.prune_seconds)
            del model
    return rows


def bench_llama7b(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=args.llama_blocks,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    model.config.use_cache = False
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = torch.randint(
        0, config.vocab_size, (args.llama_windows, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    rows = []
    name = f"LLaMA-7B-shaped ({args.llama_blocks} random blocks)"
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            model.load_state_dict(original)
            report = _run(model, calib, method, pattern, device)
            rows.append(_summarise(name, args.llama_blocks, method, pattern, report))
            log.info("%s %s %s: %.2f s", name, method, pattern, report.prune_seconds)
    return rows


def markdown(rows: list[dict], payload: dict) -> str:
    env = payload["environment"]
    hardware = env.get("gpu") or f"{env.get('cpu')}, {env['threads']} torch thread(s)"
    lines = [
        f"Pruning speed on {hardware} (torch {env['torch']}, {payload['dtype'].removeprefix('torch.')}, "
        f"wanda at {env.get('code', 'unknown')}): "
        "mask-and-update seconds summed over all pruned layers, without forward passes. Calibration: "
        f"smollm2-135m {payload['smollm_windows']} windows of {payload['seqlen']} tokens from wiki-summaries; "
        f"the 7B-shaped blocks {payload['llama_windows']} windows of {payload['seqlen']} random tokens. "
        "The 32-block column is the per-block time times 32.",
        "",
    ]
    load = max(env["load_average_at_start"][0], env.get("load_average_at_end", [0])[0])
    if env["device"] == "cpu" and load > env["cpu_count"]:
        lines.insert(
            1,
            f"The machine was shared (1-minute load average up to {load:.1f} on {env['cpu_count']} cores), "
            "so these times are inflated by waiting for the CPU.",
        )
    columns = list(dict.fromkeys((r["model"], r["pattern"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["model"], r["pattern"], r["method"]): r for r in rows}
    header = [f"{m} {'50% unstr.' if p == 'unstructured' else p}" for m, p in columns]
    seven_b = [c for c in columns if c[0].startswith("LLaMA-7B")]
    header += [f"est. LLaMA-7B (32 blocks) {'50% unstr.' if p == 'unstructured' else p}" for _, p in seven_b]
    lines += ["| method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for method in methods:
        cells = [
            f"{by_key[(m, p, method)]['prune_seconds']:.2f}" if (m, p, method) in by_key else "-" for m, p in columns
        ]
        cells += [
            f"{by_key[(m, p, method)]['per_block_seconds'] * LLAMA_7B_BLOCKS:.1f}" if (m, p, method) in by_key else "-"
            for m, p in seven_b
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    types = list(dict.fromkeys(t for r in rows for t in r["per_layer_type_mean_seconds"]))
    lines += [
        "",
        "Per layer: mean mask-and-update seconds of one matrix of each kind.",
        "",
        "| model | pattern | method | " + " | ".join(types) + " |",
        "|---|---|---|" + "---:|" * len(types),
    ]
    for r in rows:
        cells = [
            f"{r['per_layer_type_mean_seconds'][t]:.4f}" if t in r["per_layer_type_mean_seconds"] else "-"
            for t in types
        ]
        lines.append(f"| {r['model']} | {r['pattern']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    # fp32 on CPU (half precision is slow there), fp16 on GPU as in the paper
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    env = _environment(device)
    start = time.perf_counter()
    rows = []
    if args.smollm_windows > 0:
        rows += bench_smollm(args, device, str(dtype).removeprefix("torch."))
    if args.llama_blocks > 0:
        rows += bench_llama7b(args, device, dtype)
    stem = Path(args.output) if args.output else RESULTS / f"pruning_speed_{_device_tag(device)}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    env["load_average_at_end"] = list(os.getloadavg())
    payload = {
        "environment": env,
        "dtype": str(dtype),
        "seqlen": args.seqlen,
        "smollm_windows": args.smollm_windows,
        "llama_blocks": args.llama_blocks,
        "llama_windows": args.llama_windows,
        "total_seconds": time.perf_counter() - start,
        "runs": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    table = markdown(rows, payload)
    stem.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
