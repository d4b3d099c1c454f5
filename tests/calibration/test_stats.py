"""ActivationStats / CalibrationContext: exact sums, derived values, errors, seed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pruning_core.calibration import ActivationStats, CalibrationContext, merge_contexts
from pruning_core.errors import ConfigError, MissingActivationStats, NumericalInstability, ShapeMismatch


# ---------------------------------------------------------------- seed cases (§5 Calibration), ported
def test_new_stats_are_zero():
    s = ActivationStats(4)
    assert s.count == 0 and s.in_features == 4
    assert torch.equal(s.sum_sq, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(s.squared_mean, torch.zeros(4, dtype=torch.float64))


def test_single_token_update():
    # Seed: update with [1,4]-shaped [3,4] -> count 1, norms [3,4]. Here a token is a row of
    # [..., D]; input_norms is ‖X_j‖₂ = sqrt(Σx²) = [3, 4] for that one token.
    for x in (torch.tensor([[3.0, 4.0]]), torch.tensor([3.0, 4.0])):  # [1, D] and a 1-D token
        s = ActivationStats(2)
        s.update(x)
        assert s.count == 1
        assert s.input_norms.tolist() == [3.0, 4.0]
        assert s.mean_abs.tolist() == [3.0, 4.0]


def test_seed_batches_give_exact_rms():
    # Seed: [[1,2],[3,4]] then [[5,6]] -> count 2 then 3. The seed's input_norms were a
    # count-weighted average of per-batch RMS values ([3.157, 4.108], derived); the exact RMS
    # over all three tokens is sqrt((1+9+25)/3), sqrt((4+16+36)/3) = [3.416, 4.320].
    s = ActivationStats(2)
    s.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert s.count == 2
    s.update(torch.tensor([[5.0, 6.0]]))
    assert s.count == 3
    assert s.sum_sq.tolist() == [35.0, 56.0]
    assert s.sum_abs.tolist() == [9.0, 12.0]
    assert s.rms.tolist() == pytest.approx([math.sqrt(35 / 3), math.sqrt(56 / 3)])
    assert s.rms.tolist() == pytest.approx([3.4157, 4.3205], abs=1e-4)
    assert s.input_norms.tolist() == pytest.approx([math.sqrt(35), math.sqrt(56)])


def test_empty_update_is_noop():
    s = ActivationStats(4)
    s.update(torch.zeros(0, 4))
    s.update(torch.zeros(2, 0, 4))
    assert s.count == 0 and float(s.sum_sq.sum()) == 0.0


def test_context_basics():
    ctx = CalibrationContext("c4")
    assert ctx.dataset == "c4"
    ctx.increment_samples(10)
    ctx.increment_samples(5)
    assert ctx.num_samples == 15
    ctx.add_layer_stats("b", ActivationStats(2))
    ctx.add_layer_stats("a", ActivationStats(3))
    assert ctx.layer_names() == ["b", "a"]  # insertion order
    assert ctx.has_stats("a") and not ctx.has_stats("c")
    assert ctx.get_stats("c") is None
    ctx.get_stats("a").count = 42  # mutable in place, as the seed's get_stats_mut
    assert ctx.require_stats("a").count == 42


def test_require_stats_missing_names_layer_and_lists_available():
    ctx = CalibrationContext()
    ctx.add_layer_stats("model.layers.0.q_proj", ActivationStats(2))
    with pytest.raises(MissingActivationStats) as info:
        ctx.require_stats("missing_layer")
    assert info.value.layer == "missing_layer"
    assert "missing_layer" in str(info.value) and "model.layers.0.q_proj" in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- shapes and values
def test_btd_input_is_flattened_into_tokens():
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    s = ActivationStats(4, hessian=True)
    s.update(x)
    flat = x.reshape(-1, 4).double()
    assert s.count == 15
    torch.testing.assert_close(s.sum_sq, (flat ** 2).sum(0))
    torch.testing.assert_close(s.sum_abs, flat.abs().sum(0))
    torch.testing.assert_close(s.xtx, flat.T @ flat, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(s.hessian, flat.T @ flat / 15, rtol=1e-6, atol=1e-6)


def test_wrong_last_dim_names_layer():
    s = ActivationStats(4, name="blk.3.up")
    with pytest.raises(ShapeMismatch, match="blk.3.up"):
        s.update(torch.zeros(2, 3))
    with pytest.raises(ShapeMismatch):
        s.update(torch.tensor(1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activation_names_layer_and_index(bad):
    s = ActivationStats(3, name="layers.1.q")
    x = torch.ones(2, 4, 3)
    x[1, 2, 0] = bad
    with pytest.raises(NumericalInstability) as info:
        s.update(x)
    assert info.value.layer == "layers.1.q"
    assert info.value.index == (1, 2, 0)
    assert s.count == 0  # nothing was added


def test_hessian_none_without_xtx():
    s = ActivationStats(3)
    s.update(torch.ones(2, 3))
    assert s.hessian is None and not s.has_hessian


def test_bad_in_features():
    with pytest.raises(ConfigError):
        ActivationStats(0)


def test_huge_activations_need_float64_partials():
    x = torch.full((4, 1), 3e38)  # finite, but x² overflows float32
    with pytest.raises(NumericalInstability, match="batch_dtype=torch.float64"):
        ActivationStats(1, name="big").update(x)
    s = ActivationStats(1, batch_dtype=torch.float64)
    s.update(x)
    assert math.isfinite(float(s.sum_sq[0]))


# ---------------------------------------------------------------- merge and arrays
def test_merge_is_exact_sum():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g)
    sa, sb, sab = (ActivationStats(3, hessian=True, batch_dtype=torch.float64) for _ in range(3))
    sa.update(a)
    sb.update(b)
    sab.update(torch.cat([a, b]))
    m = sa.merge(sb)
    assert m.count == 12
    torch.testing.assert_close(m.sum_sq, sab.sum_sq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.xtx, sab.xtx, rtol=1e-12, atol=1e-12)
    assert sa.count == 7  # merge does not mutate


def test_merge_rejects_mismatches():
    with pytest.raises(ShapeMismatch):
        ActivationStats(3).merge(ActivationStats(4))
    with pytest.raises(ConfigError):
        ActivationStats(3, hessian=True).merge(ActivationStats(3))


def test_arrays_round_trip_and_validation():
    s = ActivationStats(3, hessian=True, name="x")
    s.update(torch.randn(4, 3, generator=torch.Generator().manual_seed(2)))
    arr = s.to_arrays()
    back = ActivationStats.from_arrays(arr["sum_sq"], arr["sum_abs"], arr["count"], arr["xtx"], name="x")
    assert back.count == s.count
    assert torch.equal(back.sum_sq, s.sum_sq) and torch.equal(back.xtx, s.xtx)
    with pytest.raises(NumericalInstability):
        ActivationStats.from_arrays(torch.tensor([1.0, float("nan")]), torch.ones(2), 1)
    with pytest.raises(NumericalInstability):
        ActivationStats.from_arrays(torch.tensor([1.0, -1.0]), torch.ones(2), 1)
    with pytest.raises(ShapeMismatch):
        ActivationStats.from_arrays(torch.ones(2), torch.ones(3), 1)
    with pytest.raises(ShapeMismatch):
        ActivationStats.from_arrays(torch.ones(2), torch.ones(2), 1, torch.ones(3, 3))
    with pytest.raises(ConfigError):
        ActivationStats.from_arrays(torch.ones(2), torch.ones(2), -1)


def test_context_merge():
    c1, c2 = CalibrationContext("emma"), CalibrationContext()
    s1, s2, s3 = ActivationStats(2), ActivationStats(2), ActivationStats(3)
    s1.update(torch.ones(2, 2))
    s2.update(torch.ones(3, 2))
    s3.update(torch.ones(1, 3))
    c1.add_layer_stats("a", s1)
    c2.add_layer_stats("a", s2)
    c2.add_layer_stats("b", s3)
    c1.increment_samples(1)
    c2.increment_samples(2)
    m = merge_contexts([c1, c2])
    assert m.num_samples == 3 and m.dataset == "emma"
    assert m.require_stats("a").count == 5 and m.require_stats("b").count == 1
    assert m.require_stats("b") is not s3  # copied, not shared


# ---------------------------------------------------------------- property: batch split invariance
def _split_update(t: torch.Tensor, cuts: list[int], dtype: torch.dtype) -> tuple[ActivationStats, ActivationStats]:
    whole = ActivationStats(t.shape[1], hessian=True, batch_dtype=dtype)
    whole.update(t)
    split = ActivationStats(t.shape[1], hessian=True, batch_dtype=dtype)
    bounds = sorted({0, t.shape[0], *(c for c in cuts if c <= t.shape[0])})
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        split.update(t[lo:hi].reshape(1, hi - lo, -1))  # also as [B, T, D]
    return whole, split


_activations = arrays(np.float32, st.tuples(st.integers(1, 24), st.integers(1, 6)),
                      elements=st.floats(-100, 100, width=32))
_cuts = st.lists(st.integers(0, 24), max_size=5)


@given(x=_activations, cuts=_cuts)
def test_statistics_do_not_depend_on_batch_split(x, cuts):
    t = torch.from_numpy(x)
    whole, split = _split_update(t, cuts, torch.float64)
    assert split.count == whole.count
    # float64 partial sums: equal up to float64 rounding.
    torch.testing.assert_close(split.sum_sq, whole.sum_sq, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(split.sum_abs, whole.sum_abs, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(split.xtx, whole.xtx, rtol=1e-12, atol=1e-9)


@given(x=_activations, cuts=_cuts)
def test_float32_partials_are_split_invariant_to_float32_rounding(x, cuts):
    t = torch.from_numpy(x)
    whole, split = _split_update(t, cuts, torch.float32)
    exact = (t.double() ** 2).sum(0)
    scale = float(exact.sum()) + 1.0
    torch.testing.assert_close(split.sum_sq, whole.sum_sq, rtol=1e-6, atol=1e-7 * scale)
    torch.testing.assert_close(split.sum_sq, exact, rtol=1e-6, atol=1e-7 * scale)
    torch.testing.assert_close(split.sum_abs, t.double().abs().sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(split.xtx, whole.xtx, rtol=1e-5, atol=1e-6 * scale)
