"""Hypothesis properties of the sparse formats: exact round trips, matmul equal to the dense
product, nnz equal to the mask's kept count, constructor round trips."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.masks import generate_nm_mask
from pruning_core.sparse import (
    BlockSparseTensor,
    COOTensor,
    CSRTensor,
    SemiStructuredTensor,
    SparseFormat,
    sparsify,
)

VALUE = st.one_of(st.just(0.0), st.floats(-100, 100, allow_nan=False, width=32))


@st.composite
def dense_and_mask(draw, max_rows: int = 9, max_cols: int = 11, col_step: int = 1):
    rows = draw(st.integers(0, max_rows))
    cols = col_step * draw(st.integers(0 if col_step == 1 else 1, max_cols))
    n = rows * cols
    dense = torch.tensor(draw(st.lists(VALUE, min_size=n, max_size=n)), dtype=torch.float32).reshape(
        rows, cols
    )
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(
        rows, cols
    )
    return dense, mask


BLOCK_SIZES = st.sampled_from([(1, 1), (2, 2), (3, 3), (2, 3), (4, 1)])


def build(fmt: SparseFormat, dense: torch.Tensor, mask, block_size) -> object:
    return sparsify(dense, mask, fmt, **({"block_size": block_size} if fmt is SparseFormat.BLOCK else {}))


FORMATS = st.sampled_from([SparseFormat.CSR, SparseFormat.COO, SparseFormat.BLOCK])


@given(dense_and_mask(), FORMATS, BLOCK_SIZES, st.booleans())
def test_round_trip_is_exact(data, fmt, block_size, use_mask) -> None:
    dense, mask = data
    t = build(fmt, dense, mask if use_mask else None, block_size)
    expected = dense * mask if use_mask else dense
    assert t.shape == tuple(dense.shape)
    assert torch.equal(t.to_dense(), expected)
    assert t.nnz == (int(mask.sum()) if use_mask else int(torch.count_nonzero(dense)))


@given(dense_and_mask(), FORMATS, BLOCK_SIZES, st.integers(1, 5), st.booleans())
def test_matmul_equals_dense(data, fmt, block_size, k, vector) -> None:
    dense, mask = data
    t = build(fmt, dense, mask, block_size)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(dense.shape[1], generator=g) if vector else torch.randn(dense.shape[1], k, generator=g)
    torch.testing.assert_close(t @ x, (dense * mask) @ x, rtol=1e-4, atol=1e-3)


@given(dense_and_mask(col_step=4), st.integers(1, 4))
def test_semi_structured_round_trip_matmul_and_nnz(data, k) -> None:
    dense, scores = data
    mask = generate_nm_mask(scores.float() + dense.abs(), 2, 4)  # an exact 2:4 mask
    semi = SemiStructuredTensor.from_dense(dense, mask)
    assert torch.equal(semi.to_dense(), mask.apply(dense))
    assert semi.nnz == mask.nnz == dense.numel() // 2
    x = torch.randn(dense.shape[1], k, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(semi @ x, mask.apply(dense) @ x, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(semi.matmul_decompressed(x), mask.apply(dense) @ x, rtol=1e-4, atol=1e-3)
    rebuilt = SemiStructuredTensor(semi.values, semi.meta, semi.shape, nnz=semi.nnz)
    assert torch.equal(rebuilt.to_dense(), semi.to_dense())


@given(dense_and_mask(col_step=4))
def test_semi_structured_accepts_any_at_most_2_of_4_mask(data) -> None:
    dense, mask = data
    groups = mask.reshape(-1, 4)
    groups &= torch.cumsum(groups.int(), dim=1) <= 2  # drop kept positions beyond the 2nd per group
    semi = SemiStructuredTensor.from_dense(dense, mask)
    assert semi.nnz == int(mask.sum())
    assert torch.equal(semi.to_dense(), dense * mask)


@given(dense_and_mask())
def test_constructors_accept_their_own_arrays(data) -> None:
    dense, mask = data
    csr = CSRTensor.from_dense(dense, mask)
    assert torch.equal(
        CSRTensor(csr.values, csr.col_indices, csr.row_ptrs, csr.shape).to_dense(), csr.to_dense()
    )
    coo = COOTensor.from_dense(dense, mask)
    perm = torch.randperm(coo.nnz, generator=torch.Generator().manual_seed(0))  # any entry order
    shuffled = COOTensor(coo.values[perm], coo.row_indices[perm], coo.col_indices[perm], coo.shape)
    assert torch.equal(shuffled.to_dense(), coo.to_dense())
    assert torch.equal(coo.to_csr().to_dense(), csr.to_dense()) and torch.equal(
        csr.to_coo().to_dense(), coo.to_dense()
    )
    blk = BlockSparseTensor.from_dense(dense, mask, block_size=(2, 3))
    again = BlockSparseTensor(blk.values, blk.block_rows, blk.block_cols, blk.shape, nnz=blk.nnz)
    assert torch.equal(again.to_dense(), blk.to_dense())


@given(dense_and_mask(), FORMATS, BLOCK_SIZES)
def test_nbytes_counts_every_stored_array(data, fmt, block_size) -> None:
    dense, mask = data
    t = build(fmt, dense, mask, block_size)
    assert t.nbytes == sum(a.numel() * a.element_size() for a in t._arrays())
    assert t.dense_nbytes == dense.numel() * 4
    assert 0.0 <= t.sparsity <= 1.0
