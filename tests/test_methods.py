"""Every pruning method on a random weight and statistics of random inputs: exact counts, N:M in every group,
zeros exactly at the mask, Wanda against an independent computation, and SparseGPT's OBS update against
the plain mask and against its own predicted loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_close, one_thread

from wanda import PruneSettings, WandaError
from wanda.methods import METHOD_SPECS, PRUNERS, get_method
from wanda.stats import Gram, SquaredNorm

ROWS, COLS, TOKENS = 16, 32, 256
#: Two blocks of columns, so that the lazy block updates and the per-block selection are exercised.
BLOCKSIZE = 16
PATTERNS = ["unstructured", "2:4", "4:8"]
#: The ADMM methods update the weights too, but by least squares on their support, without an OBS loss.
ADMM_METHODS = ("admm", "alps")
OBS_METHODS = [name for name, spec in METHOD_SPECS.items() if spec.quantizes]  # the OBS column loop's
ROW_SCOPED = ("wanda", "ablate_wanda_seq", "ablate_wanda_iter")


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _data(seed: int = 0, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (ROWS, COLS) and inputs (TOKENS, COLS) whose features have different scales, so that
    Wanda's activation norm matters (it would agree with magnitude on isotropic inputs), and are correlated
    as real activations are (mostly 8 latent directions plus noise), so that the OBS update has something to
    compensate with (with independent features the Hessian is diagonal and the update does almost nothing)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, COLS, generator=g)
    scales = torch.logspace(-math.log10(spread), math.log10(spread), COLS)[torch.randperm(COLS, generator=g)]
    latent = torch.randn(TOKENS, 8, generator=g) @ torch.randn(8, COLS, generator=g) / math.sqrt(8)
    x = (latent + 0.3 * torch.randn(TOKENS, COLS, generator=g)) * scales
    return weight, x


def _stat(kind, x: torch.Tensor):
    if kind is None:
        return None
    stat = kind(COLS, "cpu")
    # two batches of (batch, seq, features), as a layer sees them
    for half in x.reshape(2, 8, TOKENS // 16, COLS):
        stat.add(half)
    return stat


def _settings(method: str, pattern: str, **kw) -> PruneSettings:
    return PruneSettings(prune_method=method, sparsity_type=pattern, blocksize=BLOCKSIZE, **kw)


def _run(method: str, pattern: str, seed: int = 0, **kw):
    weight, x = _data(seed)
    spec = get_method(method)
    result = spec.prune(weight.clone(), _stat(spec.statistic, x), _settings(method, pattern, **kw))
    return weight, x, result


def _reference_wanda_mask(weight: torch.Tensor, x: torch.Tensor, ratio: float, nm: tuple[int, int] | None):
    """Plain float64/numpy: S_ij = |W_ij| * sqrt(sum_t x_tj^2), lowest per row (or per group of M)."""
    w = weight.double().numpy()
    norms = np.sqrt((x.double().numpy() ** 2).sum(0))
    scores = np.abs(w) * norms[None, :]
    mask = np.zeros_like(w, dtype=bool)
    for r in range(w.shape[0]):
        if nm is None:
            k = int(ratio * w.shape[1])
            mask[r, np.argsort(scores[r], kind="stable")[:k]] = True
        else:
            n, m = nm
            for g in range(0, w.shape[1], m):
                mask[r, g + np.argsort(scores[r, g : g + m], kind="stable")[:n]] = True
    return torch.from_numpy(mask)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", PRUNERS)
def test_zeros_exactly_at_the_mask_and_counts_exact(method, pattern):
    weight, x, result = _run(method, pattern)
    mask = result.mask
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    assert result.weight.shape == weight.shape
    assert torch.equal(result.weight == 0, mask)
    if pattern == "unstructured":
        # ratio 0.5: every scope (row, matrix, block of columns) divides evenly
        assert mask.sum().item() == ROWS * COLS // 2
        if method in ROW_SCOPED:
            assert mask.sum(1).tolist() == [COLS // 2] * ROWS
    else:
        n, m = map(int, pattern.split(":"))
        assert mask.reshape(ROWS, COLS // m, m).sum(-1).eq(n).all(), f"{method} breaks {pattern} in some group"
    if method in OBS_METHODS:
        assert result.obs_loss is not None and result.obs_loss > 0
    elif method in ADMM_METHODS:
        assert result.obs_loss is None and result.damping == 0.01
    else:
        assert result.obs_loss is None
        # no weight update: what is kept is the original weight
        assert torch.equal(result.weight[~mask], weight[~mask])


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_uneven_ratio_counts(ratio):
    weight, x = _data(1)
    per_row, per_matrix = math.floor(ratio * COLS), math.floor(ratio * ROWS * COLS)
    wanda = get_method("wanda").prune(
        weight, _stat(SquaredNorm, x), _settings("wanda", "unstructured", sparsity_ratio=ratio)
    )
    # the matrix loses floor(ratio * numel), every row floor(ratio * COLS) or one more
    assert wanda.mask.sum().item() == per_matrix and set(wanda.mask.sum(1).tolist()) <= {per_row, per_row + 1}
    magnitude = get_method("magnitude").prune(
        weight, None, _settings("magnitude", "unstructured", sparsity_ratio=ratio)
    )
    assert magnitude.mask.sum().item() == per_matrix
    # the *_seq ablations fix the same masks up front
    gram = _stat(Gram, x)
    seq = get_method("ablate_wanda_seq").prune(
        weight, gram, _settings("ablate_wanda_seq", "unstructured", sparsity_ratio=ratio)
    )
    assert torch.equal(seq.mask, wanda.mask)
    seq = get_method("ablate_mag_seq").prune(
        weight, gram, _settings("ablate_mag_seq", "unstructured", sparsity_ratio=ratio)
    )
    assert torch.equal(seq.mask, magnitude.mask)


def test_wanda_hand_computed():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, -3.0, 2.0, 1.0]])
    stat = SquaredNorm(4, "cpu")
    stat.add(torch.tensor([[4.0, 1.0, 1.0, 1.0]]))  # ||X_j|| = 4, 1, 1, 1
    # scores: [4, 2, 3, 4] and [16, 3, 2, 1]
    result = get_method("wanda").prune(weight, stat, _settings("wanda", "unstructured"))
    assert result.mask.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert result.weight.tolist() == [[1.0, 0.0, 0.0, 4.0], [4.0, -3.0, 0.0, 0.0]]
    # magnitude prunes the first row differently
    assert get_method("magnitude").prune(weight, None, _settings("magnitude", "2:4")).mask.tolist() == [
        [True, True, False, False],
        [False, False, True, True],
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_wanda_equals_an_independent_computation(pattern, seed):
    weight, x, result = _run("wanda", pattern, seed)
    nm = None if pattern == "unstructured" else tuple(map(int, pattern.split(":")))
    expected = _reference_wanda_mask(weight, x, 0.5, nm)
    assert torch.equal(result.mask, expected)
    # and it differs from magnitude on these anisotropic inputs, so the statistic is really used
    magnitude = get_method("magnitude").prune(weight, None, _settings("magnitude", pattern)).mask
    assert not torch.equal(result.mask, magnitude)


def test_wanda_accepts_a_gram_statistic():
    weight, x = _data()
    a = get_method("wanda").prune(weight, _stat(SquaredNorm, x), _settings("wanda", "unstructured"))
    b = get_method("wanda").prune(weight, _stat(Gram, x), _settings("wanda", "unstructured"))
    assert torch.equal(a.mask, b.mask)


def test_wanda_variant_reaches_the_ratio():
    weight, x = _data()
    settings = _settings("wanda", "unstructured", sparsity_ratio=0.4, use_variant=True)
    result = get_method("wanda").prune(weight, _stat(SquaredNorm, x), settings)
    assert abs(result.mask.float().mean().item() - 0.4) <= settings.variant_tolerance
    assert torch.equal(result.weight == 0, result.mask)


def _output_error(weight: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    """||W X^T - W_hat X^T||_F in float64."""
    return torch.linalg.matrix_norm((weight.double() - new.double()) @ x.double().T).item()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", OBS_METHODS)
def test_obs_update_lowers_the_output_error_of_its_own_mask(method, pattern):
    weight, x, result = _run(method, pattern)
    with_update = _output_error(weight, result.weight, x)
    mask_only = _output_error(weight, weight.masked_fill(result.mask, 0), x)
    # the reconstruction removes a large part of the error of simply zeroing the same weights
    assert with_update < 0.9 * mask_only, (with_update, mask_only)


@pytest.mark.parametrize("percdamp", [0.0, 0.01, 0.1])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", OBS_METHODS)
def test_obs_predicted_loss_equals_the_real_error(method, pattern, percdamp):
    """With H^-1 = U^T U (U upper Cholesky), OBS leaves W - W_hat = E U, where E holds the scaled errors
    (w - q) / U_jj; hence 1/2 tr((W - W_hat) H (W - W_hat)^T) = 1/2 sum E^2, which is exactly the loss it
    predicts. H here is the dampened Hessian it inverted; without dampening that is (1/n) ||(W - W_hat) X^T||^2."""
    weight, x, result = _run(method, pattern, percdamp=percdamp)
    delta = weight.double() - result.weight.double()
    hessian = 2.0 / TOKENS * x.double().T @ x.double()
    dampened = hessian + percdamp * hessian.diagonal().mean() * torch.eye(COLS, dtype=torch.float64)
    real = 0.5 * torch.einsum("ri,ij,rj->", delta, dampened, delta).item()
    assert result.obs_loss == pytest.approx(real, rel=1e-4)
    if percdamp == 0.0:
        assert result.obs_loss == pytest.approx(_output_error(weight, result.weight, x) ** 2 / TOKENS, rel=1e-4)


def test_obs_with_a_dead_input_feature():
    # a feature that is never active (H_jj == 0) must not break the Cholesky factorisation
    weight, x = _data()
    x[:, 5] = 0
    for method in OBS_METHODS + list(ADMM_METHODS):
        result = get_method(method).prune(weight, _stat(Gram, x), _settings(method, "2:4"))
        assert torch.isfinite(result.weight).all()
        assert torch.equal(result.weight == 0, result.mask)


def test_accumulators_are_batch_invariant_and_agree():
    _, x = _data()
    whole_norm, whole_gram = SquaredNorm(COLS, "cpu"), Gram(COLS, "cpu")
    whole_norm.add(x)
    whole_gram.add(x)
    batched = _stat(Gram, x)
    expected = (x.double() ** 2).sum(0)
    torch.testing.assert_close(whole_norm.squared_norm().double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(whole_gram.squared_norm().double(), expected, rtol=1e-5, atol=0)
    assert_close(batched.sum, whole_gram.sum)
    assert batched.tokens == whole_gram.tokens == TOKENS
    assert_close(batched.hessian(), batched.sum * 2 / TOKENS)


@pytest.mark.parametrize("features", [63, 130, 200, 577])
def test_gram_panels_give_the_full_symmetric_product(features):
    """On a CPU the Gram matrix is summed as lower-triangle row panels (uneven ones for widths not divisible
    by the panel count); ``total`` must still be the whole X^T X, also after more batches arrive."""
    g = torch.Generator().manual_seed(features)
    batches = [torch.randn(2, 40, features, generator=g) for _ in range(3)]
    gram = Gram(features, "cpu")
    for batch in batches[:2]:
        gram.add(batch)
    flat = torch.cat([b.reshape(-1, features) for b in batches]).double()
    assert_close(gram.total().double(), flat[:160].T @ flat[:160])
    gram.add(batches[2])
    total = gram.total()
    assert torch.equal(total, total.T)
    assert_close(total.double(), flat.T @ flat)
    assert gram.tokens == 240


@pytest.mark.parametrize("method", PRUNERS)
def test_nm_on_columns_not_divisible_by_m_names_the_layer_width(method):
    weight, x = torch.randn(8, 30), torch.randn(64, 30)
    spec = get_method(method)
    stat = None
    if spec.statistic is not None:
        stat = spec.statistic(30, "cpu")
        stat.add(x)
    with pytest.raises(WandaError, match="divisible by 4, but a layer has 30"):
        spec.prune(weight, stat, _settings(method, "2:4"))


def test_unknown_method_is_a_user_error():
    with pytest.raises(WandaError, match="unknown pruning method 'search'"):
        get_method("search")
    with pytest.raises(WandaError, match="--prune_method"):
        PruneSettings(prune_method="search")


def test_wanda_variant_at_0995_keeps_a_weight_in_every_row(caplog):
    """0.995 of a tiny model's matrices (64 or 128 columns) could only be met by emptying rows: the variant's
    ratio is capped at (cols - 1) / cols per matrix, said in a log line, and no row of any matrix is all zero."""
    import logging

    from conftest import tiny_model

    from wanda import prune

    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING):
        calibration = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        settings = PruneSettings(prune_method="wanda", use_variant=True, sparsity_ratio=0.995)
        prune(model, calibration, settings, progress=False)
    matrices = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    assert matrices
    for module in matrices:
        weight = module.weight
        assert bool((weight != 0).any(dim=1).all()), "a row was emptied"
        cols = weight.shape[1]
        # capped at (cols - 1) / cols: at most one weight per row survives beyond the tolerance
        assert (weight == 0).float().mean().item() >= (cols - 1) / cols - 1e-3
    assert "the variant's ratio 0.995 is capped at" in caplog.text
