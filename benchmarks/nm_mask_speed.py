"""Micro-benchmark: vectorised N:M mask selection against the original loop over column groups.

The original code walks the columns in steps of M and calls ``topk`` on each (rows x M) slice; ours reshapes to
(rows, cols/M, M) and selects in one call. Writes benchmarks/results/nm_mask_speed.{json,md}.
"""

from __future__ import annotations

import json
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


def best_of(fn, repeats: int = 3, clock=time.process_time) -> float:
    """Best of ``repeats``, in CPU seconds of this process by default: on a shared machine wall time
    mostly measures the neighbours."""
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    rows, cols = 4096, 11008
    scores = torch.randn(rows, cols).abs()
    results = []
    for n, m in ((2, 4), (4, 8)):
        assert torch.equal(nm_mask(scores, n, m), loop_nm_mask(scores, n, m)), "both select the same weights"
        ours = best_of(lambda: nm_mask(scores, n, m))
        loop = best_of(lambda: loop_nm_mask(scores, n, m))
        ours_wall = best_of(lambda: nm_mask(scores, n, m), clock=time.perf_counter)
        loop_wall = best_of(lambda: loop_nm_mask(scores, n, m), clock=time.perf_counter)
        results.append({"pattern": f"{n}:{m}", "shape": [rows, cols], "vectorised_cpu_s": ours, "loop_topk_cpu_s": loop,
                        "speedup_cpu": loop / ours, "vectorised_wall_s": ours_wall, "loop_topk_wall_s": loop_wall,
                        "speedup_wall": loop_wall / ours_wall, "threads": torch.get_num_threads()})
    lines = ["| pattern | matrix | vectorised CPU s | loop of topk CPU s | speed-up (CPU) | speed-up (wall) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['pattern']} | {rows}x{cols} | {r['vectorised_cpu_s']:.3f} | {r['loop_topk_cpu_s']:.3f} | "
              f"{r['speedup_cpu']:.1f}x | {r['speedup_wall']:.1f}x |" for r in results]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nm_mask_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "nm_mask_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
