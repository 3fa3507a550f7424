"""One pruning job over several processes ("ranks") through ``torch.distributed``, as started by ``torchrun`` or
``accelerate launch`` (both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``).

Without a launcher ``init_ranks`` returns ``SINGLE``, whose methods do nothing, and the job is unchanged.
Under one, the block walk calls these hooks (``wanda.pruning.prune.prune`` shows where):

- ``local_windows``: each rank takes a contiguous share of the single-process run's calibration *batches*, so
  every forward pass sees exactly the tensors it would see in one process, and produces the next block's inputs
  for its own windows only;
- ``reduce``: after a block's calibration forwards and before any mask is chosen, every statistic is summed over
  the ranks; each rank then holds the statistics of all windows. Wanda's squared norms are fp64 sums of fp32
  batch sums, which is exact, so masks are bit-identical to one process; Gram matrices are summed in fp32;
- ``assign`` / ``share``: for the methods that update weights (the OBS ones) the block's layers are dealt to the
  ranks by estimated cost, each rank solves its own, and the new weights are broadcast from their solver;
  mask-only methods are recomputed by every rank (cheaper than sending weights);
- ``agreed``: a step that may fail on one rank only (a bad flag or path, a singular Hessian) runs inside it;
  the ranks then exchange what went wrong and all raise the same ``WandaError`` (exit code 2 in the CLI), so no
  rank is left waiting at a collective. A rank that dies breaks the others' next collective (gloo: at once;
  NCCL: after ``--dist_timeout``), which ends them with one message naming the step;
- ``eval_share`` / ``sum_nll``: evaluation windows divided over the ranks, losses summed
  (``wanda.eval.perplexity.ranked_perplexity``).

A streamed run (``--offload``, ``wanda.pruning.streamed.prune_streamed``) goes through the same hooks: every rank
streams each block and walks its own windows through it; one rank per machine (``node_writer``) saves the
pruned blocks, each rank its own hidden states, and the ranks agree where a restart resumes.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..errors import WandaError
from .launch import LAUNCH_VARIABLES, DistributedSettings, launched
from .shares import deal_layers, window_share

if TYPE_CHECKING:
    from ..stats import InputStatistic

__all__ = ["DistributedSettings", "Ranks", "SINGLE", "init_ranks", "launched", "window_share", "deal_layers"]

log = logging.getLogger(__name__)


class Ranks:
    """This process's place in the job and the collectives the block walk needs. ``SINGLE`` (one process) makes
    every method a no-op, so the single-process run goes through the same code with nothing added."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        device: torch.device | None = None,
        timeout: float = DistributedSettings.dist_timeout,
    ):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device  # this rank's device; None for SINGLE (the caller's --device decides)
        self.timeout = timeout
        self.group: Any = None  # the process group of the collectives: None is torch's default group
        #: seconds spent inside collectives, waiting for slower ranks included (for the scaling benchmark)
        self.collective_seconds = 0.0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes logs, results and the saved model."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def use_timeout(self, seconds: float) -> None:
        """Collectives from now on wait at most ``seconds`` (``--dist_timeout``, known only once the flags are
        read, after the default group exists): a group over all ranks with that timeout replaces it."""
        if self.distributed and seconds != self.timeout:
            with self._collective("setting --dist_timeout"):
                self.group = dist.new_group(timeout=timedelta(seconds=seconds))
            self.timeout = seconds

    def select_device(self, requested: str | None) -> torch.device | None:
        """This rank's device for the job's ``--device``: GPU ``LOCAL_RANK`` for ``auto`` (when there is one)
        or ``cuda``/``cuda:N`` (one process per GPU, whatever N), the CPU for ``cpu``. ``None`` in one process,
        where ``--device`` means what it always does."""
        if not self.distributed:
            return None
        wants_cuda = (requested in (None, "auto") and torch.cuda.is_available()) or str(requested).startswith("cuda")
        if wants_cuda:
            if self.local_rank >= torch.cuda.device_count():
                raise WandaError(
                    f"LOCAL_RANK {self.local_rank} but {torch.cuda.device_count()} GPUs are visible: "
                    "start at most one process per GPU (torchrun --nproc_per_node)"
                )
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        elif requested in (None, "auto", "cpu"):
            self.device = torch.device("cpu")
        else:
            raise WandaError(f"--device {requested!r} is not cpu, cuda or auto")
        return self.device

    # ---- the hooks of the block walk ----------------------------------------------------------------------

    def local_windows(self, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's calibration windows (see ``window_share``); every rank must get at least one, since a
        rank without inputs would have no statistics to sum."""
        if not self.distributed:
            return ids
        if ids.shape[0] < self.world_size:
            raise WandaError(
                f"{ids.shape[0]} calibration windows cannot be split over {self.world_size} ranks; "
                f"use --nsamples {self.world_size} or more"
            )
        if -(-ids.shape[0] // batch_size) < self.world_size:
            log.warning(
                "%d calibration windows in batches of %d are fewer batches than the %d ranks: windows are "
                "split one by one, so results match one process up to float rounding only; lower "
                "--batch_size for bit-identical masks",
                ids.shape[0],
                batch_size,
                self.world_size,
            )
        return ids[window_share(ids.shape[0], batch_size, self.rank, self.world_size)]

    def reduce(
        self, stats: dict[str, InputStatistic], factory: Callable[[int, torch.device], InputStatistic] | None = None
    ) -> None:
        """Sum each statistic (its ``summands()`` and ``tokens``) over the ranks, in place. Called after a
        block's calibration forwards and before its masks are chosen.

        The ranks first agree on the names: a statistic exists only where its layer read a token, so an expert
        that the router chose on one rank and not on another is known to the first only. The others add it
        from ``factory`` with nothing accumulated (zero sums, zero tokens: the sum's identity), so every rank
        reduces the same list; an expert no rank fed ends with no statistic anywhere (the no-token rule)."""
        if not self.distributed:
            return
        features = {name: stat.summands()[0].shape[0] for name, stat in stats.items()}
        union: dict[str, int] = {}
        for part in self._gather(features, "summing a block's statistics"):
            union.update(part)
        missing = sorted(set(union) - set(stats))
        if missing:
            if factory is None:
                raise WandaError(f"rank {self.rank} has no statistic for {missing[0]} and no way to make one")
            device = next((s.summands()[0].device for s in stats.values()), self.device or torch.device("cpu"))
            for name in missing:
                stats[name] = factory(union[name], device)
        if not stats:
            return
        names = sorted(stats)  # the same order on every rank
        tensors = [t for name in names for t in stats[name].summands()]
        tokens = torch.tensor([stats[name].tokens for name in names], dtype=torch.int64, device=tensors[0].device)
        with self._collective("summing a block's statistics"):
            works = [dist.all_reduce(t, group=self.group, async_op=True) for t in tensors + [tokens]]
            for work in works:
                work.wait()
        for name, count in zip(names, tokens.tolist()):
            stats[name].tokens = int(count)

    def assign(self, linears: Mapping[str, nn.Linear], updates_weights: bool) -> dict[str, int]:
        """Layer name -> the rank that prunes it: this rank for everything unless the method's weight update is
        worth spreading (``MethodSpec.updates_weights``)."""
        if not self.distributed or not updates_weights:
            return {name: self.rank for name in linears}
        return deal_layers({name: tuple(layer.weight.shape) for name, layer in linears.items()}, self.world_size)

    def share(
        self, linears: Mapping[str, nn.Linear], owners: Mapping[str, int], notes: dict[str, Any]
    ) -> dict[str, Any]:
        """Broadcast each layer's new weight from the rank that solved it; ``notes`` (name -> a picklable
        record of the solve, held by its solver) are merged so that every rank has all of them."""
        if not self.distributed or all(owner == self.rank for owner in owners.values()):
            return notes
        views = {name: linears[name].weight.data for name in linears}
        # a fused expert's slice can be a strided view (gpt-oss: transposed, gate and up interleaved): it is sent
        # and received through a contiguous copy, then written back in place
        buffers = {name: view if view.is_contiguous() else view.contiguous() for name, view in views.items()}
        with self._collective("sending the solved weights"):
            works = [
                dist.broadcast(buffers[name], src=owners[name], group=self.group, async_op=True) for name in linears
            ]
            for work in works:
                work.wait()
        for name, view in views.items():
            if buffers[name] is not view:
                view.copy_(buffers[name])
        merged: dict[str, Any] = {}
        for part in self._gather(notes, "sending the solved weights"):
            merged.update(part)
        return merged

    @contextmanager
    def agreed(self, step: str) -> Iterator[None]:
        """Run a step that has no collective inside it; then every rank learns whether any rank failed, and if
        one did, all raise the same error: a ``WandaError`` with the first failing rank's message (with its rank
        when not every rank failed alike). A rank whose failure is not a ``WandaError`` re-raises its own
        exception, with its traceback, and the others report it in one line."""
        if not self.distributed:
            yield
            return
        failure: BaseException | None = None
        try:
            yield
        except (Exception, SystemExit) as exc:  # SystemExit: an argument parser that already printed its message
            if isinstance(exc, SystemExit) and not exc.code:
                raise
            failure = exc
        mine = None if failure is None else _describe(failure)
        reports = self._gather(mine, step)
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return
        rank, (kind, message) = failed[0]
        if kind not in ("WandaError", "SystemExit") and rank == self.rank:
            raise failure  # this rank's own unexpected failure: keep its traceback
        if kind not in ("WandaError", "SystemExit"):
            message = f"rank {rank} failed while {step}: {kind}: {message}"
        elif len(failed) < self.world_size or any(report != failed[0][1] for _, report in failed):
            message = f"{message} (on rank {rank} of {self.world_size})"
        raise WandaError(message) from failure

    # ---- evaluation ---------------------------------------------------------------------------------------

    def eval_share(self, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's evaluation windows: whole batches, as for calibration; possibly none."""
        if not self.distributed:
            return windows
        return windows[window_share(windows.shape[0], batch_size, self.rank, self.world_size)]

    def sum_nll(self, nll: float, tokens: int) -> tuple[float, int]:
        """The negative log-likelihood and token count summed over the ranks (fp64)."""
        if not self.distributed:
            return nll, tokens
        totals = torch.tensor([nll, float(tokens)], dtype=torch.float64, device=self.device)
        with self._collective("summing the perplexity"):
            dist.all_reduce(totals, group=self.group)
        return totals[0].item(), int(totals[1].item())

    def gather(self, obj: Any, step: str) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
        return self._gather(obj, step) if self.distributed else [obj]

    @property
    def node_writer(self) -> bool:
        """The one rank per machine (``LOCAL_RANK`` 0) that writes a streamed run's pruned blocks into the work
        folder: every rank of the machine reads them back to evaluate, and a folder on a disk of each machine
        and a folder shared by all of them both work (identical files, each written atomically)."""
        return self.local_rank == 0

    # ---- plumbing ----------------------------------------------------------------------------------------

    def _gather(self, obj: Any, step: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        with self._collective(step):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    @contextmanager
    def _collective(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as exc:  # gloo: a peer's socket closed; NCCL: DistBackendError after the timeout
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WandaError(
                f"rank {self.rank} lost the other ranks while {step} ({first}): another rank died or "
                f"waited longer than --dist_timeout ({self.timeout:g} s); its output says why"
            ) from exc
        finally:
            self.collective_seconds += time.perf_counter() - start

    def barrier(self) -> None:
        if self.distributed:
            with self._collective("waiting for the other ranks"):
                dist.barrier(group=self.group)

    def close(self) -> None:
        """Leave the process group (idempotent)."""
        global _JOINED
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
        if _JOINED is self:
            _JOINED = None


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, SystemExit):
        return "SystemExit", "bad command line (the parser's message is above)"
    return type(exc).__name__, str(exc)


#: The single-process run: every hook a no-op.
SINGLE = Ranks()
#: This process's place in a launched job, once joined (the command line joins before it reads the flags, so
#: that a bad flag on one rank reaches all of them; the job then gets the same object back).
_JOINED: Ranks | None = None


def init_ranks(settings: DistributedSettings | None = None, device: str | None = "auto") -> Ranks:
    """Join the launcher's process group, or return ``SINGLE`` when no launcher started this process. Called
    again, it returns the same ``Ranks``, with ``settings.dist_timeout`` applied when ``settings`` are given.

    ``device`` is the job's ``--device``: with ``auto`` or ``cuda`` each rank takes GPU ``LOCAL_RANK`` (NCCL for
    tensors on it, gloo for CPU objects); with ``cpu``, or without a GPU, every rank works on the CPU (gloo).
    """
    global _JOINED
    if not launched():
        return SINGLE
    if _JOINED is not None:
        if settings is not None:
            _JOINED.use_timeout(settings.dist_timeout)
        return _JOINED
    settings = settings or DistributedSettings()
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise WandaError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start the job with torchrun or "
            "accelerate launch, which set all of them"
        )
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    # both backends when there is a GPU (NCCL for tensors on it, gloo for CPU tensors and pickled objects), so
    # that --device can still choose where a rank works after the group exists
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():  # accelerate may have joined already
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=settings.dist_timeout)
        )
    ranks = Ranks(rank, world_size, local_rank, None, settings.dist_timeout)
    ranks.select_device(device)
    _JOINED = ranks
    log.debug("rank %d of %d on %s (%s)", rank, world_size, ranks.device, backend)
    return ranks
