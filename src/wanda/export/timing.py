"""Timing GPU work with CUDA events (host clocks would time the launch, not the kernel).

On a CPU device the same helper falls back to ``time.perf_counter``, so the measuring code is exercised by
the CPU tests; CPU numbers are not what the speed-up tables report.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timing", "measure"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over ``iters`` timed calls after ``warmup`` untimed ones."""

    median_ms: float
    min_ms: float
    iters: int


@torch.no_grad()
def measure(fn: Callable[[], object], device: torch.device, warmup: int = 10, iters: int = 50) -> Timing:
    """Time ``fn()`` on ``device``: each call between its own pair of CUDA events, summarised by the median."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters} and {warmup}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in pairs:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in pairs]
    else:
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return Timing(statistics.median(times), min(times), iters)
