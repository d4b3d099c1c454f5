"""SparsityPattern and SparsityMask: the seed's pinned cases (aprender mask/tests*.rs) and ours."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from pruning_core.errors import InvalidMask, InvalidPattern, ShapeMismatch
from pruning_core.masks import NM, Block, Column, Row, SparsityMask, SparsityPattern, Unstructured


# ----------------------------------------------------------------------------- patterns
@pytest.mark.parametrize(
    ("pattern", "valid"),
    [
        (NM(2, 4), True),
        (NM(4, 4), True),
        (NM(0, 4), True),
        (NM(5, 4), False),
        (NM(1, 0), False),
        (Block(2, 2), True),
        (Block(0, 2), False),
        (Block(2, 0), False),
        (Row(), True),
        (Column(), True),
    ],
)
def test_pattern_is_valid(pattern: SparsityPattern, valid: bool) -> None:
    assert pattern.is_valid() is valid


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [(NM(2, 4), 0.5), (NM(1, 4), 0.75), (Row(), None), (Column(), None), (Unstructured(), None)],
)
def test_theoretical_sparsity(pattern: SparsityPattern, expected: float | None) -> None:
    assert pattern.theoretical_sparsity() == expected


@pytest.mark.parametrize("pattern", [NM(2, 0), Block(0, 2)])
def test_malformed_pattern_validate_raises_instead_of_dividing_by_zero(pattern: SparsityPattern) -> None:
    # The seed panics (division by zero) for NM{m:0} and Block{0,_}.
    with pytest.raises(InvalidPattern):
        pattern.validate(torch.ones(4, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    ("mask", "ok"),
    [([1, 1, 0, 0, 0, 1, 1, 0], True), ([1, 1, 1, 0, 0, 1, 1, 0], False), ([1, 0, 0, 0, 0, 0, 0, 0], True)],
)
def test_nm_validate(mask: list[int], ok: bool) -> None:
    # [1,0,0,0,...] is valid for us: N:M allows AT MOST n kept (so masks ANDed with earlier
    # masks stay valid); the seed demanded exactly n.
    t = torch.tensor(mask, dtype=torch.bool)
    if ok:
        NM(2, 4).validate(t)
    else:
        with pytest.raises(InvalidPattern, match="group 0"):
            NM(2, 4).validate(t)


@pytest.mark.parametrize("pattern", [Block(2, 2), Row(), Column()])
def test_structured_patterns_reject_1d_masks(pattern: SparsityPattern) -> None:
    with pytest.raises(ShapeMismatch, match="2D"):
        pattern.validate(torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize(
    ("pattern", "mask", "match"),
    [
        (Block(2, 2), torch.ones(3, 3, dtype=torch.bool), "not divisible"),
        (Block(2, 2), torch.tensor([[1, 1], [1, 0]], dtype=torch.bool), "block"),
        (Row(), torch.tensor([[1, 0], [1, 1]], dtype=torch.bool), "row 0"),
        (Column(), torch.tensor([[1, 0], [1, 1]], dtype=torch.bool), "column 1"),
    ],
)
def test_structured_patterns_reject_non_uniform(
    pattern: SparsityPattern, mask: torch.Tensor, match: str
) -> None:
    with pytest.raises(InvalidPattern, match=match):
        pattern.validate(mask)


@pytest.mark.parametrize("pattern", [Row(), Column(), Block(2, 2), NM(2, 4)])
def test_patterns_accept_empty_masks(pattern: SparsityPattern) -> None:
    pattern.validate(torch.zeros(0, 4, dtype=torch.bool))
    pattern.validate(torch.zeros(4, 0, dtype=torch.bool))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("unstructured", Unstructured()),
        ("2:4", NM(2, 4)),
        ("block:4x8", Block(4, 8)),
        ("row", Row()),
        ("Column", Column()),
    ],
)
def test_parse(text: str, pattern: SparsityPattern) -> None:
    assert SparsityPattern.parse(text) == pattern


@pytest.mark.parametrize("text", ["5:4", "2:0", "block:0x2", "diagonal"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidPattern):
        SparsityPattern.parse(text)


# ----------------------------------------------------------------------------- SparsityMask
@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, float("nan")])
def test_mask_rejects_non_binary(bad: float) -> None:
    with pytest.raises(InvalidMask, match="non-binary value"):
        SparsityMask(torch.tensor([1.0, bad, 0.0]))


@pytest.mark.parametrize(
    ("values", "sparsity", "nnz"),
    [([1, 0, 1, 0], 0.5, 2), ([1, 1, 1, 1], 0.0, 4), ([0, 0, 0, 0], 1.0, 0), ([1, 0, 1, 0, 1], 0.4, 3)],
)
def test_mask_counts(values: list[int], sparsity: float, nnz: int) -> None:
    m = SparsityMask(torch.tensor(values, dtype=torch.float32))
    assert m.sparsity == pytest.approx(sparsity)
    assert m.density == pytest.approx(1 - sparsity)
    assert m.nnz == nnz
    assert m.num_zeros == len(values) - nnz


def test_mask_accepts_near_binary_and_integer_values() -> None:
    m = SparsityMask(torch.tensor([1 - 5e-7, 3e-7, 1.0]))
    assert m.tensor.tolist() == [True, False, True]
    assert SparsityMask([[1, 0], [0, 1]]).tensor.dtype == torch.bool


def test_dense_mask() -> None:
    m = SparsityMask.dense([3, 4])
    assert m.nnz == 12 and m.sparsity == 0.0 and m.shape == (3, 4) and m.pattern == Unstructured()


def test_empty_mask_has_zero_sparsity() -> None:
    assert SparsityMask(torch.zeros(0, dtype=torch.bool)).sparsity == 0.0


def test_apply_pinned_and_idempotent() -> None:
    m = SparsityMask(torch.tensor([1.0, 0, 1, 0]))
    w = torch.tensor([1.0, 2, 3, 4])
    out = m.apply(w)
    assert out.tolist() == [1, 0, 3, 0]
    assert torch.equal(m.apply(out), out)
    assert w.tolist() == [1, 2, 3, 4]  # out of place


def test_apply_shape_mismatch_names_both_shapes() -> None:
    m = SparsityMask(torch.ones(4, dtype=torch.bool), name="fc1")
    with pytest.raises(ShapeMismatch) as err:
        m.apply(torch.ones(3))
    assert err.value.expected == [4] and err.value.got == [3] and "fc1" in str(err.value)


def test_apply_zeroes_pruned_infinities_and_keeps_gradients() -> None:
    m = SparsityMask(torch.tensor([True, False]))
    w = torch.tensor([2.0, float("inf")], requires_grad=True)
    out = m.apply(w)
    assert out.tolist() == [2.0, 0.0]  # w * mask would give inf * 0 = nan
    out.sum().backward()
    assert w.grad.tolist() == [1.0, 0.0]


def test_apply_in_place_on_parameter() -> None:
    p = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    SparsityMask(torch.tensor([[True, False], [False, True]])).apply_(p)
    assert p.tolist() == [[1.0, 0.0], [0.0, 4.0]] and p.requires_grad


def test_mask_is_immutable_and_owns_a_copy() -> None:
    src = torch.tensor([True, False])
    m = SparsityMask(src)
    src[1] = True
    assert m.tensor.tolist() == [True, False]
    with pytest.raises(AttributeError):
        m.pattern = Row()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        m._mask = src  # type: ignore[misc]


def test_mask_validates_its_pattern() -> None:
    with pytest.raises(InvalidPattern):
        SparsityMask(torch.tensor([1, 1, 1, 0]), NM(2, 4))
    assert SparsityMask(torch.tensor([1, 0, 0, 1]), NM(2, 4)).pattern == NM(2, 4)


def test_combine_is_and_and_keeps_a_compatible_pattern() -> None:
    nm = SparsityMask(torch.tensor([[1, 1, 0, 0]]), NM(2, 4))
    un = SparsityMask(torch.tensor([[1, 0, 1, 1]]))
    both = nm & un
    assert both.tensor.tolist() == [[True, False, False, False]]
    assert both.pattern == NM(2, 4)  # at most 2 of 4 survives any AND
    assert both.is_subset_of(nm) and both.is_subset_of(un)
    rows = SparsityMask(torch.tensor([[1, 1], [0, 0]]), Row())
    assert (rows & SparsityMask(torch.tensor([[1, 1], [1, 1]]), Row())).pattern == Row()
    assert (rows & SparsityMask(torch.tensor([[1, 0], [1, 1]]))).pattern == Unstructured()


def test_combine_shape_mismatch() -> None:
    with pytest.raises(ShapeMismatch):
        SparsityMask.dense([2, 2]).combine(SparsityMask.dense([4]))


def test_is_subset_of() -> None:
    a = SparsityMask(torch.tensor([1, 0, 0]))
    b = SparsityMask(torch.tensor([1, 1, 0]))
    assert a.is_subset_of(b) and not b.is_subset_of(a)


def test_to_equality_pickle_and_repr() -> None:
    m = SparsityMask(torch.tensor([[1, 0, 0, 1]]), NM(2, 4), name="q_proj")
    assert m.to("cpu") is m
    assert pickle.loads(pickle.dumps(m)) == m
    assert copy.deepcopy(m) == m
    assert m != SparsityMask(torch.tensor([[1, 0, 0, 1]]))  # same values, other pattern
    assert "q_proj" in repr(m) and "2:4" in repr(m)
