"""The decode kernel of this checkout against the one at an earlier commit, in one process.

A change to the C++ kernel is judged by its speed-up over the previous kernel measured side by side: both
builds are loaded into one process and called on the same packed matrices and the same input, interleaved
(old, new, dense) over several rounds, best of each kept. Ratios taken this way survive a busy machine far
better than two separate runs of ``cpu_inference.py`` would.

    flock /tmp/wanda-heavy.lock python benchmarks/kernel_ab.py --old f3d6b4f~1

writes ``benchmarks/results/kernel_ab.{json,md}``. Shapes and sparsities are those of ``cpu_inference.py``'s
matrix rows (random weights pruned per row by magnitude), decode at batch 1 on the path this CPU picks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT
from cpu_inference import SHAPES, SPARSITIES, prune_rows
from torch.utils.cpp_extension import load

from wanda.kernels.sparse_linear import DECODE_MIN_PARALLEL, PREFILL_TILE_ROWS, SparseLinear, get_kernel_path
from wanda.utils.io import atomic_write_text

OUT = RESULTS / "kernel_ab"
SOURCE = "src/wanda/kernels/sparse_kernels.cpp"


def build_old(rev: str, folder: Path):
    """The extension as it was at ``rev``, built into ``folder``."""
    text = subprocess.run(["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, check=True, capture_output=True).stdout
    src = folder / "old_sparse_kernels.cpp"
    src.write_bytes(text)
    return load(
        name="wanda_sparse_ab_old",
        sources=[str(src)],
        build_directory=str(folder),
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )


def best_of(fns: dict, rounds: int = 7, calls: int = 10) -> dict[str, tuple[float, float]]:
    """Best (wall s, CPU s) per call of each function, the functions interleaved round by round."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall, cpu = (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls
            if wall < best[name][0]:
                best[name] = (wall, cpu)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the commit whose kernel is compared")
    args = parser.parse_args()
    path_name = get_kernel_path()
    old_rev = subprocess.run(["git", "rev-parse", "--short", args.old], cwd=ROOT, check=True, capture_output=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = build_old(args.old, Path(tmp))
        path = int(old.path_id(path_name))
        torch.manual_seed(0)
        for pct in SPARSITIES:
            for out_f, in_f in SHAPES:
                weight = prune_rows(torch.randn(out_f, in_f), pct)
                dense = torch.nn.Linear(in_f, out_f, bias=False)
                dense.weight.data = weight
                packed = SparseLinear.from_dense(dense)
                x = torch.randn(1, in_f)
                # the old build's entry point, with this checkout's layout (unchanged) and settings; decode_max 1
                # is enough for one token
                call = (packed.values, packed.mask, packed.offsets, None, in_f, path, 1, PREFILL_TILE_ROWS)
                call = (*call, DECODE_MIN_PARALLEL)
                ref = x @ weight.T
                with torch.no_grad():
                    for y in (old.sparse_linear(x, *call), packed(x)):  # both correct before either is timed
                        assert float((y - ref).norm() / ref.norm()) < 1e-5
                    times = best_of(
                        {
                            "dense": lambda: torch.nn.functional.linear(x, weight),
                            "old": lambda: old.sparse_linear(x, *call),
                            "new": lambda: packed(x),
                        }
                    )
                row = {"shape": f"{out_f}x{in_f}", "sparsity": pct / 100}
                for name, (wall, cpu) in times.items():
                    row[f"{name}_ms"], row[f"{name}_cpu_ms"] = wall * 1e3, cpu * 1e3
                row["new_over_old"] = times["old"][0] / times["new"][0]
                row["new_over_dense"] = times["dense"][0] / times["new"][0]
                row["old_over_dense"] = times["dense"][0] / times["old"][0]
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"old": old_rev.stdout.decode().strip(), "path": path_name, "threads": torch.get_num_threads()}
    result["rows"] = rows
    atomic_write_text(OUT.with_suffix(".json"), json.dumps(result, indent=2) + "\n", overwrite=True)
    lines = [
        "# Decode kernel: this checkout against the kernel at " + result["old"],
        "",
        f"Path `{path_name}`, {result['threads']} threads, batch 1, best of 7 rounds of 10 calls, old / new / "
        "dense interleaved in one process (CPU ms = process CPU time per call).",
        "",
        "| shape | sparsity | dense ms (CPU) | old ms (CPU) | new ms (CPU) | new / old speed | new vs dense | old vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['sparsity']:.2f} | {r['dense_ms']:.2f} ({r['dense_cpu_ms']:.2f}) | "
            f"{r['old_ms']:.2f} ({r['old_cpu_ms']:.2f}) | {r['new_ms']:.2f} ({r['new_cpu_ms']:.2f}) | "
            f"{r['new_over_old']:.2f}x | {r['new_over_dense']:.2f}x | {r['old_over_dense']:.2f}x |"
        )
    atomic_write_text(OUT.with_suffix(".md"), "\n".join(lines) + "\n", overwrite=True)


if __name__ == "__main__":
    main()
