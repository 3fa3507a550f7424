"""Decode with int8 values: the sparse kernel's int8 layers against PyTorch's dense int8 weight-only matmul.

Quantized models are what users deploy, so the sparse format must beat the dense quantized one, not only dense
fp32. Dense int8 here is ``torch._weight_int8pack_mm`` (int8 weights, one fp32 scale per output row: about 1
byte per weight); sparse int8 is ``SparseLinear`` with int8 codes and one fp32 scale per row and group of 128
columns (0.5 + 1/8 + 4/128 = 0.66 bytes per weight at 50%). fp32 and bf16, dense and sparse, are timed beside
them. The LLaMA-7B shapes of ``cpu_inference.py``, random weights pruned per row by magnitude at 50% and 70%,
batch 1, fp32 input, on the kernel path this CPU picks; every variant is checked against its own dense
product before timing, and the variants are interleaved round by round in one process (``kernel_ab.best_of``).
Read bandwidth is measured in the same run. Then the whole SmolLM2-135M model (its block matrices pruned to 50%
per row by magnitude; the tied embedding and head stay fp32 in every variant): greedy decode tokens/s, 64 new
tokens after a 32-token prompt, dense fp32, dense int8 and sparse int8, interleaved over 3 rounds, best kept.

    flock /tmp/wanda-heavy.lock python benchmarks/int8_decode.py

writes ``benchmarks/results/int8_decode.{json,md}``.
"""

from __future__ import annotations

import json

import torch
from common import RESULTS
from cpu_inference import SHAPES, SPARSITIES, prune_rows, read_bandwidth_gbs
from kernel_ab import best_of

from wanda.kernels.sparse_linear import SparseLinear, get_kernel_path
from wanda.utils.io import atomic_write_text

OUT = RESULTS / "int8_decode"
GROUP = 128
TARGET = 1.3  # sparse int8 at 50% over dense int8


def _row_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8 (the layout ``_weight_int8pack_mm`` reads)."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _bytes(variant: str, out_f: int, in_f: int, nnz: int) -> int:
    mask = out_f * in_f / 8
    groups = out_f * -(-in_f // GROUP) * 4
    return int(
        {
            "dense_fp32": 4 * out_f * in_f,
            "dense_int8": out_f * in_f + 4 * out_f,
            "sparse_fp32": 4 * nnz + mask,
            "sparse_bf16": 2 * nnz + mask,
            "sparse_int8": nnz + mask + groups,
        }[variant]
    )


class Int8Linear(torch.nn.Module):
    """A linear layer on ``torch._weight_int8pack_mm``: PyTorch's dense int8 weight-only matmul."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        q, scale = _row_int8(linear.weight.detach().float())
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).float(), self.q, self.scale)
        y = y.reshape(*x.shape[:-1], -1)
        return (y if self.bias is None else y + self.bias).to(x.dtype)


def model_rows(rounds: int = 3, prompt: int = 32, new: int = 64) -> dict:
    """Decode tokens/s of SmolLM2-135M at 50%: dense fp32, dense int8 and sparse int8 (best of ``rounds``)."""
    import copy

    from wanda.eval.generation import timed_generate
    from wanda.kernels.sparse_linear import sparsify_linears
    from wanda.models import load_model

    model = load_model("smollm2-135m", dtype="float32", device="cpu").model.eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    prune_rows(module.weight.data, 50)
    dense_int8 = copy.deepcopy(model)
    for layer in dense_int8.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    sparse_int8 = copy.deepcopy(model)
    converted, kept = sparsify_linears(sparse_int8, dtype=torch.int8, groupsize=GROUP)
    variants = {"dense_fp32": model, "dense_int8": dense_int8, "sparse_int8": sparse_int8}
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    best = {name: 0.0 for name in variants}
    for _ in range(rounds):
        for name, m in variants.items():
            timing = timed_generate(m, ids, new, stop_at_eos=False)
            best[name] = max(best[name], timing.decode_tokens_per_s)
    return {
        "decode_tokens_per_s": best,
        "sparse_int8_over_dense_int8": best["sparse_int8"] / best["dense_int8"],
        "matrices_sparse": converted,
        "matrices_dense": kept,
        "prompt_tokens": prompt,
        "new_tokens": new,
    }


def main() -> None:
    torch.manual_seed(0)
    bandwidth = read_bandwidth_gbs()
    rows = []
    for pct in SPARSITIES:
        for out_f, in_f in SHAPES:
            weight = prune_rows(torch.randn(out_f, in_f), pct)
            x = torch.randn(1, in_f)
            q, scale = _row_int8(weight)
            layers = {
                "sparse_fp32": SparseLinear.from_dense(weight),
                "sparse_bf16": SparseLinear.from_dense(weight, dtype=torch.bfloat16),
                "sparse_int8": SparseLinear.from_dense(weight, dtype=torch.int8, groupsize=GROUP),
            }
            fns = {
                "dense_fp32": lambda: torch.nn.functional.linear(x, weight),
                "dense_int8": lambda: torch._weight_int8pack_mm(x, q, scale),
                **{name: (lambda layer=layer: layer(x)) for name, layer in layers.items()},
            }
            with torch.no_grad():
                references = {
                    "dense_fp32": x @ weight.T,
                    "dense_int8": x @ (q.float() * scale[:, None]).T,
                    **{name: x @ layer.to_dense().float().T for name, layer in layers.items()},
                }
                for name, fn in fns.items():  # each variant computes its own weights' product
                    y, ref = fn().float(), references[name]
                    assert float((y - ref).norm() / ref.norm()) < 1e-5, name
                times = best_of(fns)
            nnz = int((weight != 0).sum())
            row = {"shape": f"{out_f}x{in_f}", "sparsity": pct / 100}
            for name, (wall, cpu) in times.items():
                moved = _bytes(name, out_f, in_f, nnz)
                row[name] = {
                    "ms": wall * 1e3,
                    "cpu_ms": cpu * 1e3,
                    "bytes": moved,
                    "gbs": moved / wall / 1e9,
                    "fraction_of_bandwidth": moved / wall / 1e9 / bandwidth,
                }
            row["sparse_int8_over_dense_int8"] = times["dense_int8"][0] / times["sparse_int8"][0]
            row["sparse_int8_over_dense_fp32"] = times["dense_fp32"][0] / times["sparse_int8"][0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "path": get_kernel_path(),
        "threads": torch.get_num_threads(),
        "read_bandwidth_gbs": bandwidth,
        "groupsize": GROUP,
        "rows": rows,
        "smollm2_135m_50": model_rows(),
    }
    atomic_write_text(OUT.with_suffix(".json"), json.dumps(result, indent=2) + "\n", overwrite=True)
    names = ("dense_fp32", "dense_int8", "sparse_fp32", "sparse_bf16", "sparse_int8")
    lines = [
        "# Decode with int8 values: sparse int8 against dense int8 (batch 1)",
        "",
        f"Path `{result['path']}`, {result['threads']} threads, best of 7 rounds of 10 calls, variants interleaved in "
        f"one process; read bandwidth measured in the same run: {bandwidth:.1f} GB/s. Each cell: ms per call "
        "(CPU ms) and the fraction of the read bandwidth its bytes reach.",
        "",
        "| shape | sparsity | " + " | ".join(names) + " | sparse int8 / dense int8 speed |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in rows:
        cells = [f"{r[n]['ms']:.2f} ({r[n]['cpu_ms']:.2f}), {r[n]['fraction_of_bandwidth']:.0%}" for n in names]
        lines.append(
            f"| {r['shape']} | {r['sparsity']:.2f} | "
            + " | ".join(cells)
            + f" | {r['sparse_int8_over_dense_int8']:.2f}x |"
        )
    at50 = [r["sparse_int8_over_dense_int8"] for r in rows if r["sparsity"] == 0.5]
    worst = min(at50)
    lines += [
        "",
        f"Target: sparse int8 decode at 50% at least {TARGET}x dense int8: **{'met' if worst >= TARGET else 'missed'}**, "
        f"{', '.join(f'{v:.2f}x' for v in at50)} on {', '.join(r['shape'] for r in rows if r['sparsity'] == 0.5)}.",
    ]
    whole = result["smollm2_135m_50"]
    tps = whole["decode_tokens_per_s"]
    lines += [
        "",
        f"SmolLM2-135M at 50% (magnitude per row), greedy decode of {whole['new_tokens']} tokens after "
        f"{whole['prompt_tokens']}, best of 3 interleaved rounds: dense fp32 {tps['dense_fp32']:.1f} tokens/s, "
        f"dense int8 {tps['dense_int8']:.1f}, sparse int8 {tps['sparse_int8']:.1f} "
        f"({whole['sparse_int8_over_dense_int8']:.2f}x dense int8; {whole['matrices_sparse']} matrices sparse, "
        f"{whole['matrices_dense']} stayed dense under the load rule).",
    ]
    atomic_write_text(OUT.with_suffix(".md"), "\n".join(lines) + "\n", overwrite=True)


if __name__ == "__main__":
    main()
