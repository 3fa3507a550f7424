"""Measuring what 2:4 sparsity buys at inference: dense versus semi-structured sparse, per layer and end to end.

The original code's "Speedup Evaluation": each linear layer's matmul ``Y = X W^T`` with X (tokens, in_features), for
decode-sized (1-16 tokens) and prefill-sized (512-8192 tokens) inputs, and the whole model's forward latency.
Layers with the same shape run the same kernels, so each distinct shape is timed once (on the first layer
that has it) and labelled with every layer name that shares it. Before timing, the sparse model's outputs
are checked against the dense model's.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Iterable

import torch
from torch import nn

from ..errors import WandaError
from ..models import find_decoder_layout, find_linears
from ..utils.declare import SettingsMixin, require, require_seed, setting
from .semi_structured import Converter, SparsifyReport, check_24, relative_error, sparsify_linears
from .timing import measure

log = logging.getLogger(__name__)

__all__ = [
    "SpeedupSettings",
    "TokenCounts",
    "LayerTiming",
    "ModelTiming",
    "OutputCheck",
    "SpeedupResult",
    "time_linears",
    "time_model",
    "run_speedup",
    "format_tables",
]


class TokenCounts(tuple):
    """Token counts given as ``1,4,16`` on the command line (or any iterable of ints in Python)."""

    def __new__(cls, values: str | Iterable[int] = ()) -> "TokenCounts":
        if isinstance(values, str):
            try:
                values = [int(v) for v in values.split(",") if v.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated token counts such as 1,4,16; got {values!r}"
                ) from None
            if not values:
                raise argparse.ArgumentTypeError("expected comma-separated token counts such as 1,4,16; got nothing")
        return super().__new__(cls, (int(v) for v in values))

    def __str__(self) -> str:
        return ",".join(map(str, self))


@dataclass(frozen=True)
class SpeedupSettings(SettingsMixin):
    _argument_group_name: ClassVar[str] = "measurement"

    decode_tokens: TokenCounts = setting(
        TokenCounts((1, 2, 4, 8, 16)), "matmul token counts for decode (one new token per sequence in a batch of 1-16)"
    )
    prefill_tokens: TokenCounts = setting(
        TokenCounts((512, 1024, 2048, 4096, 8192)), "matmul token counts for prefill (a prompt of this length)"
    )
    model_tokens: TokenCounts = setting(
        TokenCounts((16, 512, 2048)),
        "sequence lengths of the whole-model forward "
        "(batch 1, no KV cache); lengths beyond the model's context are dropped",
    )
    warmup: int = setting(10, "untimed calls before each linear-layer measurement")
    iters: int = setting(50, "timed calls per matmul")
    model_warmup: int = setting(3, "untimed whole-model forwards before timing")
    model_iters: int = setting(10, "timed whole-model forwards")
    layer_check_tokens: int = setting(64, "random inputs per layer for the per-layer output check")
    model_check_tokens: int = setting(128, "sequence length of the whole-model output check")
    #: Both kernels accumulate in fp32, so the difference is output rounding and summation order (fp16 unit
    #: roundoff 5e-4, bf16 4e-3); a wrong layout gives errors of order 1.
    layer_rtol: float = setting(1e-2, "largest relative error ||Y_sparse - Y_dense|| / ||Y_dense|| of a layer's output")
    model_rtol: float = setting(5e-2, "largest relative error of the logits (rounding compounds over the blocks)")
    seed: int = setting(0, "seed of the random inputs")

    def __post_init__(self) -> None:
        require_seed(self.seed)
        for name in ("decode_tokens", "prefill_tokens", "model_tokens"):
            values = TokenCounts(getattr(self, name))
            self._set(name, values)
            require(bool(values) and min(values) >= 1, f"--{name} must be positive token counts, got {list(values)}")
        require(
            self.iters >= 1 and self.model_iters >= 1 and self.warmup >= 0 and self.model_warmup >= 0,
            "iteration counts must be at least 1 (warm-up counts at least 0)",
        )
        require(self.layer_check_tokens >= 1 and self.model_check_tokens >= 1, "output checks need at least 1 token")
        require(self.layer_rtol > 0 and self.model_rtol > 0, "tolerances must be positive")


@dataclass
class ModelTiming:
    tokens: int
    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


@dataclass
class LayerTiming(ModelTiming):
    layers: str = ""  # short names sharing this shape, e.g. "self_attn.q_proj, self_attn.o_proj"
    shape: tuple[int, int] = (0, 0)  # (out_features, in_features)
    phase: str = ""  # decode or prefill


@dataclass
class OutputCheck:
    worst_layer: str
    worst_layer_error: float
    layer_rtol: float
    logits_error: float
    model_rtol: float
    #: Fraction of positions whose most likely next token is the same (informational).
    top1_agreement: float

    @property
    def passed(self) -> bool:
        return self.worst_layer_error <= self.layer_rtol and self.logits_error <= self.model_rtol


@dataclass
class SpeedupResult:
    backend: str
    device: str
    dtype: str
    settings: dict
    converted_layers: int = 0
    skipped_layers: dict[str, str] = field(default_factory=dict)
    layers: list[LayerTiming] = field(default_factory=list)
    model: list[ModelTiming] = field(default_factory=list)
    check: OutputCheck | None = None
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = [{**asdict(t), "speedup": t.speedup} for t in self.layers]
        out["model"] = [{**asdict(t), "speedup": t.speedup} for t in self.model]
        if self.check is not None:
            out["check"] = {**asdict(self.check), "passed": self.check.passed}
        return out


_BLOCK_INDEX = re.compile(r"^.*?\.\d+\.")


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (the name inside a block)."""
    return _BLOCK_INDEX.sub("", name, count=1)


def _shape_groups(linears: dict[str, nn.Linear]) -> dict[tuple[int, int], list[str]]:
    groups: dict[tuple[int, int], list[str]] = {}
    for name, layer in linears.items():
        groups.setdefault(tuple(layer.weight.shape), []).append(name)
    return groups


@torch.no_grad()
def time_linears(linears: dict[str, nn.Linear], backend: Converter, settings: SpeedupSettings) -> list[LayerTiming]:
    """Dense versus sparse ``F.linear`` for each distinct weight shape and token count (weights stay dense)."""
    out = []
    generator = torch.Generator().manual_seed(settings.seed)
    for shape, names in _shape_groups(linears).items():
        weight = linears[names[0]].weight.detach()
        if backend.problem(weight) is not None:
            continue
        sparse = backend.convert(weight)
        label = ", ".join(dict.fromkeys(_short(n) for n in names))
        for phase, counts in (("decode", settings.decode_tokens), ("prefill", settings.prefill_tokens)):
            for tokens in counts:
                x = torch.randn(tokens, shape[1], generator=generator).to(weight.device, weight.dtype)
                dense = measure(
                    lambda x=x: nn.functional.linear(x, weight), weight.device, settings.warmup, settings.iters
                )
                fast = measure(
                    lambda x=x, w=sparse: nn.functional.linear(x, w), weight.device, settings.warmup, settings.iters
                )
                out.append(LayerTiming(tokens, dense.median_ms, fast.median_ms, label, shape, phase))
                log.debug(
                    "%s %s x %d: dense %.4f ms, sparse %.4f ms", label, shape, tokens, dense.median_ms, fast.median_ms
                )
        del sparse
    return out


def _random_ids(model: nn.Module, tokens: int, device: torch.device, seed: int) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, tokens), generator=generator).to(device)


@torch.no_grad()
def time_model(model: nn.Module, token_counts: tuple[int, ...], settings: SpeedupSettings) -> dict[int, float]:
    """Median forward latency in ms of batch 1 at each sequence length (no KV cache)."""
    device = next(model.parameters()).device
    out = {}
    for tokens in token_counts:
        ids = _random_ids(model, tokens, device, settings.seed)
        out[tokens] = measure(
            lambda: model(input_ids=ids, use_cache=False), device, settings.model_warmup, settings.model_iters
        ).median_ms
    return out


def _context_length(model: nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


@torch.no_grad()
def run_speedup(model: nn.Module, backend: Converter, settings: SpeedupSettings | None = None) -> SpeedupResult:
    """Time ``model``'s linear layers and forward pass dense, convert its decoder linears to 2:4 in place,
    check the outputs, and time again. The model must already be 2:4 sparse (checked first)."""
    settings = settings or SpeedupSettings()
    layout = find_decoder_layout(model)
    linears = {}
    for index, block in enumerate(layout.blocks):
        linears.update(find_linears(block, layout.block_name(index)))
    for name, layer in linears.items():
        check_24(layer.weight, name)
    first = next(iter(linears.values())).weight
    context = _context_length(model)
    model_tokens = tuple(t for t in settings.model_tokens if context is None or t <= context)
    result = SpeedupResult(backend.name, str(first.device), str(first.dtype).removeprefix("torch."), asdict(settings))

    log.info("timing %d distinct linear shapes dense and sparse", len(_shape_groups(linears)))
    result.layers = time_linears(linears, backend, settings)
    check_ids = _random_ids(model, settings.model_check_tokens, first.device, settings.seed + 1)
    dense_logits = model(input_ids=check_ids, use_cache=False).logits.float()
    dense_ms = time_model(model, model_tokens, settings)

    report: SparsifyReport = sparsify_linears(linears, backend, settings.layer_check_tokens, settings.seed)
    result.converted_layers, result.skipped_layers = len(report.converted), report.skipped
    if not report.converted:
        raise WandaError(f"no linear layer could be converted: {next(iter(report.skipped.values()))}")
    sparse_logits = model(input_ids=check_ids, use_cache=False).logits.float()
    worst, worst_error = report.max_layer_error
    agreement = float((sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    result.check = OutputCheck(
        worst,
        worst_error,
        settings.layer_rtol,
        relative_error(sparse_logits, dense_logits),
        settings.model_rtol,
        agreement,
    )
    del dense_logits, sparse_logits
    sparse_ms = time_model(model, model_tokens, settings)
    result.model = [ModelTiming(t, dense_ms[t], sparse_ms[t]) for t in model_tokens]
    return result


def format_tables(result: SpeedupResult, title: str = "") -> str:
    """Markdown: the output check, per-layer matmul times, and whole-model latency."""
    lines = [f"### {title}", ""] if title else []
    lines.append(
        f"Backend {result.backend}, {result.dtype}, {result.device}"
        + (f" ({result.environment['gpu']})" if result.environment.get("gpu") else "")
        + f"; {result.converted_layers} linear layers converted, {len(result.skipped_layers)} left dense."
    )
    if result.check is not None:
        c = result.check
        lines += [
            "",
            f"Output check {'passed' if c.passed else 'FAILED'}: worst layer {c.worst_layer} relative error "
            f"{c.worst_layer_error:.2e} (tolerance {c.layer_rtol:g}); logits relative error {c.logits_error:.2e} "
            f"(tolerance {c.model_rtol:g}); top-1 agreement {100 * c.top1_agreement:.1f}%.",
        ]
    if result.layers:
        lines += [
            "",
            "| layers | out x in | phase | tokens | dense ms | sparse ms | speed-up |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for t in result.layers:
            lines.append(
                f"| {t.layers} | {t.shape[0]}x{t.shape[1]} | {t.phase} | {t.tokens} | {t.dense_ms:.4f} | "
                f"{t.sparse_ms:.4f} | {t.speedup:.2f}x |"
            )
    if result.model:
        lines += ["", "| whole model, tokens | dense ms | sparse ms | speed-up |", "|---:|---:|---:|---:|"]
        for t in result.model:
            lines.append(f"| {t.tokens} | {t.dense_ms:.3f} | {t.sparse_ms:.3f} | {t.speedup:.2f}x |")
    return "\n".join(lines) + "\n"
