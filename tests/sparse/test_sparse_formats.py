"""Sparse formats: the seed's pinned cases (aprender sparse/tests*.rs), corrected bugs, golden
2:4 packing, and constructor validation."""

from __future__ import annotations

import pytest
import torch

from pruning_core.errors import (
    ConfigError,
    InvalidMask,
    InvalidPattern,
    PruningError,
    ShapeMismatch,
    UnsupportedOperation,
)
from pruning_core.masks import SparsityMask, generate_block_mask, generate_nm_mask
from pruning_core.sparse import (
    BlockSparseTensor,
    COOTensor,
    CSRTensor,
    SemiStructuredTensor,
    SparseFormat,
    sparsify,
)

T = torch.tensor
M3 = T([[1.0, 0, 2], [0, 0, 3], [4, 0, 0]])


# ----------------------------------------------------------------------------- CSR
def test_csr_from_dense_pinned() -> None:
    csr = CSRTensor.from_dense(M3)
    assert csr.values.tolist() == [1, 2, 3, 4] and csr.nnz == 4
    assert csr.col_indices.tolist() == [0, 2, 2, 0] and csr.row_ptrs.tolist() == [0, 2, 3, 4]
    assert torch.equal(csr.to_dense(), M3)
    assert CSRTensor.from_dense(T([[1.0, 0], [0, 0]])).sparsity == 0.75


def test_csr_get() -> None:
    csr = CSRTensor.from_dense(T([[1.0, 2], [3, 4]]))
    assert [csr.get(r, c) for r in range(2) for c in range(2)] == [1, 2, 3, 4]
    assert CSRTensor.from_dense(M3).get(1, 1) == 0.0
    # The seed returned 0 for (5, 5); an out-of-bounds index is a caller bug, so we raise.
    with pytest.raises(IndexError):
        csr.get(5, 5)


def test_csr_matvec_pinned() -> None:
    csr = CSRTensor.from_dense(T([[1.0, 2], [3, 4]]))
    assert csr.matmul(T([1.0, 1.0])).tolist() == [3, 7]
    assert (csr @ T([[1.0, 0], [1, 1]])).tolist() == [[3, 2], [7, 4]]
    with pytest.raises(ShapeMismatch):
        csr.matmul(T([1.0, 1.0, 1.0]))
    with pytest.raises(ShapeMismatch):
        csr.matmul(torch.ones(2, 2, 2))


def test_memory_accounting() -> None:
    dense = torch.zeros(10, 10)
    dense[3, 4] = 1.0
    dense[7, 1] = 2.0
    csr = CSRTensor.from_dense(dense)
    assert csr.memory_savings_ratio > 1
    # int32 indices: 2 values * 4 B + 2 columns * 4 B + 11 row pointers * 4 B
    assert csr.nbytes == 2 * 4 + 2 * 4 + 11 * 4
    assert CSRTensor.from_dense(torch.ones(2, 2)).dense_nbytes == 16
    assert CSRTensor.from_dense(torch.ones(2, 2, dtype=torch.float64)).dense_nbytes == 32


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1.0, 2.0], [0, 1], [0, 2], (2, 2)), "length 2, expected rows \\+ 1 = 3"),  # short row_ptrs
        (([1.0], [5], [0, 1, 1], (2, 2)), "col_indices\\[0\\] = 5 is out of range"),
        (([1.0, 2.0], [0, 1], [0, 2, 1], (2, 2)), "end at nnz=2"),
        (([1.0, 2.0, 3.0], [0, 1, 0], [0, 2, 1, 3], (3, 2)), "decreases at row 1"),
        (([1.0, 2.0], [0], [0, 1, 2], (2, 2)), "2 values but 1 column"),
        (([1.0, 2.0], [0, 1], [1, 1, 2], (2, 2)), "start at 0"),
        (([1.0, 2.0], [1, 0], [0, 2, 2], (2, 2)), "row 0 must be sorted and unique"),
        (([1.0, 2.0], [1, 1], [0, 0, 2], (2, 2)), "row 1 must be sorted and unique"),
        (([1.0], [0.5], [0, 1, 1], (2, 2)), "integer"),
        (([1.0], [0], [0, 1, 1], (2, -1)), "negative"),
    ],
)
def test_csr_constructor_rejects(args, match: str) -> None:
    with pytest.raises((InvalidMask, ShapeMismatch), match=match):
        CSRTensor(*args)


def test_csr_constructor_accepts_valid_and_empty() -> None:
    csr = CSRTensor([1.0, 2.0, 3.0], [0, 1, 0], [0, 2, 2, 3], (3, 2))
    assert csr.to_dense().tolist() == [[1, 2], [0, 0], [3, 0]]
    empty = CSRTensor([], [], [0], (0, 0))
    assert empty.sparsity == 0.0 and empty.nnz == 0


# ----------------------------------------------------------------------------- COO
def test_coo_pinned() -> None:
    dense = T([[1.0, 0], [0, 2]])
    coo = COOTensor.from_dense(dense)
    assert coo.nnz == 2 and coo.shape == (2, 2)
    assert torch.equal(coo.to_dense(), dense)
    csr = coo.to_csr()
    direct = CSRTensor.from_dense(dense)
    assert torch.equal(csr.values, direct.values) and torch.equal(csr.row_ptrs, direct.row_ptrs)
    # The seed's push((0,0)), push((1,2)), push((2,1)) on 3x3 lands at flat indices 0, 5, 7.
    built = COOTensor([1.0, 2.0, 3.0], [0, 1, 2], [0, 2, 1], (3, 3))
    assert torch.nonzero(built.to_dense().flatten()).flatten().tolist() == [0, 5, 7]


def test_coo_sorts_entries() -> None:
    coo = COOTensor([3.0, 1.0], [1, 0], [0, 1], (2, 2))
    assert coo.values.tolist() == [1.0, 3.0] and coo.row_indices.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1.0], [2], [0], (2, 2)), "row_indices\\[0\\] = 2 is out of range"),  # the seed panicked in to_csr
        (([1.0], [0], [-1], (2, 2)), "col_indices\\[0\\] = -1"),
        (([1.0, 2.0], [0, 0], [1, 1], (2, 2)), "duplicate coordinate \\(0, 1\\)"),
        (([1.0, 2.0], [0], [0, 1], (2, 2)), "lengths differ"),
    ],
)
def test_coo_constructor_rejects(args, match: str) -> None:
    with pytest.raises(InvalidMask, match=match):
        COOTensor(*args)


# ----------------------------------------------------------------------------- block
def test_block_pinned() -> None:
    dense = torch.zeros(4, 4)
    dense[0:2, 2:4] = T([[1.0, 2], [3, 4]])
    blk = BlockSparseTensor.from_dense(dense, block_size=(2, 2))
    assert blk.num_blocks == 1 and blk.nnz == 4 and torch.equal(blk.to_dense(), dense)
    dense[2:4, 0:2] = 5.0
    two = BlockSparseTensor.from_dense(dense, block_size=(2, 2))
    assert two.num_blocks == 2 and torch.equal(two.to_dense(), dense)
    assert BlockSparseTensor.from_dense(torch.ones(2, 3), block_size=(2, 3)).shape == (2, 3)
    assert BlockSparseTensor.from_dense(torch.zeros(4, 4), block_size=(2, 2)).sparsity == 1.0


@pytest.mark.parametrize("size", [(0, 2), (2, 0), (-1, 2)])
def test_block_rejects_bad_sizes(size: tuple[int, int]) -> None:
    with pytest.raises(InvalidPattern):
        BlockSparseTensor.from_dense(torch.ones(4, 4), block_size=size)


def test_block_keeps_the_original_shape_when_padding() -> None:
    # Seed bug: a 3x5 matrix with 2x2 blocks came back as the padded 4x6.
    dense = torch.arange(1.0, 16.0).reshape(3, 5)
    blk = BlockSparseTensor.from_dense(dense, block_size=(2, 2))
    assert blk.shape == (3, 5) and torch.equal(blk.to_dense(), dense)
    assert blk.num_blocks == 6 and blk.nnz == 15
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(blk @ x, dense @ x)
    with pytest.raises(ShapeMismatch, match="BSR"):
        blk.to_torch()


def test_block_size_defaults_to_the_mask_pattern() -> None:
    mask = generate_block_mask(torch.rand(8, 8, generator=torch.Generator().manual_seed(1)), 4, 2, 0.5)
    blk = sparsify(torch.ones(8, 8), mask, SparseFormat.BLOCK)
    assert blk.block_size == (4, 2) and blk.num_blocks == 4 and blk.nnz == 32
    with pytest.raises(InvalidPattern, match="block_size"):
        sparsify(torch.ones(8, 8), None, "block")


@pytest.mark.parametrize(
    ("args", "kw", "error", "match"),
    [
        ((torch.ones(1, 2, 2), [2], [0], (4, 4)), {}, InvalidMask, "block_rows\\[0\\] = 2"),
        ((torch.ones(2, 2, 2), [0, 0], [1, 1], (4, 4)), {}, InvalidMask, "duplicate block \\(0, 1\\)"),
        ((torch.ones(1, 2, 2), [0, 1], [0], (4, 4)), {}, InvalidMask, "1 blocks but 2 block rows"),
        ((torch.ones(1, 0, 2), [0], [0], (4, 4)), {}, InvalidPattern, "positive"),
        ((torch.ones(2, 2), [0], [0], (4, 4)), {}, InvalidMask, "3-D"),
        ((torch.ones(1, 2, 2), [0], [0], (4, 4)), {"nnz": 5}, InvalidMask, "nnz=5"),
    ],
)
def test_block_constructor_rejects(args, kw, error, match) -> None:
    with pytest.raises(error, match=match):
        BlockSparseTensor(*args, **kw)


def test_block_constructor_round_trip() -> None:
    blk = BlockSparseTensor(T([[[5.0]], [[1.0]]]), [1, 0], [0, 1], (2, 2))
    assert blk.to_dense().tolist() == [[0, 1], [5, 0]] and blk.block_rows.tolist() == [0, 1]
    assert blk.to_torch().layout == torch.sparse_bsr


# ----------------------------------------------------------------------------- 2:4
def test_semi_structured_golden_packing() -> None:
    dense = T([[0.0, 1, 0, 2, 3, 0, 0, 4]])  # kept: group 0 -> (1, 3), group 1 -> (0, 3)
    semi = SemiStructuredTensor.from_dense(dense)
    assert semi.values.tolist() == [[1, 2, 3, 4]]
    assert semi.indices().tolist() == [[1, 3, 0, 3]]
    # slot j at bits 2*(j%4): 1 | 3<<2 | 0<<4 | 3<<6 = 1 + 12 + 192 = 205
    assert semi.meta.tolist() == [[205]] and semi.meta.dtype == torch.uint8
    assert torch.equal(semi.to_dense(), dense)
    assert semi.nbytes == 4 * 4 + 1 and semi.dense_nbytes == 32


def test_semi_structured_with_fewer_than_two_kept() -> None:
    # Group 0 keeps one element, group 1 none: spare slots are unused positions holding 0.
    dense = T([[0.0, 0, 7, 0, 0, 0, 0, 0]])
    semi = SemiStructuredTensor.from_dense(dense)
    assert semi.nnz == 1 and semi.indices().tolist() == [[0, 2, 0, 1]]
    assert torch.equal(semi.to_dense(), dense)


def test_semi_structured_stores_kept_zeros_by_mask() -> None:
    mask = generate_nm_mask(T([[4.0, 3, 2, 1]]), 2, 4)
    semi = SemiStructuredTensor.from_dense(T([[0.0, 5, 6, 7]]), mask)
    assert semi.nnz == 2 and semi.values.tolist() == [[0.0, 5.0]]


@pytest.mark.parametrize(
    ("dense", "error", "match"),
    [
        (torch.ones(2, 6), InvalidPattern, "divisible by 4"),
        (T([[1.0, 1, 1, 0]]), InvalidPattern, "at most 2"),
        (torch.ones(8), ShapeMismatch, "2-D"),
    ],
)
def test_semi_structured_from_dense_rejects(dense, error, match) -> None:
    with pytest.raises(error, match=match):
        SemiStructuredTensor.from_dense(dense)


@pytest.mark.parametrize(
    ("values", "meta", "shape", "error", "match"),
    [
        (torch.ones(1, 2), T([[0b0100]], dtype=torch.uint8), (1, 4), None, ""),  # indices (0, 1): valid
        (torch.ones(1, 2), T([[0b0101]], dtype=torch.uint8), (1, 4), InvalidMask, "strictly increasing"),
        (torch.ones(1, 2), T([[0b1011]], dtype=torch.uint8), (1, 4), InvalidMask, "strictly increasing"),
        (torch.ones(1, 2), T([[0b01000100]], dtype=torch.uint8), (1, 4), InvalidMask, "padding bits"),
        (torch.ones(1, 3), T([[0b0100]], dtype=torch.uint8), (1, 4), ShapeMismatch, "values"),
        (torch.ones(1, 2), T([[4]], dtype=torch.int32), (1, 4), ShapeMismatch, "uint8"),
        (torch.ones(1, 3), T([[0]], dtype=torch.uint8), (1, 6), InvalidPattern, "divisible by 4"),
    ],
)
def test_semi_structured_constructor(values, meta, shape, error, match) -> None:
    if error is None:
        assert SemiStructuredTensor(values, meta, shape).to_dense().tolist() == [[1, 1, 0, 0]]
    else:
        with pytest.raises(error, match=match):
            SemiStructuredTensor(values, meta, shape)


def test_semi_structured_to_torch_needs_cuda() -> None:
    semi = SemiStructuredTensor.from_dense(T([[1.0, 0, 0, 1]]))
    if semi.device.type != "cuda":
        with pytest.raises(UnsupportedOperation, match="CUDA") as info:
            semi.to_torch()
        assert isinstance(info.value, PruningError) and isinstance(info.value, NotImplementedError)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_to_torch_on_cuda() -> None:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 64, generator=g).half()
    mask = generate_nm_mask(dense.float().abs(), 2, 4)
    semi = SemiStructuredTensor.from_dense(mask.apply(dense).cuda(), mask.to("cuda"))
    torch.testing.assert_close(semi.to_torch().to_dense(), semi.to_dense())


# ----------------------------------------------------------------------------- sparsify
@pytest.mark.parametrize(
    ("fmt", "kw"),
    [(SparseFormat.CSR, {}), ("coo", {}), (SparseFormat.BLOCK, {"block_size": (1, 1)})],
)
def test_sparsify_pinned(fmt, kw) -> None:
    t = sparsify(T([[1.0, 2], [3, 4]]), T([[1.0, 0], [0, 1]]), fmt, **kw)
    assert t.nnz == 2 and t.sparsity == 0.5 and t.to_dense().tolist() == [[1, 0], [0, 4]]


@pytest.mark.parametrize("fmt", list(SparseFormat))
def test_all_formats_reject_1d(fmt: SparseFormat) -> None:
    with pytest.raises(ShapeMismatch):
        sparsify(torch.ones(4), None, fmt, **({"block_size": (1, 1)} if fmt is SparseFormat.BLOCK else {}))


def test_sparsify_errors() -> None:
    with pytest.raises(ConfigError, match="format"):
        sparsify(torch.ones(2, 2), None, "ell")
    with pytest.raises(ShapeMismatch):
        sparsify(torch.ones(2, 2), SparsityMask.dense([2, 3]), "csr")
    with pytest.raises(InvalidMask, match="non-binary"):
        sparsify(torch.ones(2, 2), T([[0.5, 1.0], [1.0, 1.0]]), "csr")


def test_nnz_by_value_vs_by_mask() -> None:
    dense = T([[0.0, 2.0], [3.0, 0.0]])
    keep = T([[True, True], [False, False]])
    assert sparsify(dense, None, "csr").nnz == 2  # the non-zeros
    by_mask = sparsify(dense, keep, "csr")
    assert by_mask.nnz == 2 and by_mask.values.tolist() == [0.0, 2.0]  # kept zero stored; 3.0 dropped


@pytest.mark.parametrize("fmt", [SparseFormat.CSR, SparseFormat.COO, SparseFormat.BLOCK])
def test_to_torch_layouts(fmt: SparseFormat) -> None:
    dense = torch.arange(16.0).reshape(4, 4) * (torch.arange(16).reshape(4, 4) % 3 == 0)
    t = sparsify(dense, None, fmt, **({"block_size": (2, 2)} if fmt is SparseFormat.BLOCK else {}))
    native = t.to_torch()
    assert (
        native.layout
        == {"csr": torch.sparse_csr, "coo": torch.sparse_coo, "block": torch.sparse_bsr}[fmt.value]
    )
    assert torch.equal(native.to_dense(), dense)


def test_matmul_promotes_dtype() -> None:
    csr = CSRTensor.from_dense(T([[1.0, 2.0]]))
    out = csr @ torch.ones(2, dtype=torch.float64)
    assert out.dtype == torch.float64 and out.tolist() == [3.0]
