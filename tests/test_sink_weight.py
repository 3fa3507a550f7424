"""The attention sink's weight in the Hessian (``--sink_weight``): each window's first token counted w times in
X^T X, checked against an independent weighted sum, and reaching every Hessian the engine builds."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, calib_ids, one_thread, tiny_model

from wanda import PruneSettings
from wanda.errors import WandaError
from wanda.pruning.prune import prune
from wanda.stats.accumulators import Combined, Gram, SquaredNorm, part, statistic_factory

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _weighted_reference(batches: list[torch.Tensor], weight: float) -> torch.Tensor:
    """sum over windows and positions of c_t x_t x_t^T in float64, c_t = ``weight`` at position 0, else 1."""
    total = 0
    for x in batches:
        c = torch.ones(x.shape[:2], dtype=torch.float64)
        c[:, 0] = weight
        total = total + torch.einsum("bt,bti,btj->ij", c, x.double(), x.double())
    return total


@pytest.mark.parametrize("features", [24, 600])  # 600: the CPU's row-panel accumulation
@pytest.mark.parametrize("weight", [1.0, 0.25, 64.0])
def test_gram_counts_the_first_token_weight_times(features, weight):
    torch.manual_seed(features)
    batches = [torch.randn(2, 7, features), torch.randn(3, 5, features)]
    stat = statistic_factory((Gram,), weight)(features, "cpu")
    for x in batches:
        stat.add(x)
    assert stat.tokens == 2 * 7 + 3 * 5  # the count n of H = 2/n X^T X stays the token count
    expected = _weighted_reference(batches, weight)
    assert_close(stat.total().double(), expected)
    assert_close(stat.hessian().double(), expected * 2 / stat.tokens)
    if weight != 1:  # it is not the plain sum
        plain = _weighted_reference(batches, 1.0)
        assert (stat.total().double() - plain).abs().max() > 1e-3 * plain.abs().max()


def test_weight_one_is_the_plain_sum_bit_for_bit_and_inputs_are_not_touched():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 600)
    copy = x.clone()
    plain, weighted_one, weighted = Gram(600, "cpu"), Gram(600, "cpu", sink_weight=1.0), Gram(600, "cpu", 9.0)
    for stat in (plain, weighted_one, weighted):
        stat.add(x)
    assert torch.equal(plain.total(), weighted_one.total())
    assert torch.equal(x, copy)  # the caller's activations are not scaled in place


def test_inputs_without_a_sequence_axis_are_left_as_they_are():
    """Routed expert tokens arrive flattened: no position is the sink there."""
    torch.manual_seed(1)
    flat = torch.randn(11, 24)
    weighted, plain = Gram(24, "cpu", sink_weight=50.0), Gram(24, "cpu")
    weighted.add(flat)
    plain.add(flat)
    assert torch.equal(weighted.total(), plain.total())


def test_only_the_gram_is_weighted_in_a_combined_statistic():
    torch.manual_seed(2)
    x = torch.randn(2, 6, 24)
    stat = statistic_factory((SquaredNorm, Gram), 16.0)(24, "cpu")
    assert isinstance(stat, Combined)
    stat.add(x)
    assert_close(part(stat, SquaredNorm).squared_norm().double(), x.double().pow(2).sum((0, 1)))
    assert_close(part(stat, Gram).total().double(), _weighted_reference([x], 16.0))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_a_weight_that_is_not_positive_and_finite_is_refused(bad):
    with pytest.raises(WandaError, match="--sink_weight must be a finite number above 0"):
        PruneSettings(prune_method="sparsegpt", sink_weight=bad)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda+gptq"])
def test_the_engine_builds_every_hessian_with_the_weight(method, monkeypatch):
    """Every Gram the engine accumulates is the weighted one: its sum equals the independent weighted sum of
    the very inputs the layer was fed, and the pruned (or quantized) weights differ from the plain run's."""
    from wanda.quant import QuantSettings

    name = method.split("+")[0]
    quant = QuantSettings(wbits=4, groupsize=16, sym=True) if method.endswith("gptq") else None
    fed: dict[int, list[torch.Tensor]] = {}
    grams: dict[int, Gram] = {}
    original = Gram.add

    def spy(self, x):
        fed.setdefault(id(self), []).append(x.detach().clone())
        grams[id(self)] = self
        original(self, x)

    monkeypatch.setattr(Gram, "add", spy)
    results = {}
    for weight in (1.0, 32.0):
        fed.clear()
        grams.clear()
        model = tiny_model("llama")
        settings = PruneSettings(prune_method=name, sparsity_ratio=0.5, sink_weight=weight)
        prune(model, calib_ids(), settings, progress=False, batch_size=4, quant=quant)
        assert grams, "no Hessian was accumulated"
        for key, stat in grams.items():
            assert stat.sink_weight == weight
            assert_close(stat.total().double(), _weighted_reference(fed[key], weight))
        results[weight] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(results[1.0], results[32.0])
