"""Dense against sparse-kernel speed on the CPU: per linear shape of a model, and for the whole model.

- Per shape: one of the model's own pruned matrices of each distinct (out, in) shape, as ``nn.Linear`` with
  its zeros and as ``SparseLinear``, timed in this process on 1 token (decode, batch 1) and on a prompt of
  ``prefill_tokens`` tokens. Memory per shape is the bytes the layer holds (exact, not a process figure).
- Whole model: each variant in its own fresh process (``python -m wanda.eval.cpu_speed``), because a process's
  peak resident size never goes down: a dense model loaded first would hide the sparse one's. Each worker
  reports the peak RSS of loading and, after ``reset_peak_rss``, the peak while generating (ru_maxrss, the
  kernel's high-water mark), with its RSS before loading (Python, torch and transformers) beside them.

Bytes read per token: every weight of the linear layers and the LM head once, and one row of the input
embeddings (a lookup reads one row); a ``SparseLinear`` counts its values, bitmask and row offsets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from ..kernels import SparseLinear
from ..utils.declare import SettingsMixin, require, require_seed, setting

__all__ = [
    "CpuSpeedSettings",
    "cpu_name",
    "format_cpu_tables",
    "bytes_per_token",
    "layer_bytes",
    "matrix_rows",
    "model_row",
    "run_cpu_speedup",
]


@dataclass(frozen=True)
class CpuSpeedSettings(SettingsMixin):
    """What ``wanda speedup --device cpu`` measures (prefixed cpu_: the GPU path has its own token counts)."""

    _argument_group_name: ClassVar[str] = "cpu measurement (--device cpu)"

    cpu_prompt_tokens: int = setting(128, "decode is timed after a random prompt of this many tokens")
    cpu_new_tokens: int = setting(128, "greedy tokens generated for the decode figure (an end token does not stop it)")
    cpu_prefill_tokens: int = setting(1024, "prompt length of the prefill figures (whole model and per shape)")
    cpu_warmup: int = setting(1, "untimed calls before each per-shape measurement")
    cpu_iters: int = setting(5, "timed calls per per-shape measurement (the median is reported)")
    cpu_seed: int = setting(0, "seed of the random prompts and inputs")

    def __post_init__(self) -> None:
        require_seed(self.cpu_seed, "--cpu_seed")
        for name in ("cpu_prompt_tokens", "cpu_new_tokens", "cpu_prefill_tokens", "cpu_iters"):
            require(getattr(self, name) >= 1, f"--{name} must be at least 1, got {getattr(self, name)}")
        require(self.cpu_new_tokens >= 2, "--cpu_new_tokens must be at least 2 (one prefill token, one decode step)")
        require(self.cpu_warmup >= 0, f"--cpu_warmup must be at least 0, got {self.cpu_warmup}")


def layer_bytes(module: nn.Module) -> int:
    """Bytes of the weight data a linear layer reads per token (values + mask + offsets (+ scales) when sparse)."""
    if isinstance(module, SparseLinear):
        held = [module.values, module.mask, module.offsets]
        if module.scales is not None:
            held.append(module.scales)
    else:
        held = [module.weight]
    if module.bias is not None:
        held.append(module.bias)
    return sum(t.numel() * t.element_size() for t in held)


def bytes_per_token(model: nn.Module) -> int:
    """Bytes a decode step reads from the weights (see the module docstring for what counts)."""
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, SparseLinear)) and id(module) not in seen:
            seen.add(id(module))
            total += layer_bytes(module)
    tied = head is not None and head.weight is embeddings.weight
    if not tied:
        total += embeddings.weight[0].numel() * embeddings.weight.element_size()
    for name, param in model.named_parameters():  # norms (and any other small parameter) once each
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if not isinstance(owner, (nn.Linear, nn.Embedding, SparseLinear)):
            total += param.numel() * param.element_size()
    return total


def _time(fn, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()``."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


@torch.inference_mode()
def matrix_rows(sparse_model: nn.Module, settings: CpuSpeedSettings) -> list[dict]:
    """One row per distinct shape of the model's ``SparseLinear`` layers: dense vs sparse tokens/s and bytes."""
    shapes: dict[tuple[int, int], tuple[str, SparseLinear]] = {}
    counts: dict[tuple[int, int], int] = {}
    for name, module in sparse_model.named_modules():
        if isinstance(module, SparseLinear):
            key = (module.out_features, module.in_features)
            shapes.setdefault(key, (name, module))
            counts[key] = counts.get(key, 0) + 1
    gen = torch.Generator().manual_seed(settings.cpu_seed)
    rows = []
    for (out_f, in_f), (name, sparse) in shapes.items():
        dtype = sparse.weight_dtype  # the dense layer's and the inputs' (fp32 for int8 codes)
        dense = nn.Linear(in_f, out_f, bias=sparse.bias is not None, dtype=dtype)
        dense.weight = nn.Parameter(sparse.to_dense(), requires_grad=False)
        if sparse.bias is not None:
            dense.bias = nn.Parameter(sparse.bias.to(dtype), requires_grad=False)
        row = {
            "shape": [out_f, in_f],
            "example": name,
            "count": counts[(out_f, in_f)],
            "sparsity": 1 - sparse.nnz / (out_f * in_f),
            "dtype": str(sparse.values.dtype).removeprefix("torch."),
            "dense_bytes": layer_bytes(dense),
            "sparse_bytes": layer_bytes(sparse),
        }
        for phase, tokens in (("decode", 1), ("prefill", settings.cpu_prefill_tokens)):
            x = torch.randn(tokens, in_f, generator=gen).to(dtype)
            for variant, layer in (("dense", dense), ("sparse", sparse)):
                seconds = _time(lambda: layer(x), settings.cpu_warmup, settings.cpu_iters)
                row[f"{variant}_{phase}_tokens_per_s"] = tokens / seconds
            row[f"{phase}_speedup"] = row[f"sparse_{phase}_tokens_per_s"] / row[f"dense_{phase}_tokens_per_s"]
        rows.append(row)
        del dense
    return rows


def model_row(folder: str, dtype: str, sparse_kernel: bool, settings: CpuSpeedSettings) -> dict:
    """Load ``folder`` (dense or with the sparse kernel) and time decode and prefill; peak RSS of each phase.

    Meant for a fresh process (``run_cpu_speedup`` starts one per variant), so the RSS figures are its own.
    """
    from ..models import load_model
    from ..utils.resources import peak_rss_mb, reset_peak_rss
    from .generation import timed_generate

    rss_before = _current_rss_mb()
    start = time.perf_counter()
    loaded = load_model(folder, "llm_weights", dtype, "cpu", sparse_kernel=sparse_kernel)
    load_s = time.perf_counter() - start
    model = loaded.model
    load_peak = peak_rss_mb()
    resettable = reset_peak_rss()
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(settings.cpu_seed)
    prompt = torch.randint(0, vocab, (1, settings.cpu_prompt_tokens), generator=gen)
    timed_generate(model, prompt[:, :8], 4, stop_at_eos=False)  # warm-up: kernels built, buffers allocated
    decode = timed_generate(model, prompt, settings.cpu_new_tokens, stop_at_eos=False)
    long = torch.randint(0, vocab, (1, settings.cpu_prefill_tokens), generator=gen)
    prefill = timed_generate(model, long, 1, stop_at_eos=False)
    sparse_count = sum(isinstance(m, SparseLinear) for m in model.modules())
    return {
        "variant": "sparse" if sparse_kernel else "dense",
        "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "sparse_linears": sparse_count,
        "bytes_per_token": bytes_per_token(model),
        "load_s": load_s,
        "rss_before_load_mb": rss_before,
        "load_peak_rss_mb": load_peak,
        "generate_peak_rss_mb": peak_rss_mb() if resettable else None,
        "decode_tokens_per_s": decode.decode_tokens_per_s,
        "decode_tokens": decode.new_tokens - 1,
        "prompt_tokens": settings.cpu_prompt_tokens,
        "prefill_tokens_per_s": prefill.prefill_tokens_per_s,
        "prefill_tokens": settings.cpu_prefill_tokens,
        "tokens": decode.tokens,
        "threads": torch.get_num_threads(),
    }


def cpu_name() -> str:
    """The CPU's model name (Linux), else ``platform.processor()``."""
    import platform

    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _current_rss_mb() -> float:
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _model_row_in_process(folder: str, dtype: str, sparse_kernel: bool, settings: CpuSpeedSettings) -> dict:
    from ..errors import WandaError

    args = json.dumps({"folder": folder, "dtype": dtype, "sparse_kernel": sparse_kernel, "settings": asdict(settings)})
    done = subprocess.run(
        [sys.executable, "-m", "wanda.eval.cpu_speed", args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise WandaError(f"the {'sparse' if sparse_kernel else 'dense'} measurement of {folder} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cpu_speedup(folder: str, dtype: str, settings: CpuSpeedSettings) -> dict:
    """Per-shape rows (this process) and the whole-model dense and sparse rows (one fresh process each)."""
    from ..models import load_model

    loaded = load_model(folder, "llm_weights", dtype, "cpu", sparse_kernel=True)
    matrices = matrix_rows(loaded.model, settings)
    del loaded
    dense = _model_row_in_process(folder, dtype, False, settings)
    sparse = _model_row_in_process(folder, dtype, True, settings)
    whole = {
        "dense": dense,
        "sparse": sparse,
        "decode_speedup": sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "prefill_speedup": sparse["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
        "same_tokens": dense["tokens"] == sparse["tokens"],
    }
    for key in ("load_peak_rss_mb", "generate_peak_rss_mb"):
        if dense[key] and sparse[key]:
            whole[f"{key.removesuffix('_mb')}_ratio"] = sparse[key] / dense[key]
    return {"matrices": matrices, "model": whole, "settings": asdict(settings)}


def format_cpu_tables(result: dict, title: str) -> str:
    """The per-shape and whole-model tables ``wanda speedup --device cpu`` prints."""
    lines = [title, "", "per matrix shape (one of the model's own matrices, this process):"]
    lines.append(
        f"  {'shape':>13} {'n':>3} {'sparsity':>8} {'decode tok/s dense':>18} {'sparse':>9} {'x':>6} "
        f"{'prefill tok/s dense':>19} {'sparse':>9} {'x':>6} {'MB dense':>9} {'sparse':>8}"
    )
    for row in result["matrices"]:
        shape = f"{row['shape'][0]}x{row['shape'][1]}"
        lines.append(
            f"  {shape:>13} {row['count']:>3} {row['sparsity']:>8.3f} {row['dense_decode_tokens_per_s']:>18.1f} "
            f"{row['sparse_decode_tokens_per_s']:>9.1f} {row['decode_speedup']:>6.2f} "
            f"{row['dense_prefill_tokens_per_s']:>19.1f} {row['sparse_prefill_tokens_per_s']:>9.1f} "
            f"{row['prefill_speedup']:>6.2f} {row['dense_bytes'] / 1e6:>9.2f} {row['sparse_bytes'] / 1e6:>8.2f}"
        )
    whole = result["model"]
    lines += ["", "whole model (each variant in its own process; peak RSS by ru_maxrss):"]
    for variant in ("dense", "sparse"):
        row = whole[variant]
        gen_peak = row["generate_peak_rss_mb"]
        lines.append(
            f"  {variant:>6}: decode {row['decode_tokens_per_s']:.2f} tok/s, prefill "
            f"{row['prefill_tokens_per_s']:.1f} tok/s, {row['bytes_per_token'] / 1e6:.1f} MB read per token, "
            f"peak RSS load {row['load_peak_rss_mb']:.0f} MiB, generating "
            f"{'n/a' if gen_peak is None else f'{gen_peak:.0f}'} MiB (before load {row['rss_before_load_mb']:.0f})"
        )
    lines.append(
        f"  sparse/dense: decode {whole['decode_speedup']:.2f}x, prefill {whole['prefill_speedup']:.2f}x, "
        f"generating peak RSS {whole.get('generate_peak_rss_ratio', float('nan')):.2f}x, "
        f"greedy tokens {'identical' if whole['same_tokens'] else 'DIFFER'}"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # a worker of run_cpu_speedup: one variant, its result as the last line of stdout
    spec = json.loads(sys.argv[1])
    result = model_row(spec["folder"], spec["dtype"], spec["sparse_kernel"], CpuSpeedSettings(**spec["settings"]))
    print(json.dumps(result))
