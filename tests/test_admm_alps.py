"""ADMM-Grad (Boza 2024) and ALPS (Meng et al. 2024): their weights are the least-squares weights of their own
support, their reconstruction error is at most SparseGPT's, their sparsity is exact, a singular Hessian makes the
factorisation escalate its dampening (recorded, and logged), and the settings and flags exist."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import one_thread

from wanda import PruneSettings, WandaError
from wanda.masks import prune_count
from wanda.methods import METHOD_SPECS, get_method
from wanda.methods.admm import support_least_squares
from wanda.methods.obs import MAX_PERCDAMP, dampened_cholesky
from wanda.stats import Gram

METHODS = ("admm", "alps")

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _data(rows: int, cols: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs of unequal scales (8 latent directions plus noise), as in test_methods."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    scales = torch.logspace(-0.5, 0.5, cols)[torch.randperm(cols, generator=g)]
    latent = torch.randn(tokens, 8, generator=g) @ torch.randn(8, cols, generator=g) / math.sqrt(8)
    return weight, (latent + 0.3 * torch.randn(tokens, cols, generator=g)) * scales


def _gram(x: torch.Tensor) -> Gram:
    stat = Gram(x.shape[1], "cpu")
    stat.add(x)
    return stat


def _output_error(weight: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return (x.double() @ (weight.double() - new.double()).T).norm().item()


def _lstsq_on_support(weight: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row, argmin ||X w0 - X_S w_S|| (torch.linalg.lstsq), zero off the support S = ~mask."""
    xd, out = x.double(), torch.zeros(weight.shape, dtype=torch.float64)
    for i in range(weight.shape[0]):
        keep = ~mask[i]
        out[i, keep] = torch.linalg.lstsq(xd[:, keep], xd @ weight[i].double()).solution
    return out


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
def test_weights_are_the_least_squares_of_their_support(method, pattern):
    weight, x = _data(8, 16, 200)
    result = get_method(method).prune(
        weight, _gram(x), PruneSettings(prune_method=method, sparsity_type=pattern, percdamp=0.0)
    )
    assert result.damping == 0.0
    expected = _lstsq_on_support(weight, x, result.mask)
    assert _relative(result.weight, expected) < 1e-4
    for row in range(weight.shape[0]):
        assert _relative(result.weight[row], expected[row]) < 1e-4, row


def test_support_least_squares_on_a_fixed_random_support():
    weight, x = _data(8, 16, 200, seed=3)
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    hessian = x.T @ x
    solved = support_least_squares(torch.zeros_like(weight), weight @ hessian, hessian, mask, iterations=40)
    assert solved[mask].eq(0).all()
    expected = _lstsq_on_support(weight, x, mask)
    for row in range(weight.shape[0]):
        assert _relative(solved[row], expected[row]) < 1e-4, row


@pytest.mark.parametrize("pattern, ratio", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)])
def test_reconstruction_error_at_most_sparsegpts(pattern, ratio):
    weight, x = _data(32, 64, 512, seed=2)
    stat = _gram(x)
    errors = {}
    for method in ("sparsegpt",) + METHODS:
        settings = PruneSettings(prune_method=method, sparsity_type=pattern, sparsity_ratio=ratio)
        errors[method] = _output_error(weight, METHOD_SPECS[method].prune(weight.clone(), stat, settings).weight, x)
    for method in METHODS:
        assert errors[method] <= errors["sparsegpt"], errors


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.29])
@pytest.mark.parametrize("method", METHODS)
def test_unstructured_count_is_exact(method, ratio):
    weight, x = _data(7, 20, 64, seed=4)  # 140 weights: floor(ratio * 140) is not a multiple of 7 or of 20
    result = get_method(method).prune(weight, _gram(x), PruneSettings(prune_method=method, sparsity_ratio=ratio))
    assert result.mask.sum().item() == prune_count(ratio, weight.numel())
    assert torch.equal(result.weight == 0, result.mask)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("method", METHODS)
def test_nm_is_exact_in_every_group(method, pattern):
    n, m = map(int, pattern.split(":"))
    weight, x = _data(6, 32, 64, seed=5)
    result = get_method(method).prune(weight, _gram(x), PruneSettings(prune_method=method, sparsity_type=pattern))
    assert result.mask.reshape(6, 32 // m, m).sum(-1).eq(n).all()
    assert torch.equal(result.weight == 0, result.mask)


@pytest.mark.parametrize("method", ("sparsegpt",) + METHODS)
def test_rank_deficient_gram_escalates_the_dampening(method, caplog):
    weight, x = _data(8, 32, 6, seed=6)  # 6 tokens, 32 features: X^T X has rank 6
    stat = _gram(x)
    settings = PruneSettings(prune_method=method, percdamp=0.0)
    with caplog.at_level(logging.WARNING, logger="wanda"):
        result = get_method(method).prune(weight, stat, settings)
    assert result.damping is not None and 0 < result.damping <= MAX_PERCDAMP
    assert stat.derived[("percdamp_used", 0.0)] == result.damping
    assert any("percdamp" in record.getMessage() for record in caplog.records)
    assert torch.isfinite(result.weight).all() and torch.equal(result.weight == 0, result.mask)


def test_dampening_past_its_bound_and_non_finite_hessians_raise():
    indefinite = torch.diag(torch.tensor([3.0, -1.0]))  # mean diagonal 1: even +1.0 leaves a zero pivot
    with pytest.raises(WandaError, match="not positive definite even dampened by 1"):
        dampened_cholesky(indefinite, 0.01)
    with pytest.raises(WandaError, match="non-finite"):
        dampened_cholesky(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), 0.01)
    ok = dampened_cholesky(torch.eye(3) * 2, 0.01)
    assert ok.percdamp == 0.01 and not ok.escalated


def test_factorisations_are_shared_by_layers_of_one_input():
    weight, x = _data(8, 16, 64, seed=7)
    stat = _gram(x)
    for method in METHODS:
        get_method(method).prune(weight, stat, PruneSettings(prune_method=method))
    cached = set(stat.derived)
    for method in METHODS:  # a second matrix reading the same input (q after k) factorises nothing anew
        get_method(method).prune(weight * 2, stat, PruneSettings(prune_method=method))
    assert set(stat.derived) == cached


def test_settings_and_flags():
    for method in METHODS:
        spec = get_method(method)
        assert spec.statistic is Gram and spec.updates_weights
        assert PruneSettings(prune_method=method, sparsity_type="2:4").method == method
    settings = PruneSettings(
        prune_method="alps",
        admm_rho=0.5,
        alps_rho=0.2,
        alps_iterations=30,
        admm_iterations=10,
        admm_ramp_iterations=5,
        support_cg_iterations=10,
    )
    assert settings.to_dict()["alps_rho"] == 0.2
    with pytest.raises(WandaError, match="--admm_rho"):
        PruneSettings(prune_method="admm", admm_rho=0.0)
    # the recorded flags, which test_cli_flags checks against the parsers
    flags = json.loads((Path(__file__).resolve().parent / "data" / "cli_flags.json").read_text())["wanda"]
    for flag in (
        "--admm_rho",
        "--admm_iterations",
        "--admm_ramp_iterations",
        "--alps_rho",
        "--alps_iterations",
        "--support_cg_iterations",
    ):
        assert flag in flags


@pytest.mark.parametrize("method", METHODS)
def test_prune_reports_the_escalated_dampening_per_layer(method):
    """Through ``prune``: 2 windows of 8 tokens (16 samples) for inputs 64 and 128 wide, without dampening: every
    Gram is singular, so every layer reports the dampening its factorisation escalated to."""
    from conftest import calib_ids, tiny_model

    from wanda import prune

    model = tiny_model("llama", num_hidden_layers=1)
    report = prune(model, calib_ids(2, 8), PruneSettings(prune_method=method, percdamp=0.0), progress=False)
    assert report.layers and all(0 < layer.damping <= MAX_PERCDAMP for layer in report.layers)
    assert report.actual_sparsity == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("pattern, ratio", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)])
def test_reconstruction_error_at_most_sparsegpts_on_every_linear_layer_of_smollm2_block_0(
    smollm_block0, pattern, ratio
):
    """The real inputs of SmolLM2-135M's first block, one Gram per input shared by the three methods (as the
    engine shares it): ||X W^T - X What^T|| of ADMM-Grad and of ALPS is at most SparseGPT's on each of the
    seven linear layers."""
    grams: dict[int, Gram] = {}
    for name, (weight, x) in smollm_block0.items():
        if x.data_ptr() not in grams:  # q, k and v (gate and up) read one tensor
            grams[x.data_ptr()] = _gram(x)
        stat = grams[x.data_ptr()]
        errors = {}
        for method in ("sparsegpt",) + METHODS:
            settings = PruneSettings(prune_method=method, sparsity_type=pattern, sparsity_ratio=ratio)
            new = METHOD_SPECS[method].prune(weight.clone(), stat, settings).weight
            errors[method] = _output_error(weight, new, x)
        for method in METHODS:
            assert errors[method] <= errors["sparsegpt"], (name, errors)
