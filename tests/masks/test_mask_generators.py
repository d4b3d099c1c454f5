"""Mask generators: the seed's pinned cases, golden masks, corrected seed bugs, errors."""

from __future__ import annotations

import pytest
import torch

from pruning_core.errors import (
    ConfigError,
    InvalidPattern,
    InvalidSparsity,
    NumericalInstability,
    ShapeMismatch,
)
from pruning_core.masks import (
    NM,
    Block,
    Column,
    MaskScope,
    Row,
    Unstructured,
    generate_block_mask,
    generate_column_mask,
    generate_global_masks,
    generate_mask,
    generate_nm_mask,
    generate_row_mask,
    generate_unstructured_mask,
    keep_topk,
)

T = torch.tensor


def kept(mask) -> list:
    return mask.tensor.int().tolist()


# ----------------------------------------------------------------------------- unstructured
@pytest.mark.parametrize(("sparsity", "expected"), [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_unstructured_pinned(sparsity: float, expected: float) -> None:
    assert generate_unstructured_mask(T([0.1, 0.4, 0.2, 0.3]), sparsity).sparsity == expected


def test_unstructured_golden() -> None:
    assert kept(generate_unstructured_mask(T([0.1, 0.4, 0.2, 0.3]), 0.5)) == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        # Seed bug: every score equal to the threshold is pruned, so [1,1,1,1] at 50% lost all 4
        # and [.1,.2,.2,.3] lost 3. Exactly k=2 are pruned here; among ties the lower index stays.
        ([1.0, 1.0, 1.0, 1.0], [1, 1, 0, 0]),
        ([0.1, 0.2, 0.2, 0.3], [0, 1, 0, 1]),
        ([0.0, 0.0, 0.0, 5.0, 0.0, 0.0], [1, 1, 0, 1, 0, 0]),
    ],
)
def test_unstructured_ties_keep_the_lower_index(scores: list[float], expected: list[int]) -> None:
    assert kept(generate_unstructured_mask(T(scores), 0.5)) == expected


def test_prune_count_is_exact_decimal_floor() -> None:
    # Seed bug: k = (len as f32 * s) as usize gives 52 for len=100, s=0.53.
    mask = generate_unstructured_mask(torch.arange(100.0), 0.53)
    assert mask.num_zeros == 53
    assert kept(mask) == [0] * 53 + [1] * 47


@pytest.mark.parametrize("sparsity", [-0.1, 1.1, float("nan"), float("inf")])
def test_unstructured_rejects_bad_sparsity(sparsity: float) -> None:
    with pytest.raises(InvalidSparsity):
        generate_unstructured_mask(T([0.1, 0.2]), sparsity)


def test_unstructured_empty() -> None:
    mask = generate_unstructured_mask(torch.zeros(0), 0.5)
    assert mask.shape == (0,) and mask.sparsity == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_rejected_naming_the_layer(bad: float) -> None:
    # Seed: NaN compares Equal and is always pruned; -Inf in N:M goes unnoticed (spec item 7).
    scores = T([[0.1, 0.2, 0.3, 0.4], [0.5, bad, 0.7, 0.8]])
    for make in (
        lambda: generate_unstructured_mask(scores, 0.5, name="layers.0.q_proj"),
        lambda: generate_nm_mask(scores, 2, 4, name="layers.0.q_proj"),
        lambda: generate_block_mask(scores, 2, 2, 0.5, name="layers.0.q_proj"),
        lambda: generate_row_mask(scores, 0.5, name="layers.0.q_proj"),
    ):
        with pytest.raises(NumericalInstability, match=r"layers\.0\.q_proj.*\[1, 1\]"):
            make()


def test_row_scope_prunes_each_row_separately() -> None:
    scores = T([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert kept(generate_unstructured_mask(scores, 0.5, scope=MaskScope.ROW)) == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert kept(generate_unstructured_mask(scores, 0.5, scope="layer")) == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert kept(generate_unstructured_mask(scores, 0.5, scope="ROW")) == [[0, 0, 1, 1], [0, 0, 1, 1]]  # as prune_module
    assert kept(generate_unstructured_mask(scores, 0.5, scope=MaskScope.GLOBAL)) == [
        [0, 0, 0, 0],
        [1, 1, 1, 1],
    ]


def test_unknown_scope_and_dim_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="scope"):
        generate_unstructured_mask(T([1.0]), 0.5, scope="column")
    with pytest.raises(ConfigError, match="dim"):
        keep_topk(torch.ones(2, 2), 0.5, dim=0)


@pytest.mark.parametrize(
    ("kind", "sparsity"),
    [
        ("continuous", 0.37),
        ("grid64", 0.37),
        ("grid4096", 0.5),
        ("grid4", 0.375),  # bracket wider than n/8: full kthvalue fallback
        ("half_zeros", 0.3),  # threshold 0 shared by half the scores: lo == hi shortcut
        ("half_zeros", 0.7),
    ],
)
def test_large_flat_selection_matches_sort_reference(kind: str, sparsity: float) -> None:
    # 2^21 scores take the sampled-threshold path (bracket, lo == hi shortcut, or fallback);
    # grids and runs of zeros create heavy ties at the threshold.
    g = torch.Generator().manual_seed(3)
    u = torch.rand(1 << 21, generator=g)
    scores = {
        "continuous": u,
        "grid64": torch.round(u * 64) / 64,
        "grid4096": torch.round(u * 4096) / 4096,
        "grid4": torch.round(u * 4) / 4,
        "half_zeros": torch.where(torch.rand(1 << 21, generator=g) < 0.5, 0.0, u),
    }[kind]
    keep = keep_topk(scores, sparsity)
    n_keep = scores.numel() - int(sparsity * (1 << 21))
    order = torch.sort(scores, descending=True, stable=True).indices[:n_keep]
    assert torch.equal(keep, torch.zeros_like(keep).index_fill_(0, order, True))


# ----------------------------------------------------------------------------- global
def test_global_masks_share_one_threshold() -> None:
    masks = generate_global_masks({"a": T([1.0, 5.0, 3.0]), "b": T([[2.0, 4.0], [6.0, 0.5]])}, 0.5)
    assert kept(masks["a"]) == [0, 1, 1] and kept(masks["b"]) == [[0, 1], [1, 0]]
    assert masks["b"].name == "b"
    assert sum(m.num_zeros for m in masks.values()) == 3  # floor(7 * 0.5)


def test_global_ties_keep_earlier_layers() -> None:
    masks = generate_global_masks({"first": torch.ones(3), "second": torch.ones(3)}, 0.5)
    assert kept(masks["first"]) == [1, 1, 1] and kept(masks["second"]) == [0, 0, 0]


def test_global_masks_name_the_bad_layer() -> None:
    with pytest.raises(NumericalInstability, match="'mlp.down'"):
        generate_global_masks({"ok": torch.ones(2), "mlp.down": T([1.0, float("nan")])}, 0.5)
    assert generate_global_masks({}, 0.5) == {}


# ----------------------------------------------------------------------------- N:M
def test_nm_golden_magnitude_2_4() -> None:
    mask = generate_nm_mask(torch.arange(1.0, 9.0), 2, 4)
    assert torch.nonzero(mask.tensor).flatten().add(1).tolist() == [3, 4, 7, 8]
    assert mask.pattern == NM(2, 4)


def test_nm_pinned() -> None:
    assert kept(generate_nm_mask(T([0.1, 0.4, 0.2, 0.3]), 2, 4)) == [0, 1, 0, 1]
    g = torch.Generator().manual_seed(0)
    mask = generate_nm_mask(torch.rand(8, generator=g), 2, 4)
    assert mask.tensor.reshape(2, 4).sum(1).tolist() == [2, 2]


def test_nm_ties_keep_the_lower_index_in_each_group() -> None:
    assert kept(generate_nm_mask(T([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]]), 2, 4)) == [
        [1, 1, 0, 0, 0, 1, 1, 0]
    ]
    assert kept(generate_nm_mask(T([[3.0] * 16]), 4, 16)) == [[1] * 4 + [0] * 12]  # sort path (m > 8)


@pytest.mark.parametrize(("n", "m"), [(5, 4), (3, 2), (1, 0)])
def test_nm_rejects_malformed(n: int, m: int) -> None:
    with pytest.raises(InvalidPattern):
        generate_nm_mask(torch.ones(8), n, m)


@pytest.mark.parametrize("shape", [(3,), (5,), (2, 6)])
def test_nm_rejects_non_divisible_width(shape: tuple[int, ...]) -> None:
    # (2, 6): 12 elements divide by 4 but groups would cross rows; the seed allowed that.
    with pytest.raises(InvalidPattern, match="not divisible by M=4"):
        generate_nm_mask(torch.ones(shape), 2, 4, name="fc")


def test_nm_rejects_scalars() -> None:
    with pytest.raises(ShapeMismatch):
        generate_nm_mask(torch.tensor(1.0), 1, 1)


# ----------------------------------------------------------------------------- block / row / column
BLOCK_4x4 = T([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])  # block sums 4/8/12/16


def test_block_pinned() -> None:
    mask = generate_block_mask(BLOCK_4x4, 2, 2, 0.5)
    assert mask.sparsity == 0.5 and mask.pattern == Block(2, 2)
    assert kept(mask) == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    Block(2, 2).validate(generate_block_mask(torch.ones(4, 4), 2, 2, 0.5).tensor)


def test_block_ties_keep_the_lower_block_index() -> None:
    # Seed bug (as we read it): a stable ascending sort prunes the LOWER block first.
    assert kept(generate_block_mask(torch.ones(4, 4), 2, 2, 0.5)) == [[1, 1, 1, 1]] * 2 + [[0, 0, 0, 0]] * 2


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: generate_block_mask(torch.ones(3, 5), 2, 2, 0.5), InvalidPattern),
        (lambda: generate_block_mask(torch.ones(4), 2, 2, 0.5), ShapeMismatch),
        (lambda: generate_block_mask(torch.ones(2, 4, 4), 2, 2, 0.5), ShapeMismatch),
        (lambda: generate_block_mask(torch.ones(4, 4), 2, 2, 1.5), InvalidSparsity),
        (lambda: generate_block_mask(torch.ones(4, 4), 0, 2, 0.5), InvalidPattern),
        (lambda: generate_block_mask(torch.ones(4, 4), 2, 0, 0.5), InvalidPattern),
        (lambda: generate_block_mask(torch.ones(4, 4), 2, 2, 0.5, reduce="mean"), ConfigError),
    ],
)
def test_block_errors(make, error: type[Exception]) -> None:
    with pytest.raises(error):
        make()


def test_rank3_error_names_the_layer() -> None:
    for make in (generate_row_mask, generate_column_mask):
        with pytest.raises(ShapeMismatch, match="'conv1'"):
            make(torch.ones(2, 3, 4), 0.5, name="conv1")


def test_row_pinned() -> None:
    assert kept(generate_row_mask(T([[1.0, 1], [2, 2], [3, 3], [4, 4]]), 0.5)) == [
        [0, 0],
        [0, 0],
        [1, 1],
        [1, 1],
    ]
    assert kept(generate_row_mask(T([[1.0, 1], [10, 10]]), 0.5)) == [[0, 0], [1, 1]]
    assert generate_row_mask(torch.ones(2, 2), 0.5).pattern == Row()


def test_column_pinned() -> None:
    assert kept(generate_column_mask(T([[1.0, 2, 3, 4]] * 2), 0.5)) == [[0, 0, 1, 1]] * 2
    assert kept(generate_column_mask(T([[1.0, 10], [1, 10]]), 0.5)) == [[0, 1], [0, 1]]
    assert generate_column_mask(torch.ones(2, 2), 0.5).pattern == Column()


def test_row_and_column_ties_keep_the_lower_index() -> None:
    assert kept(generate_row_mask(torch.ones(2, 2), 0.5)) == [[1, 1], [0, 0]]
    assert kept(generate_column_mask(torch.ones(2, 2), 0.5)) == [[1, 0], [1, 0]]


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: generate_row_mask(torch.ones(4), 0.5), ShapeMismatch),
        (lambda: generate_row_mask(torch.ones(2, 2), 1.5), InvalidSparsity),
        (lambda: generate_column_mask(torch.ones(4), 0.5), ShapeMismatch),
        (lambda: generate_column_mask(torch.ones(2, 2), -0.1), InvalidSparsity),
    ],
)
def test_row_column_errors(make, error: type[Exception]) -> None:
    with pytest.raises(error):
        make()


@pytest.mark.parametrize(
    ("reduce", "expected"),
    [("sum", [[0, 0], [1, 1]]), ("max", [[1, 1], [0, 0]]), ("l2", [[1, 1], [0, 0]])],
)
def test_group_reductions(reduce: str, expected: list[list[int]]) -> None:
    # row 0 = [9, 0] (sum 9, max 9, l2 9); row 1 = [5, 5] (sum 10, max 5, l2 7.07)
    assert kept(generate_row_mask(T([[9.0, 0.0], [5.0, 5.0]]), 0.5, reduce=reduce)) == expected


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize(
    ("pattern", "sparsity", "expected"),
    [
        (Unstructured(), 0.5, Unstructured()),
        ("2:4", None, NM(2, 4)),
        (NM(2, 4), 0.5, NM(2, 4)),
        ("block:2x2", 0.5, Block(2, 2)),
        (Row(), 0.5, Row()),
        ("column", 0.25, Column()),
    ],
)
def test_generate_mask_dispatch(pattern, sparsity, expected) -> None:
    assert generate_mask(BLOCK_4x4, pattern, sparsity).pattern == expected


def test_generate_mask_nm_refuses_a_contradicting_sparsity() -> None:
    # The seed silently ignored the requested sparsity for N:M.
    with pytest.raises(InvalidSparsity, match="fixes the sparsity at 0.5"):
        generate_mask(BLOCK_4x4, NM(2, 4), 0.7)


def test_generate_mask_argument_errors() -> None:
    with pytest.raises(InvalidSparsity, match="required"):
        generate_mask(BLOCK_4x4, Row(), None)
    with pytest.raises(InvalidPattern, match="scope=row"):
        generate_mask(BLOCK_4x4, Block(2, 2), 0.5, scope=MaskScope.ROW)
    with pytest.raises(InvalidPattern):
        generate_mask(BLOCK_4x4, NM(5, 4), None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_other_score_dtypes_select_like_float32(dtype: torch.dtype) -> None:
    scores = torch.arange(64).remainder(7).reshape(4, 16)
    for make in (
        lambda s: generate_unstructured_mask(s, 0.4, scope=MaskScope.ROW),
        lambda s: generate_nm_mask(s, 2, 4),
        lambda s: generate_block_mask(s, 2, 4, 0.5),
    ):
        assert make(scores.to(dtype)) == make(scores.float())


def test_inputs_are_not_modified() -> None:
    scores = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    before = scores.clone()
    generate_unstructured_mask(scores, 0.5)
    generate_unstructured_mask(scores, 0.5, scope=MaskScope.ROW)
    generate_nm_mask(scores, 2, 4)
    generate_block_mask(scores, 2, 2, 0.5)
    generate_global_masks({"a": scores}, 0.5)
    assert torch.equal(scores, before)


def test_keep_largest_keeps_exactly_k_with_lower_index_ties():
    from pruning_core.masks.select import keep_largest

    scores = torch.tensor([[1.0, 3.0, 3.0], [2.0, 3.0, 0.0]])
    assert keep_largest(scores, 2).tolist() == [[False, True, True], [False, False, False]]
    assert keep_largest(scores, 0).sum() == 0 and keep_largest(scores, 6).all()
    with pytest.raises(ConfigError, match=r"\[0, 6\]"):
        keep_largest(scores, 7)
