"""2:4 inference speed-up on a GPU: the original code's "Speedup Evaluation" with PyTorch's semi-structured kernels.

Two models, each pruned to 2:4 and measured dense versus sparse with ``wanda.export.run_speedup`` for every
available backend (CUTLASS, and cuSPARSELt where the PyTorch build has it):

* LLaMA-7B-shaped random blocks (hidden 4096, MLP 11008, 32 heads; 2:4 by magnitude): the per-layer matmul
  table of the paper (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008) across decode (1-16 tokens)
  and prefill (512-8192 tokens) sizes, and the forward latency of those blocks;
* the bundled smollm2-135m pruned 2:4 with Wanda (32 windows of 512 tokens from wiki-summaries).

    python benchmarks/speedup_gpu.py [--blocks 4] [--dtype float16]

Writes ``benchmarks/results/speedup_<gpu>.json`` and ``.md``. Without a CUDA GPU of compute capability 8.0
or higher it prints one line and exits with code 3, like ``wanda speedup``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from wanda import PruneSettings, prune
from wanda.data import calibration_windows, resolve_source
from wanda.export import (
    BACKENDS,
    SemiStructuredBackend,
    SpeedupSettings,
    available_backends,
    format_tables,
    gpu_problem,
    run_speedup,
)
from wanda.jobs.speedup import EXIT_NO_GPU, environment, gpu_slug
from wanda.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=4, help="LLaMA-7B-shaped blocks (default: 4)")
    p.add_argument("--dtype", default="float16", choices=tuple(_DTYPES))
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: %(default)s)")
    p.add_argument("--skip_smollm", action="store_true", help="only the 7B-shaped blocks")
    p.add_argument("--output", default=None, help="file stem (default: benchmarks/results/speedup_<gpu>)")
    return p.parse_args(argv)


def llama7b_24(blocks: int, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=blocks,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    model.config.use_cache = False
    prune(model, None, PruneSettings(prune_method="magnitude", sparsity_type="2:4"), progress=False)
    return model


def smollm_24(dtype: torch.dtype, device: torch.device):
    loaded = load_model("smollm2-135m", dtype=str(dtype).removeprefix("torch."), device=str(device))
    calib = calibration_windows(resolve_source("wiki-summaries", "calibration"), loaded.tokenizer, 32, 512, seed=0)
    prune(loaded.model, calib, PruneSettings(prune_method="wanda", sparsity_type="2:4"), device=device, progress=False)
    return loaded.model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = gpu_problem()
    if problem is not None:
        print(
            f"speedup_gpu.py: 2:4 sparse kernels need a CUDA GPU of compute capability 8.0 or higher; {problem}",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype.*")
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = _DTYPES[args.dtype]
    usable = available_backends(device)
    backends = [b for b in args.backends.split(",") if b in usable]
    if not backends:
        print(f"speedup_gpu.py: none of {args.backends} runs on this GPU", file=sys.stderr)
        return EXIT_NO_GPU
    builders = {
        f"LLaMA-7B-shaped ({args.blocks} random blocks, magnitude 2:4)": lambda: llama7b_24(args.blocks, dtype, device)
    }
    if not args.skip_smollm:
        builders["smollm2-135m (Wanda 2:4)"] = lambda: smollm_24(dtype, device)
    results, sections = [], []
    for name, build in builders.items():
        for backend in backends:
            model = build()  # run_speedup converts in place, so a fresh model per backend
            result = run_speedup(model, SemiStructuredBackend(backend), SpeedupSettings())
            result.environment = {**environment(device), "model": name}
            results.append(result.to_dict())
            sections.append(format_tables(result, f"{name}, {backend}"))
            print(sections[-1], flush=True)
            del model
            torch.cuda.empty_cache()
    stem = Path(args.output) if args.output else RESULTS / f"speedup_{gpu_slug(device)}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(
        f"2:4 speed-up on {torch.cuda.get_device_name(device)} ({args.dtype}, torch "
        f"{torch.__version__}, CUDA {torch.version.cuda})\n\n" + "\n".join(sections)
    )
    return 0 if all(r["check"]["passed"] for r in results) else 4


if __name__ == "__main__":
    sys.exit(main())
