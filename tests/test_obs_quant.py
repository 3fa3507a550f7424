"""Quantizing inside the OBS column loop (SparseGPT and its ablations with ``--wbits``, as the SparseGPT authors'
code does): the mask has exactly the pattern's count, every pruned weight is +0.0, every kept weight decodes
from its own code, the lazy loop equals the plain column-by-column algorithm, the reconstruction is at least as
good as round-to-nearest on the same mask on every layer of SmolLM2's block 0, and the engine uses the joint
loop only where nothing moves the mask afterwards."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close, calib_ids, one_thread, tiny_model

import wanda.pruning.prune as prune_module
from wanda.errors import WandaError
from wanda.masks import prune_count
from wanda.methods import METHOD_SPECS, LayerSettings
from wanda.methods.obs import Rounder, inverse_hessian_factor, obs_prune
from wanda.pruning.prune import check_quantization, prune
from wanda.pruning.prune_settings import PruneSettings
from wanda.quant import Q4_0, Q8_0, GGUFGrid, QuantGrid, QuantSettings, rtn_quantize
from wanda.stats import Gram

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

JOINT = ("sparsegpt", "ablate_mag_seq", "ablate_wanda_iter")
GRIDS = [QuantGrid(4, 32), QuantGrid(3, 128), QuantGrid(8, -1, sym=True), QuantGrid(2, 64), Q4_0, Q8_0]
ROWS, COLS, SAMPLES = 24, 256, 512


def _grid_id(grid) -> str:
    if isinstance(grid, GGUFGrid):
        return grid.kind
    return f"{grid.bits}bit-g{grid.groupsize}-{'sym' if grid.sym else 'asym'}"


def _layer(seed: int = 0, rows: int = ROWS, cols: int = COLS):
    """A random layer and correlated inputs with a few loud channels; (W, X, Gram statistic)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(SAMPLES, cols, generator=g) @ mix
    X[:, :4] *= 5
    stat = Gram(cols, "cpu")
    stat.add(X)
    return torch.randn(rows, cols, generator=g), X, stat


def _joint(method: str, pattern: str, grid, weight: torch.Tensor, stat: Gram, ratio: float = 0.5):
    settings = PruneSettings(prune_method=method, sparsity_type=pattern, sparsity_ratio=ratio)
    layer = dataclasses.replace(settings.layer(), grid=grid)
    return METHOD_SPECS[method].prune(weight.clone(), stat, layer)


@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", JOINT)
def test_joint_loop_keeps_the_count_the_zeros_and_the_grid(method, pattern, grid):
    W, _, stat = _layer()
    result = _joint(method, pattern, grid, W, stat)
    new, mask, params = result.weight, result.mask, result.quant_params
    if pattern == "2:4":
        assert bool((mask.reshape(ROWS, -1, 4).sum(2) == 2).all())
    else:
        assert mask.sum().item() == prune_count(0.5, W.numel())
    assert bool((new[mask] == 0).all()) and not torch.signbit(new[mask]).any()
    g = grid.group_width(COLS)
    assert params is not None and len(params) == -(-COLS // g)
    bits = 4 if grid == Q4_0 else 8 if grid == Q8_0 else grid.bits
    for k, group in enumerate(params):
        block = new[:, k * g : (k + 1) * g]
        decoded = grid.round(block, group)
        assert torch.equal(decoded.masked_fill(mask[:, k * g : (k + 1) * g], 0.0), block), k
        assert all(len(torch.unique(row)) <= 2**bits for row in block), k
    assert result.obs_loss > 0


def _plain_joint_sparsegpt(W, H, grid, blocksize: int, ratio: float, percdamp: float = 0.01):
    """SparseGPT with quantization written plainly (float64): every column updates every later column at once;
    the unstructured mask of each block is its lowest w^2 / U_jj^2 over the block, floor(ratio * weights up to
    the block's end) minus those before it; a group is fitted at its first column from the current weights,
    the block's masked entries counted as 0."""
    rows, cols = W.shape
    U = inverse_hessian_factor(H, percdamp)
    W = W.clone()
    mask = torch.zeros_like(W, dtype=torch.bool)
    g = grid.group_width(cols)
    for j in range(cols):
        if j % blocksize == 0:
            stop = min(j + blocksize, cols)
            score = (W[:, j:stop] / U.diagonal()[j:stop]).square()
            count = prune_count(ratio, rows * stop) - prune_count(ratio, rows * j)
            flat = torch.zeros(score.numel(), dtype=torch.bool)
            flat[score.flatten().argsort()[:count]] = True
            mask[:, j:stop] = flat.reshape(score.shape)
        if j % g == 0:
            p = grid.column(grid.fit(W[:, j : j + g].masked_fill(mask[:, j : j + g], 0.0)))
        q = grid.round(W[:, j], p).masked_fill(mask[:, j], 0.0)
        err = (W[:, j] - q) / U[j, j]
        W[:, j] = q
        W[:, j + 1 :] -= torch.outer(err, U[j, j + 1 :])
    return W.masked_fill(mask, 0.0), mask


# asymmetric grids only: on a symmetric one a group's extreme lies halfway between two codes (test_quant.py)
@pytest.mark.parametrize("grid", [QuantGrid(4, 32), QuantGrid(3, 128), QuantGrid(2, -1)], ids=_grid_id)
@pytest.mark.parametrize("blocksize, lazy", [(128, 32), (64, 7), (32, 1)])
def test_lazy_joint_loop_equals_the_plain_column_loop(grid, blocksize, lazy):
    W, X, _ = _layer(3)
    W, X = W.double(), X.double()
    H = 2 / SAMPLES * X.T @ X
    pattern = PruneSettings().pattern  # unstructured

    def rule(w, d, start):  # SparseGPT's: the lowest w^2 / d^2 of the block, the block's share of the count
        score = (w / d).square().flatten()
        count = prune_count(0.5, ROWS * (start + w.shape[1])) - prune_count(0.5, ROWS * start)
        return torch.zeros_like(score, dtype=torch.bool).index_fill_(0, score.argsort()[:count], True).reshape(w.shape)

    rounder = Rounder(grid)
    new, mask, _ = obs_prune(W, H, pattern, rule, blocksize, 0.01, lazy=lazy, grid=rounder)
    expected, expected_mask = _plain_joint_sparsegpt(W, H, grid, blocksize, 0.5)
    assert new.dtype == torch.float64
    assert torch.equal(mask, expected_mask)
    assert_close(new, expected, rtol=1e-9)
    assert len(rounder.params) == -(-COLS // grid.group_width(COLS))


def test_groups_that_straddle_obs_blocks_are_refused():
    W, _, stat = _layer()
    with pytest.raises(WandaError, match="straddle"):
        _joint("sparsegpt", "unstructured", QuantGrid(4, 96), W, stat)
    settings = PruneSettings(prune_method="sparsegpt", sparsity_ratio=0.5)
    with pytest.raises(WandaError, match="divides 128"):
        check_quantization(settings, QuantSettings(wbits=4, groupsize=96))
    for groupsize in (-1, 32, 128, 256):  # divisors, multiples and one group per row are accepted
        check_quantization(settings, QuantSettings(wbits=4, groupsize=groupsize))
    check_quantization(PruneSettings(prune_method="wanda"), QuantSettings(wbits=4, groupsize=96))  # no loop
    with pytest.raises(WandaError, match="pass --wbits"):
        check_quantization(PruneSettings(prune_method="none"), QuantSettings())


def _error(new: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> float:
    return (x.double() @ (weight.double() - new.double()).T).norm().item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("grid", [QuantGrid(4, 128), Q4_0], ids=_grid_id)
def test_joint_loop_beats_round_to_nearest_on_every_layer_of_smollm2_block_0(smollm_block0, pattern, grid):
    """||X (W - W_hat)^T|| against the dense layer: joint SparseGPT is at most round-to-nearest of SparseGPT's
    own weights on the same mask (the sparse-then-round a user would otherwise do), on each of the seven
    linear layers; and within a few per cent of pruning first and running mask-fixed GPTQ afterwards."""
    from wanda.quant import gptq_quantize

    grams: dict[int, Gram] = {}
    for name, (weight, x) in smollm_block0.items():
        if x.data_ptr() not in grams:
            grams[x.data_ptr()] = Gram(x.shape[1], "cpu")
            grams[x.data_ptr()].add(x)
        stat = grams[x.data_ptr()]
        joint = _joint("sparsegpt", pattern, grid, weight, stat)
        fixed = PruneSettings(prune_method="sparsegpt", sparsity_type=pattern, sparsity_ratio=0.5).layer()
        same_mask = obs_prune(weight, stat.hessian(), fixed.pattern, lambda w, d, s: joint.mask[:, s : s + w.shape[1]])
        rtn = rtn_quantize(same_mask[0], grid, mask=joint.mask)
        assert torch.equal(same_mask[1], joint.mask)
        assert _error(joint.weight, weight, x) <= _error(rtn, weight, x), name
        # the two-pass alternative: SparseGPT's own mask and update, then GPTQ with that mask fixed
        plain = METHOD_SPECS["sparsegpt"].prune(weight.clone(), stat, fixed)
        two_pass, _ = gptq_quantize(plain.weight, stat.hessian(), grid, mask=plain.mask)
        assert _error(joint.weight, weight, x) <= 1.05 * _error(two_pass, weight, x), name


def test_engine_quantizes_sparsegpt_in_its_loop_and_others_after(monkeypatch):
    """SparseGPT's matrices come from the joint loop (the post-pass is never called); with DSnoT after it, which
    moves the mask, the matrices it follows go through the mask-fixed post-pass instead."""
    calls: list[str] = []
    real = prune_module._quantize

    def spy(weight, mask, *rest):
        calls.append("post")
        return real(weight, mask, *rest)

    monkeypatch.setattr(prune_module, "_quantize", spy)
    quant = QuantSettings(wbits=4, groupsize=32)
    model = tiny_model("llama")
    report = prune(model, calib_ids(), PruneSettings(prune_method="sparsegpt"), progress=False, quant=quant)
    assert calls == [] and len(report.quantized) == len(report.layers) == 14
    for layer in report.layers:
        assert layer.quant_loss == layer.obs_loss
    model = tiny_model("llama")
    settings = PruneSettings(prune_method="sparsegpt", dsnot=True)
    report = prune(model, calib_ids(), settings, progress=False, quant=quant)
    followed = [l.name for l in report.layers if settings.dsnot_settings.applies(l.name)]
    assert 0 < len(followed) < 14  # DSnoT's default leaves some matrices alone: those stay in the joint loop
    assert len(calls) == len(followed) and len(report.quantized) == 14
    assert all((l.quant_loss == l.obs_loss) == (l.name not in followed) for l in report.layers)
    for name, param in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            assert (param.detach() == 0).float().mean().item() >= 0.5, name


def test_none_is_plain_gptq_and_prunes_nothing_without_quantization():
    W, _, stat = _layer()
    result = METHOD_SPECS["none"].prune(W, None, LayerSettings(0.5, PruneSettings().pattern))
    assert torch.equal(result.weight, W) and not result.mask.any()
    with pytest.raises(WandaError, match="pass --wbits"):
        prune(tiny_model("llama"), calib_ids(), PruneSettings(prune_method="none"), progress=False)
