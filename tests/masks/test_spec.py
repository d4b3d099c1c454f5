"""SparsitySpec: validated once; a valid spec never prunes a whole comparison group (issue 14)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.errors import ConfigError, InvalidPattern, InvalidSparsity
from pruning_core.masks import NM, Block, MaskScope, Row, SparsityPattern, SparsitySpec, Unstructured
from pruning_core.validate import num_to_prune

LAYER, ROW, GLOBAL = MaskScope.LAYER, MaskScope.ROW, MaskScope.GLOBAL


@pytest.mark.parametrize(
    ("args", "default", "expected"),
    [
        ((0.5,), LAYER, SparsitySpec(0.5, Unstructured(), LAYER)),
        ((0.0, "unstructured"), LAYER, SparsitySpec(0.0)),
        ((0.999, None), LAYER, SparsitySpec(0.999)),
        ((None, "2:4"), LAYER, SparsitySpec(0.5, NM(2, 4))),
        ((0.5, "2:4"), LAYER, SparsitySpec(0.5, NM(2, 4))),
        ((0.5000001, "2:4"), LAYER, SparsitySpec(0.5, NM(2, 4))),  # within 1e-6: the implied value
        ((None, "1:4"), LAYER, SparsitySpec(0.75, NM(1, 4))),
        ((None, "3:4"), LAYER, SparsitySpec(0.25, NM(3, 4))),
        ((0.3, "row"), LAYER, SparsitySpec(0.3, Row())),
        ((0.5, "block:2x2"), LAYER, SparsitySpec(0.5, Block(2, 2))),
        ((0.5, "unstructured"), ROW, SparsitySpec(0.5, Unstructured(), ROW)),  # a method's default
        ((None, "2:4"), ROW, SparsitySpec(0.5, NM(2, 4), LAYER)),  # structured: groups are fixed
        ((0.5, "row"), ROW, SparsitySpec(0.5, Row(), LAYER)),
        ((0.5, "unstructured", "GLOBAL"), ROW, SparsitySpec(0.5, Unstructured(), GLOBAL)),
        ((0.5, Unstructured(), ROW), LAYER, SparsitySpec(0.5, Unstructured(), ROW)),
    ],
)
def test_valid_specs(args, default, expected):
    spec = SparsitySpec.parse(*args, default_scope=default)
    assert spec == expected
    assert type(spec.sparsity) is float


@pytest.mark.parametrize(
    ("args", "error", "named"),
    [
        ((None, "0:4"), InvalidPattern, "0:4"),  # prunes everything (issue 14: ran to sparsity 1.0)
        ((1.0, "0:4"), InvalidPattern, "0:4"),
        ((0.5, "0:8"), InvalidPattern, "0:8"),
        ((None, "4:4"), InvalidPattern, "4:4"),  # prunes nothing
        ((0.0, "4:4"), InvalidPattern, "4:4"),
        ((0.3, "2:4"), InvalidSparsity, "2:4"),  # contradicts the pattern
        ((0.75, "2:4"), InvalidSparsity, "0.75"),
        ((None, "5:4"), InvalidPattern, "5"),
        ((None, "2:0"), InvalidPattern, "M must be > 0"),
        ((0.5, "block:0x2"), InvalidPattern, "0x2"),
        ((0.5, "diagonal"), InvalidPattern, "diagonal"),
        ((1.0,), InvalidSparsity, "1.0"),
        ((1.5,), InvalidSparsity, "1.5"),
        ((-0.1,), InvalidSparsity, "-0.1"),
        ((math.nan,), InvalidSparsity, "nan"),
        ((math.inf,), InvalidSparsity, "inf"),
        ((1 - 1e-12,), InvalidSparsity, "rounds to 1.0"),  # floor(round(n·s, 9)) = n for n = 1
        (("0.5",), InvalidSparsity, "'0.5'"),
        ((True,), InvalidSparsity, "True"),
        ((None, "unstructured"), InvalidSparsity, "required"),
        ((None, "row"), InvalidSparsity, "row"),
        ((0.5, "row", "row"), ConfigError, "scope"),
        ((0.5, "2:4", "global"), ConfigError, "2:4"),
        ((0.5, "block:2x2", ROW), ConfigError, "block:2x2"),
        ((0.5, "unstructured", "everywhere"), ConfigError, "everywhere"),
        ((0.5, 24), ConfigError, "pattern"),
    ],
)
def test_invalid_specs_are_typed_errors_naming_the_value(args, error, named):
    with pytest.raises(error) as info:
        SparsitySpec.parse(*args)
    assert named in str(info.value)


def test_direct_construction_validates_too():
    with pytest.raises(InvalidPattern, match="0:4"):
        SparsitySpec(1.0, NM(0, 4))
    with pytest.raises(InvalidPattern, match="4:4"):
        SparsitySpec(0.0, NM(4, 4))
    with pytest.raises(ConfigError, match="parse"):
        SparsitySpec(0.5, "2:4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="scope"):
        SparsitySpec(0.5, scope="row")  # type: ignore[arg-type]


def test_frozen_hashable_and_with_sparsity():
    spec = SparsitySpec.parse(0.5, scope="row")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sparsity = 0.9  # type: ignore[misc]
    assert {spec, SparsitySpec(0.5, scope=ROW)} == {spec}
    assert spec.with_sparsity(0.7) == SparsitySpec(0.7, Unstructured(), ROW)
    with pytest.raises(InvalidSparsity):
        spec.with_sparsity(1.0)
    nm = SparsitySpec(0.5, NM(2, 4))
    assert nm.with_sparsity(0.5) == nm
    with pytest.raises(InvalidSparsity, match="2:4"):
        nm.with_sparsity(0.6)
    assert str(spec) == "sparsity 0.5, pattern unstructured, scope row"


@pytest.mark.parametrize("text", ["0:4", "0:8", "4:4", "8:8"])
def test_pattern_parse_refuses_groups_pruned_entirely_or_not_at_all(text):
    """flows/config.py validates a job's pattern through SparsityPattern.parse: 0:4 fails there."""
    with pytest.raises(InvalidPattern, match=text):
        SparsityPattern.parse(text)


@pytest.mark.parametrize("text", ["1:4", "2:4", "3:4", "4:8"])
def test_pattern_parse_accepts_1_le_n_lt_m(text):
    assert str(SparsityPattern.parse(text)) == text


@given(s=st.floats(0.0, 1.0, allow_nan=False), n=st.integers(1, 10**7))
def test_a_valid_spec_never_prunes_a_whole_group(s, n):
    try:
        spec = SparsitySpec(s)
    except InvalidSparsity:
        assert s >= 1.0 or round(s, 9) >= 1.0
        return
    assert num_to_prune(n, spec.sparsity) < n
