"""Resource measurements reported with results, and giving memory back between phases of a run."""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_run_peak_mb = 0.0  # highest peak seen before any reset_peak_rss(), so a phase reset does not lose it


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB since it started (or since ``reset_peak_rss``, on Linux,
    where the kernel's high-water mark is what ru_maxrss reports)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_peak_rss_mb() -> float:
    """Peak resident memory of the whole process lifetime, across phase resets."""
    return max(_run_peak_mb, peak_rss_mb())


def reset_peak_rss() -> bool:
    """Start a new high-water mark (Linux: ``clear_refs`` 5), so the next ``peak_rss_mb`` is of one phase.
    Returns False where the system cannot (then ``peak_rss_mb`` stays the lifetime peak)."""
    global _run_peak_mb
    _run_peak_mb = run_peak_rss_mb()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def release_memory() -> None:
    """Return freed heap memory to the system (glibc keeps large freed blocks, e.g. of tokenised corpora or
    calibration activations, counted in the resident size until the process ends)."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Only the ``malloc_trim`` of ``release_memory``, without a garbage collection (which costs 0.1-0.4 s
    with transformers loaded): for tensors freed by reference counting, e.g. a streamed block just released."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
