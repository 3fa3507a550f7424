"""Accumulators (start / add a batch / finish) for the statistics the pruning methods need.

Both are sums over every calibration token, so batching does not change the result (and a run split over
several processes sums each process's accumulator, see ``summands``):
- ``SquaredNorm``: ||X_j||_2^2 per input feature j (Wanda's activation norm, squared).
- ``Gram``: X^T X (SparseGPT's Hessian up to the factor 2/n, which OBS is invariant to apart from the
  dampening, which is relative to the mean diagonal anyway). Its diagonal is ``SquaredNorm``.
- ``ChannelSum``: sum_t x_tj per input feature j; with the squared norm it gives DSnoT's per-input mean and
  variance.
- ``Combined``: several of them fed by one hook, for a layer whose methods need more than one (SparseGPT
  followed by DSnoT needs the Gram and the channel sum); ``part(stat, kind)`` picks one out.
"""

from __future__ import annotations

import functools

import torch


def flatten_inputs(x: torch.Tensor) -> torch.Tensor:
    """(batch, seq, features) or (tokens, features) -> (tokens, features), in fp32."""
    return x.reshape(-1, x.shape[-1]).float()


class InputStatistic:
    """Base class: ``add`` takes a layer input of any leading shape."""

    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def squared_norm(self) -> torch.Tensor:
        """||X_j||^2 for every input feature j."""
        raise NotImplementedError

    def summands(self) -> list[torch.Tensor]:
        """The tensors that are sums over calibration tokens, to be summed in place over the ranks of a
        distributed run (``tokens`` is summed beside them). A new statistic must list all of its state here."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to sum it over ranks (summands())")

    @classmethod
    def neutral(cls, features: int, device: torch.device | str) -> "InputStatistic":
        """The statistic of inputs that say nothing: every feature equally large and uncorrelated with the
        others. It stands in for a matrix that received no calibration token (an expert the router never
        chose), which makes the data-aware methods magnitude pruning within their own comparison scope:
        Wanda's |W| * 1 per output row; SparseGPT's OBS with H = I, whose saliency is w^2 and whose
        weight update is zero."""
        raise NotImplementedError(f"{cls.__name__} has no neutral statistic for matrices without inputs")


class SquaredNorm(InputStatistic):
    """Each batch's column sum is taken in fp32 and added into an fp64 total. Adding fp32 numbers in fp64 is
    exact while their exponents span less than 2^29 in ratio (53 - 24 bits), which batch sums of squares of the
    same feature always do: the total is then the same whatever the order of the batches, so a run whose
    batches are split over several processes gets bit-identical norms, and Wanda bit-identical masks."""

    def __init__(self, features: int, device: torch.device | str):
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype == torch.float32:
            # a plain column sum: vector_norm over dim 0 took 7x longer on a CPU (18 ms against 2.6 ms for a
            # 2048 x 1536 batch, ~10 s over SmolLM2's pruning)
            self.sum += (flat * flat).sum(dim=0)
        else:  # fp32 accumulation without materialising an fp32 copy of a half-precision batch
            self.sum += torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square()
        self.tokens += flat.shape[0]

    def squared_norm(self) -> torch.Tensor:
        return self.sum.float()  # the exact total, rounded once

    def summands(self) -> list[torch.Tensor]:
        return [self.sum]

    @classmethod
    def neutral(cls, features: int, device: torch.device | str) -> "SquaredNorm":
        stat = cls(features, device)
        stat.sum.fill_(1.0)
        return stat


class Gram(InputStatistic):
    """X^T X, accumulated as its lower triangle in row panels: with the features cut into k panels, panel i
    multiplies its columns by every column up to its end, (k + 1) / 2k of the multiply-adds of the full product
    (9/16 for k = 8). This sum is most of SparseGPT's cost beyond the forward passes (for an MLP's down
    projection, 2048 x 1536 inputs per batch, the full product takes 70 ms and the projection itself 25 ms; the
    panels take 43 ms). BLAS ``syrk`` would halve it, but scipy's OpenBLAS threads and torch's OpenMP threads
    then take turns spinning on the same cores: measured on 2 cores, SparseGPT's pruning got 30 s slower."""

    def __init__(self, features: int, device: torch.device | str, sink_weight: float = 1.0):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.sink_weight = sink_weight
        self._lower_only = False  # True while the strict upper triangle of ``sum`` is stale
        self.derived: dict = {}  # what methods compute from the finished sum (the inverse factor), kept once
        panels = _PANELS if features >= _PANELS * _MIN_PANEL else max(1, features // _MIN_PANEL)
        self._edges = [round(i * features / panels) for i in range(panels + 1)]

    def add(self, x: torch.Tensor) -> None:
        flat = flatten_inputs(x) if self.sink_weight == 1 or x.dim() != 3 else _sink_weighted(x, self.sink_weight)
        if flat.device.type == "cpu" and len(self._edges) > 2:
            for low, high in zip(self._edges, self._edges[1:]):
                self.sum[low:high, :high].addmm_(flat[:, low:high].T, flat[:, :high])
            self._lower_only = True
        else:  # on a GPU the full product is cheap next to the rest, and one kernel beats several
            self.sum.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]
        self.derived.clear()

    def total(self) -> torch.Tensor:
        """The full symmetric X^T X."""
        if self._lower_only:
            self.sum.copy_(torch.tril(self.sum) + torch.tril(self.sum, diagonal=-1).T)
            self._lower_only = False
        return self.sum

    def squared_norm(self) -> torch.Tensor:
        return self.sum.diagonal().clone()

    def summands(self) -> list[torch.Tensor]:
        # summed in fp32 (an fp64 copy of a 28672-wide Gram would be 6.6 GB): the order of the sum over ranks
        # changes the last bits, so SparseGPT agrees with a single process up to float rounding, not bit for bit
        self.derived.clear()
        return [self.total()]

    @classmethod
    def neutral(cls, features: int, device: torch.device | str) -> "Gram":
        stat = cls(features, device)
        stat.sum.fill_diagonal_(1.0)
        return stat

    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = 2/n X^T X (n = calibration tokens)."""
        return self.total() * (2.0 / max(self.tokens, 1))


def _sink_weighted(x: torch.Tensor, weight: float) -> torch.Tensor:
    """The (tokens, features) rows of a (batch, seq, features) input, each window's first token scaled by
    sqrt(``weight``), so that it counts ``weight`` times in X^T X.

    Why: the first position of a window is the attention sink of LLaMA-style models. Every later token attends
    to it, yet it is one token in ``seq`` of the Hessian, in a direction of the inputs that the other tokens
    barely span; GPTQ's compensation then moves rounding error into exactly that direction. Measured on
    SmolLM2-135M (Q4_0, plain GPTQ): every layer's output error is below round-to-nearest's on held-out text
    (median 0.35-0.81 of it), but at the first position 5x above it on q/k/v, and the model's perplexity is
    6% worse than round-to-nearest's; with the sink counted 64 times it is 7% better
    (docs/quantization.md). Inputs without a sequence axis (routed expert tokens) are left as they are."""
    flat = x.float().clone()
    flat[:, 0] *= weight**0.5
    return flat.reshape(-1, x.shape[-1])


class ChannelSum(InputStatistic):
    """sum_t x_tj per input feature j (DSnoT's E[x_j] once divided by the token count)."""

    def __init__(self, features: int, device: torch.device | str):
        # an fp64 total of fp32 batch sums, as for SquaredNorm: exact, so the split over ranks cannot change it
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        self.sum += flat.sum(dim=0, dtype=torch.float32).double()
        self.tokens += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    def summands(self) -> list[torch.Tensor]:
        return [self.sum]


class Combined(InputStatistic):
    """Several accumulators of one input, each fed every batch once (one hook, one owner)."""

    def __init__(self, parts: list[InputStatistic]):
        self.parts = {type(p): p for p in parts}

    @property
    def tokens(self) -> int:  # type: ignore[override]
        return next(iter(self.parts.values())).tokens

    @tokens.setter
    def tokens(self, value: int) -> None:  # a reduction over ranks sets the summed count
        for p in self.parts.values():
            p.tokens = value

    def add(self, x: torch.Tensor) -> None:
        for p in self.parts.values():
            p.add(x)

    def summands(self) -> list[torch.Tensor]:
        return [t for p in self.parts.values() for t in p.summands()]

    def squared_norm(self) -> torch.Tensor:
        for p in self.parts.values():
            if not isinstance(p, ChannelSum):
                return p.squared_norm()
        raise TypeError("no accumulator in this combination holds the squared norm")


def statistic_factory(kinds: tuple[type[InputStatistic], ...], sink_weight: float = 1.0):
    """(features, device) -> accumulator: the kind itself when there is one, else a ``Combined`` of all;
    ``sink_weight`` goes to the ``Gram`` (see ``_sink_weighted``)."""
    if sink_weight != 1:
        kinds = tuple(functools.partial(Gram, sink_weight=sink_weight) if k is Gram else k for k in kinds)
    if len(kinds) == 1:
        return kinds[0]
    return lambda features, device: Combined([kind(features, device) for kind in kinds])


def part(stat: InputStatistic | None, kind: type[InputStatistic]) -> InputStatistic | None:
    """The ``kind`` accumulator inside ``stat`` (``stat`` itself when it is one); None when absent."""
    if stat is None or isinstance(stat, kind):
        return stat
    if isinstance(stat, Combined):
        return next((p for p in stat.parts.values() if isinstance(p, kind)), None)
    return None


#: Row panels of the Gram matrix on a CPU, and the narrowest panel worth a call of its own.
_PANELS = 8
_MIN_PANEL = 64
