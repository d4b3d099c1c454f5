"""WandaImportance: the paper's metric |W_ij|·‖X_j‖₂ (seed WND-* cases, corrected where buggy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from pruning_core.calibration import ActivationStats, CalibrationContext
from pruning_core.compat import WandaImportance
from pruning_core.errors import (
    CalibrationRequired,
    ConfigError,
    MissingActivationStats,
    NoParameters,
    NumericalInstability,
    ShapeMismatch,
)
from pruning_core.importance import NormType, magnitude_scores, wanda_scores
from pruning_core.masks.pattern import NM


def _context(name: str, x: torch.Tensor) -> CalibrationContext:
    stats = ActivationStats(x.shape[-1])
    stats.update(x)
    ctx = CalibrationContext()
    ctx.add_layer_stats(name, stats)
    return ctx


def _linear(weight) -> nn.Linear:
    w = torch.as_tensor(weight, dtype=torch.float32)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_golden_activation_norms_decide():
    # One row W = [1, 2, 3, 4]; input norms ‖X_j‖₂ = [100, 10, 1, 0.1] (so Σx² = [1e4, 100, 1, 0.01]).
    # Scores |W|·‖X‖ = [100, 20, 3, 0.4]: at 50% the first two weights are kept although they
    # are the smallest; magnitude alone would keep the last two.
    scores = wanda_scores(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([1e4, 100.0, 1.0, 0.01]))
    assert scores[0].tolist() == pytest.approx([100.0, 20.0, 3.0, 0.4])
    kept = torch.argsort(scores[0], descending=True, stable=True)[:2]
    assert sorted(kept.tolist()) == [0, 1]


def test_activation_exponent_is_one_not_one_half():
    # W = [1, 4], ‖X‖ = [10, 1]: the paper's metric gives [10, 4] (keep w0). The seed applied
    # sqrt to a norm (|W|·‖X‖^½ = [3.16, 4]) and would keep w1 instead.
    scores = wanda_scores(torch.tensor([[1.0, 4.0]]), torch.tensor([100.0, 1.0]))
    assert scores[0].tolist() == pytest.approx([10.0, 4.0])
    assert int(scores[0].argmax()) == 0


@pytest.mark.parametrize(
    ("weight", "sum_sq", "expected"),
    [
        # Seed with_eps(0): W=[[1,2],[3,4]], "norms" [4,9] -> [[2,6],[6,12]]. The seed fed an RMS
        # into the sqrt; here the input is Σx², whose sqrt is ‖X_j‖₂, so these numbers are right.
        ([[1.0, 2.0], [3.0, 4.0]], [4.0, 9.0], [[2.0, 6.0], [6.0, 12.0]]),
        ([[-2.0, -3.0]], [1.0, 4.0], [[2.0, 6.0]]),
        # Seed with_eps(1e-10): norm 0, w=1 -> 1e-5. Corrected: a channel that is never active
        # scores 0 (its weight never affects the output on the calibration data); no eps.
        ([[1.0]], [0.0], [[0.0]]),
    ],
)
def test_seed_values(weight, sum_sq, expected):
    assert wanda_scores(torch.tensor(weight), torch.tensor(sum_sq)).tolist() == expected


def test_shape_errors():
    with pytest.raises(ShapeMismatch) as info:
        wanda_scores(torch.ones(2, 3), torch.ones(2))
    assert info.value.expected == [3] and info.value.got == [2]
    with pytest.raises(ShapeMismatch):
        wanda_scores(torch.ones(3), torch.ones(3))  # 1-D weight
    with pytest.raises(ShapeMismatch):
        wanda_scores(torch.ones(2, 3), torch.ones(0))  # empty norms
    with pytest.raises(ShapeMismatch):  # rank 3: the seed panicked here
        wanda_scores(torch.ones(2, 3, 4), torch.ones(4), layer_name="conv")


@pytest.mark.parametrize(
    ("weight_bad", "norm_bad", "kind"),
    [(float("nan"), None, "NaN"), (None, float("nan"), "NaN"), (float("inf"), None, "Inf"), (None, float("inf"), "Inf")],
)
def test_non_finite_inputs(weight_bad, norm_bad, kind):
    w, n = torch.ones(2, 3), torch.ones(3)
    if weight_bad is not None:
        w[1, 1] = weight_bad
    if norm_bad is not None:
        n[2] = norm_bad
    with pytest.raises(NumericalInstability) as info:
        wanda_scores(w, n, layer_name="l")
    assert info.value.method == "wanda" and kind in info.value.details and info.value.layer == "l"
    assert info.value.index == ((1, 1) if weight_bad is not None else (2,))


def test_negative_sum_of_squares_rejected():
    # Seed: norm -1 was silently treated as 0. A negative Σx² is corrupt statistics.
    with pytest.raises(NumericalInstability, match="negative"):
        wanda_scores(torch.ones(1, 2), torch.tensor([1.0, -1.0]))


def test_through_protocol_and_errors():
    lin = _linear([[1.0, 2.0], [3.0, 4.0]])
    ctx = _context("fc", torch.tensor([[2.0, 3.0]]))
    scores = WandaImportance("fc").compute(lin, ctx)
    assert scores.method == "wanda" and scores.shape == (2, 2)
    assert scores.values.tolist() == [[2.0, 6.0], [6.0, 12.0]]
    assert WandaImportance().compute(lin, ctx, layer_name="fc").values.tolist() == scores.values.tolist()
    with pytest.raises(CalibrationRequired) as info:
        WandaImportance("fc").compute(lin)
    assert info.value.method == "wanda"
    with pytest.raises(MissingActivationStats) as missing:
        WandaImportance("other").compute(lin, ctx)
    assert missing.value.layer == "other" and missing.value.available == ["fc"]
    with pytest.raises(NoParameters):
        WandaImportance("fc").compute(nn.ReLU(), ctx)
    empty = CalibrationContext()
    empty.add_layer_stats("fc", ActivationStats(2))
    with pytest.raises(CalibrationRequired):  # statistics with zero tokens
        WandaImportance("fc").compute(lin, empty)
    with pytest.raises(ConfigError, match="layer_name") as no_name:  # a context, but no name to look up
        WandaImportance().compute(lin, ctx)
    assert "1 layers" in str(no_name.value)


def test_pattern_round_trip():
    assert WandaImportance("x").with_pattern(NM(2, 4)).pattern == NM(2, 4)


def test_uses_all_tokens_of_btd_batches():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    ctx = _context("fc", x)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    got = WandaImportance("fc").compute(_linear(w), ctx).values
    expected = w.abs() * x.reshape(-1, 3).norm(dim=0)[None, :]  # |W|·‖X_j‖₂ over all 10 tokens
    torch.testing.assert_close(got, expected)


@given(
    w=arrays(np.float32, (3, 5), elements=st.floats(-10, 10, width=32, allow_subnormal=False)),
    x=arrays(np.float32, (4, 5), elements=st.floats(-10, 10, width=32, allow_subnormal=False)),
    c=st.floats(0.01, 100.0),
)
def test_row_ranking_invariant_under_positive_activation_scaling(w, x, c):
    weight, acts = torch.from_numpy(w), torch.from_numpy(x).double()
    base = wanda_scores(weight, (acts ** 2).sum(0))
    scaled = wanda_scores(weight, ((c * acts) ** 2).sum(0))
    # Scaling every activation by c scales every score by c (up to float32 rounding).
    torch.testing.assert_close(scaled.double(), base.double() * c, rtol=1e-5, atol=1e-30)
    order = torch.argsort(base.double(), dim=1, stable=True)
    assert bool((torch.diff(torch.gather(scaled.double(), 1, order), dim=1) >= -1e-5 * scaled.max()).all())


@given(w=arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32, allow_subnormal=False)), norm=st.floats(1.0, 10.0))
def test_constant_activation_norms_equal_magnitude_ranking(w, norm):
    weight = torch.from_numpy(w)
    scores = wanda_scores(weight, torch.full((6,), norm ** 2))
    mag = magnitude_scores(weight, NormType.L1)
    torch.testing.assert_close(scores, weight.abs() * torch.tensor(norm, dtype=torch.float32), rtol=1e-6, atol=0)
    assert torch.equal(torch.argsort(scores, dim=1, stable=True), torch.argsort(mag, dim=1, stable=True))
