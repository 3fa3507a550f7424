"""How a job's work is divided among ranks: calibration windows by whole batches, OBS solves by estimated cost.

Pure functions of counts and shapes, so every rank computes the same division without talking to the others.
"""

from __future__ import annotations

from typing import Mapping

__all__ = ["deal_layers", "solve_cost", "window_share"]


def window_share(count: int, batch_size: int, rank: int, world_size: int) -> slice:
    """The windows of ``rank``: a contiguous run of whole batches of the single-process run (batch b holds
    windows b*batch_size .. (b+1)*batch_size - 1), so each forward pass and each batch sum is the one a single
    process computes. With fewer batches than ranks, windows are split one by one instead (results then match a
    single process up to float rounding); a rank may get none."""
    batches = -(-count // batch_size)
    if batches >= world_size:
        first, last = batches * rank // world_size, batches * (rank + 1) // world_size
        return slice(first * batch_size, min(last * batch_size, count))
    return slice(count * rank // world_size, count * (rank + 1) // world_size)


def solve_cost(shape: tuple[int, int]) -> float:
    """Multiply-adds of one OBS solve of a (rows, cols) weight: the factor of H^-1 (cols^3 / 3 for the Cholesky
    and as much for the triangular inverse) and the lazy column updates (rows * cols^2 / 2)."""
    rows, cols = shape
    return 2 * cols**3 / 3 + rows * cols**2 / 2


def deal_layers(shapes: Mapping[str, tuple[int, int]], world_size: int) -> dict[str, int]:
    """Layer name -> the rank that solves it: the costliest layer first, each to the least-loaded rank (lowest
    rank on ties), so every rank computes the same assignment. A LLaMA block has 7 layers, the down projection
    ~40% of the work: with 8 ranks a block's solve time is bounded by that one layer."""
    load = [0.0] * world_size
    owners: dict[str, int] = {}
    order = sorted(shapes, key=lambda name: (-solve_cost(shapes[name]), list(shapes).index(name)))
    for name in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += solve_cost(shapes[name])
    return {name: owners[name] for name in shapes}
