"""Hypothesis properties of mask selection, checked against a plain sort-based reference.

Scores are drawn from a mix of small integers (to force ties) and arbitrary finite floats.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.masks import (
    NM,
    Block,
    Column,
    MaskScope,
    Row,
    generate_block_mask,
    generate_column_mask,
    generate_global_masks,
    generate_nm_mask,
    generate_row_mask,
    generate_unstructured_mask,
    keep_topk,
)
from pruning_core.validate import num_to_prune

VALUE = st.one_of(
    st.integers(0, 3).map(float),
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
)
SPARSITY = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0))


@st.composite
def matrices(
    draw, max_rows: int = 6, max_cols: int = 12, col_step: int = 1, row_step: int = 1
) -> torch.Tensor:
    rows = row_step * draw(st.integers(1, max_rows))
    cols = col_step * draw(st.integers(1, max_cols))
    values = draw(st.lists(VALUE, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)


def reference_keep(groups: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Straightforward reference: stable descending sort per row, keep the first n_keep."""
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n_keep]
    return torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, order, True)


def assert_separated(groups: torch.Tensor, keep: torch.Tensor) -> None:
    """Every kept score >= every pruned score of the same group (row)."""
    for g, k in zip(groups, keep, strict=True):
        if k.any() and (~k).any():
            assert g[k].min() >= g[~k].max()


@given(matrices(), SPARSITY, st.sampled_from([MaskScope.LAYER, MaskScope.ROW]))
def test_unstructured_exact_count_separation_and_reference(scores, sparsity, scope) -> None:
    keep = generate_unstructured_mask(scores, sparsity, scope=scope).tensor
    groups = scores.reshape(1, -1) if scope is MaskScope.LAYER else scores
    kgroups = keep.reshape(groups.shape)
    k = num_to_prune(groups.shape[1], sparsity)
    assert (~kgroups).sum(1).tolist() == [k] * groups.shape[0]
    assert_separated(groups, kgroups)
    assert torch.equal(kgroups, reference_keep(groups, groups.shape[1] - k))  # ties: lower index kept


@given(matrices(), SPARSITY, SPARSITY)
def test_higher_sparsity_gives_a_subset(scores, s1, s2) -> None:
    lo, hi = sorted((s1, s2))
    for scope in (MaskScope.LAYER, MaskScope.ROW):
        sparse = generate_unstructured_mask(scores, hi, scope=scope)
        assert sparse.is_subset_of(generate_unstructured_mask(scores, lo, scope=scope))
    assert generate_row_mask(scores, hi).is_subset_of(generate_row_mask(scores, lo))
    assert generate_column_mask(scores, hi).is_subset_of(generate_column_mask(scores, lo))


@given(matrices(), SPARSITY, st.data())
def test_and_with_previous_mask_is_monotone(scores, sparsity, data) -> None:
    previous = generate_unstructured_mask(scores, data.draw(SPARSITY))
    combined = generate_unstructured_mask(scores, sparsity) & previous
    assert combined.is_subset_of(previous)
    assert combined.num_zeros >= previous.num_zeros


@given(matrices(), SPARSITY, st.integers(-4, 8))
def test_invariant_under_positive_rescaling(scores, sparsity, exponent) -> None:
    # Powers of two scale exactly, so no ties are created or broken by rounding.
    c = 2.0**exponent
    for scope in (MaskScope.LAYER, MaskScope.ROW):
        a = generate_unstructured_mask(scores, sparsity, scope=scope)
        assert a == generate_unstructured_mask(scores * c, sparsity, scope=scope)
    assert generate_nm_mask(scores[:, : scores.shape[1] // 4 * 4], 2, 4) == generate_nm_mask(
        scores[:, : scores.shape[1] // 4 * 4] * c, 2, 4
    )


@given(matrices(col_step=4), st.sampled_from([(1, 4), (2, 4), (3, 4), (0, 4), (4, 4)]))
def test_nm_structure(scores, nm) -> None:
    n, m = nm
    mask = generate_nm_mask(scores, n, m)
    NM(n, m).validate(mask.tensor)
    groups = scores.reshape(-1, m)
    keep = mask.tensor.reshape(-1, m)
    assert keep.sum(1).tolist() == [n] * groups.shape[0]  # exactly n for a generated mask
    assert_separated(groups, keep)
    assert torch.equal(keep, reference_keep(groups, n))


@given(matrices(max_cols=3, col_step=16), st.sampled_from([(2, 8), (4, 8), (1, 16), (5, 16)]))
def test_nm_larger_groups(scores, nm) -> None:
    n, m = nm  # m = 8: pairwise ranks; m = 16: the stable-sort path
    groups = scores.reshape(-1, m)
    keep = generate_nm_mask(scores, n, m).tensor.reshape(-1, m)
    assert torch.equal(keep, reference_keep(groups, n))


@given(st.lists(matrices(max_rows=3, max_cols=5), min_size=1, max_size=4), SPARSITY)
def test_global_prunes_exactly_floor_total(layers, sparsity) -> None:
    scores = {f"layer{i}": t for i, t in enumerate(layers)}
    masks = generate_global_masks(scores, sparsity)
    total = sum(t.numel() for t in layers)
    assert sum(m.num_zeros for m in masks.values()) == num_to_prune(total, sparsity)
    flat = torch.cat([t.reshape(-1) for t in layers])[None]
    keep = torch.cat([masks[name].tensor.reshape(-1) for name in scores])[None]
    assert torch.equal(keep, reference_keep(flat, flat.shape[1] - num_to_prune(total, sparsity)))


@given(
    matrices(max_rows=4, max_cols=4, row_step=2, col_step=3), SPARSITY, st.sampled_from(["sum", "max", "l2"])
)
def test_block_exact_count_and_separation(scores, sparsity, reduce) -> None:
    mask = generate_block_mask(scores, 2, 3, sparsity, reduce=reduce)
    Block(2, 3).validate(mask.tensor)
    tiles = scores.reshape(scores.shape[0] // 2, 2, scores.shape[1] // 3, 3).double()
    if reduce == "sum":
        block_scores = tiles.sum((1, 3))
    elif reduce == "max":
        block_scores = tiles.abs().amax((1, 3))
    else:
        block_scores = tiles.square().sum((1, 3)).sqrt()
    keep = mask.tensor[::2, ::3].reshape(1, -1)
    n_blocks = block_scores.numel()
    assert int((~keep).sum()) == num_to_prune(n_blocks, sparsity)
    assert_separated(block_scores.reshape(1, -1), keep)


@given(matrices(), SPARSITY)
def test_rows_and_columns_exact_count(scores, sparsity) -> None:
    row_mask, col_mask = generate_row_mask(scores, sparsity), generate_column_mask(scores, sparsity)
    Row().validate(row_mask.tensor)
    Column().validate(col_mask.tensor)
    rows, cols = row_mask.tensor[:, 0], col_mask.tensor[0]
    assert int((~rows).sum()) == num_to_prune(scores.shape[0], sparsity)
    assert int((~cols).sum()) == num_to_prune(scores.shape[1], sparsity)
    assert torch.equal(rows[None], reference_keep(scores.double().sum(1)[None], int(rows.sum())))
    assert torch.equal(cols[None], reference_keep(scores.double().sum(0)[None], int(cols.sum())))


@given(SPARSITY, st.integers(0, 3), st.integers(1, 40))
def test_keep_topk_on_wide_rows_with_heavy_ties(sparsity, value_range, width) -> None:
    scores = torch.arange(8 * width, dtype=torch.float32).remainder(value_range + 1).reshape(8, width)
    keep = keep_topk(scores, sparsity, dim=-1)
    assert torch.equal(keep, reference_keep(scores, width - num_to_prune(width, sparsity)))
