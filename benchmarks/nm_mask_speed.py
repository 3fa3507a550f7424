"""Micro-benchmark: vectorised N:M mask selection against the original loop over column groups.

The original code walks the columns in steps of M and calls ``topk`` on each (rows x M) slice; ours finds the
n-th smallest of every group with a min/max selection network over whole planes of the matrix, in cache-sized
row chunks. Measured with one thread and with all of them. Writes benchmarks/results/nm_mask_speed.{json,md}.

    python benchmarks/nm_mask_speed.py
"""

from __future__ import annotations

import json
import os
import time

import torch
from common import RESULTS

from wanda.masks import nm_mask


def loop_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for start in range(0, scores.shape[1], m):
        group = scores[:, start : start + m].float()
        mask.scatter_(1, start + torch.topk(group, n, dim=1, largest=False)[1], True)
    return mask


def best_of(fn, repeats: int = 10) -> float:
    """Best wall time of ``repeats``: the least disturbed by other work on a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    rows, cols = 4096, 11008
    scores = torch.randn(rows, cols).abs()
    results = []
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for n, m in ((2, 4), (4, 8)):
            assert torch.equal(nm_mask(scores, n, m), loop_nm_mask(scores, n, m)), "both select the same weights"
            ours = best_of(lambda: nm_mask(scores, n, m))
            loop = best_of(lambda: loop_nm_mask(scores, n, m))
            results.append(
                {
                    "pattern": f"{n}:{m}",
                    "shape": [rows, cols],
                    "threads": threads,
                    "vectorised_s": ours,
                    "loop_topk_s": loop,
                    "speedup": loop / ours,
                    "load_average": list(os.getloadavg()),
                }
            )
    lines = [
        f"N:M mask selection for a {rows}x{cols} score matrix, best wall time of 10 (torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs).",
        "",
        "| pattern | threads | vectorised s | loop of topk s | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['pattern']} | {r['threads']} | {r['vectorised_s']:.3f} | {r['loop_topk_s']:.3f} | {r['speedup']:.1f}x |"
        for r in results
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nm_mask_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "nm_mask_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
