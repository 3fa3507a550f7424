"""Mask selection on tiny tensors with hand-computed expectations (``True`` = pruned)."""

from __future__ import annotations

import math

import pytest
import torch

from wanda import SparsityPattern, WandaError
from wanda.masks import check_nm, lowest_k_mask, matrix_mask, nm_mask, row_mask, select_mask, variant_mask

T, F = True, False


def test_row_mask_prunes_lowest_scores_of_each_row():
    scores = torch.tensor([[3.0, 1.0, 2.0, 4.0], [0.5, 0.1, 0.9, 0.3]])
    assert row_mask(scores, 0.5).tolist() == [[F, T, T, F], [F, T, F, T]]
    # floor(0.3 * 4) = 1 and floor(0.74 * 4) = 2 per row
    assert row_mask(scores, 0.3).tolist() == [[F, T, F, F], [F, T, F, F]]
    assert row_mask(scores, 0.74).sum(1).tolist() == [2, 2]
    assert not row_mask(scores, 0.0).any()


def test_matrix_mask_uses_one_threshold_for_the_whole_matrix():
    scores = torch.tensor([[4.0, 3.0], [1.0, 2.0]])
    # the two lowest of the matrix sit in row 1; per row it would be one from each row
    assert matrix_mask(scores, 0.5).tolist() == [[F, F], [T, T]]
    assert row_mask(scores, 0.5).tolist() == [[F, T], [T, F]]
    assert matrix_mask(scores, 0.25).tolist() == [[F, F], [T, F]]


def test_nm_mask_prunes_n_in_every_group_of_m():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0, 8.0, 7.0, 6.0, 9.0], [9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[T, F, F, T, F, T, T, F], [F, F, T, T, T, T, F, F]]
    assert nm_mask(scores, 1, 4).tolist() == [[T, F, F, F, F, F, T, F], [F, F, F, T, T, F, F, F]]
    # 4:8: the four lowest of all eight
    assert nm_mask(scores, 4, 8).tolist() == [[T, T, T, T, F, F, F, F], [F, F, F, F, T, T, T, T]]


def test_ties_prune_the_lower_index_first():
    ones = torch.ones(2, 8)
    assert row_mask(ones, 0.5).tolist() == [[T, T, T, T, F, F, F, F]] * 2
    assert nm_mask(ones, 2, 4).tolist() == [[T, T, F, F, T, T, F, F]] * 2
    # matrix scope: row-major order, so row 0 goes first
    assert matrix_mask(ones, 0.25).tolist() == [[T, T, T, T, F, F, F, F], [F] * 8]
    # ties only among some entries: the lower index of the tied pair goes
    assert row_mask(torch.tensor([[2.0, 1.0, 3.0, 1.0]]), 0.25).tolist() == [[F, T, F, F]]


def test_tie_breaking_is_stable_for_long_rows():
    # a long row of equal scores takes a different sorting code path than a short one
    scores = torch.zeros(3, 4096)
    mask = row_mask(scores, 0.5)
    assert mask[:, :2048].all() and not mask[:, 2048:].any()


@pytest.mark.parametrize("ratio", [0.1, 0.29, 0.5, 0.57, 0.7, 0.9])
@pytest.mark.parametrize("shape", [(3, 100), (5, 64), (7, 33)])
def test_exact_counts_per_row_and_per_matrix(ratio, shape):
    torch.manual_seed(0)
    scores = torch.rand(shape)
    rows, cols = shape
    # the count a person computes: floor of the decimal product (0.29 of 100 columns is 29, not 28)
    per_row = math.floor(round(ratio * cols, 9))
    per_matrix = math.floor(round(ratio * rows * cols, 9))
    assert row_mask(scores, ratio).sum(1).tolist() == [per_row] * rows
    assert matrix_mask(scores, ratio).sum().item() == per_matrix


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (3, 8)])
def test_nm_mask_exact_per_group_on_random_scores(n, m):
    torch.manual_seed(1)
    scores = torch.randn(6, 4 * m)
    mask = nm_mask(scores, n, m)
    assert mask.reshape(6, 4, m).sum(-1).eq(n).all()
    assert check_nm(mask, n, m)
    # the pruned ones are the lowest of their group
    groups, pruned = scores.reshape(6, 4, m), mask.reshape(6, 4, m)
    highest_pruned = groups.masked_fill(~pruned, -math.inf).amax(-1)
    lowest_kept = groups.masked_fill(pruned, math.inf).amin(-1)
    assert (highest_pruned <= lowest_kept).all()


def _stable_sort_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Independent reference: the first n positions of a stable ascending sort of every group."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (1, 4), (3, 4), (2, 6), (3, 5), (5, 16), (7, 32)])
@pytest.mark.parametrize("kind", ["distinct", "ties", "nan"])
def test_nm_mask_equals_a_stable_sort(n, m, kind, monkeypatch):
    import wanda.masks.select as select

    monkeypatch.setattr(select, "_CPU_CHUNK", 5 * 40 * m)  # several row chunks, and a last partial one
    generator = torch.Generator().manual_seed(n * 100 + m)
    scores = torch.randn(23, 40 * m, generator=generator)
    if kind == "ties":  # few distinct values: most groups hold ties at the n-th smallest
        scores = torch.randint(0, 3, scores.shape, generator=generator).float()
    if kind == "nan":  # a NaN sorts last, so it is never pruned before a number
        scores[scores > 1.5] = math.nan
    assert torch.equal(nm_mask(scores, n, m), _stable_sort_nm(scores, n, m))


def test_nm_mask_rejects_columns_not_divisible_by_m():
    with pytest.raises(WandaError, match="divisible by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_check_nm():
    zeros = torch.tensor([[T, T, F, F, F, T, T, F]])
    assert check_nm(zeros, 2, 4)
    assert not check_nm(zeros, 3, 4)
    assert not check_nm(zeros[:, :6], 2, 4)  # columns not divisible by M


def test_lowest_k_mask_edge_counts():
    scores = torch.rand(2, 5)
    assert not lowest_k_mask(scores, 0).any()
    assert not lowest_k_mask(scores, -1).any()
    assert lowest_k_mask(scores, 5).all()


def test_select_mask_dispatch():
    torch.manual_seed(2)
    scores = torch.rand(4, 8)
    unstructured = SparsityPattern()
    assert torch.equal(select_mask(scores, 0.5, unstructured, "row"), row_mask(scores, 0.5))
    assert torch.equal(select_mask(scores, 0.5, unstructured, "matrix"), matrix_mask(scores, 0.5))
    # N:M ignores the scope and the ratio
    assert torch.equal(select_mask(scores, 0.1, SparsityPattern(2, 4), "matrix"), nm_mask(scores, 2, 4))
    with pytest.raises(ValueError, match="scope"):
        select_mask(scores, 0.5, unstructured, "column")


def test_variant_mask_hand_computed():
    # row sums are both 10; cumulative sums (sorted): [1, 3, 6, 10] and [1, 2, 4, 10]
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [2.0, 6.0, 1.0, 1.0]])
    # 5 of 8 pruned: alpha in [0.4, 0.6) keeps cumsum <= 4..6: two from row 0, three from row 1
    assert variant_mask(scores, 5 / 8).tolist() == [[F, T, F, T], [T, F, T, T]]
    # 4 of 8: alpha in [0.3, 0.4): two from each row
    assert variant_mask(scores, 0.5).tolist() == [[F, T, F, T], [F, F, T, T]]


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_variant_mask_reaches_the_target_sparsity(ratio):
    torch.manual_seed(3)
    # uneven rows, so that rows lose different numbers of weights
    scores = torch.rand(32, 128) * torch.linspace(0.1, 3.0, 32).unsqueeze(1) ** 3 * torch.rand(32, 128)
    tolerance = 1e-3
    mask = variant_mask(scores, ratio, tolerance)
    assert abs(mask.float().mean().item() - ratio) <= tolerance
    # within a row, the pruned entries are the lowest scores
    highest_pruned = scores.masked_fill(~mask, -math.inf).amax(-1)
    lowest_kept = scores.masked_fill(mask, math.inf).amin(-1)
    assert (highest_pruned <= lowest_kept).all()
    # and it is not simply a per-row mask
    assert len(set(mask.sum(1).tolist())) > 1
