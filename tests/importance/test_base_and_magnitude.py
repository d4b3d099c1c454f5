"""ImportanceStats / ImportanceScores / MagnitudeImportance: seed cases (§5) and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_core.compat import (
    Importance,
    ImportanceScores,
    ImportanceStats,
    MagnitudeImportance,
    SparseGPTImportance,
    TaylorImportance,
    WandaImportance,
)
from pruning_core.errors import NoParameters, NumericalInstability
from pruning_core.importance import NormType, magnitude_scores


# ---------------------------------------------------------------- ImportanceStats (seed IMP-*)
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], (1.0, 4.0, 2.5, 1.1180)),  # population std
        ([5.0, 5.0, 5.0, 5.0], (5.0, 5.0, 5.0, 0.0)),
        ([42.0], (42.0, 42.0, 42.0, 0.0)),
        ([], (0.0, 0.0, 0.0, 0.0)),
        ([-3.0, -1.0, 0.0, 2.0], (-3.0, 2.0, -0.5, None)),
        ([1e-4, 1e6], (1e-4, 1e6, None, None)),
    ],
)
def test_importance_stats(values, expected):
    s = ImportanceStats.from_tensor(torch.tensor(values))
    for got, want in zip((s.min, s.max, s.mean, s.std), expected, strict=True):
        if want is not None:
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    ("values", "threshold", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5], 0.3, 0.4),
        ([0.1, 0.2, 0.3, 0.4, 0.5], 0.6, 1.0),
        ([0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 0.0),
        ([0.1, 0.2, 0.2, 0.3], 0.2, 0.25),  # strictly below
        ([], 0.5, 0.0),
    ],
)
def test_sparsity_at(values, threshold, expected):
    t = torch.tensor(values)
    assert ImportanceStats.from_tensor(t).sparsity_at(threshold) == pytest.approx(expected)
    assert ImportanceScores(t, "x").sparsity_at(threshold) == pytest.approx(expected)
    assert ImportanceStats().sparsity_at(threshold, t) == pytest.approx(expected)


def test_scores_shape_len_and_stats():
    scores = ImportanceScores(torch.ones(3, 4), "magnitude_l2")
    assert scores.shape == (3, 4) and len(scores) == 12 and not scores.is_empty()
    assert len(ImportanceScores(torch.ones(2, 3), "m")) == 6
    assert scores.stats.mean == 1.0
    assert ImportanceScores(torch.empty(0), "m").is_empty()


def test_every_importance_satisfies_the_protocol():
    for imp in (MagnitudeImportance.l2(), WandaImportance(), SparseGPTImportance(), TaylorImportance()):
        assert isinstance(imp, Importance)
        assert imp.requires_calibration is (not isinstance(imp, MagnitudeImportance))


# ---------------------------------------------------------------- Magnitude (seed MAG-*)
@pytest.mark.parametrize(
    ("norm", "weights", "expected"),
    [
        (NormType.L1, [1.0, -2.0, 3.0, -4.0], [1.0, 2.0, 3.0, 4.0]),
        (NormType.L2, [1.0, -2.0, 3.0, -4.0], [1.0, 4.0, 9.0, 16.0]),
        (NormType.L1, [-0.5, 0.5], [0.5, 0.5]),
        (NormType.L2, [0.5, -0.5, 2.0, -2.0], [0.25, 0.25, 4.0, 4.0]),
        (NormType.LINF, [1.0, -2.0, 3.0, -4.0], [1.0, 2.0, 3.0, 4.0]),
        (NormType.L2, [0.0, -0.0], [0.0, 0.0]),
    ],
)
def test_magnitude_values(norm, weights, expected):
    out = magnitude_scores(torch.tensor(weights), norm)
    assert out.tolist() == expected
    assert bool((out >= 0).all()) and not bool(out.isnan().any())


def test_magnitude_names_and_reduction():
    assert MagnitudeImportance.l1().name == "magnitude_l1"
    assert MagnitudeImportance().name == "magnitude_l2"
    assert MagnitudeImportance.linf().name == "magnitude_linf"
    assert MagnitudeImportance.with_norm(NormType.L1) == MagnitudeImportance.l1()
    assert NormType.LINF.group_reduction == "max" and NormType.L2.group_reduction == "sum"


@pytest.mark.parametrize(
    ("imp", "bad", "method", "kind"),
    [
        (MagnitudeImportance.l2(), float("nan"), "magnitude_l2", "NaN"),
        (MagnitudeImportance.l1(), float("inf"), "magnitude_l1", "Inf"),
        (MagnitudeImportance.l1(), float("-inf"), "magnitude_l1", "-Inf"),
    ],
)
def test_magnitude_non_finite(imp, bad, method, kind):
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[1, 2] = bad
    with pytest.raises(NumericalInstability) as info:
        imp.compute(lin, layer_name="fc")
    assert info.value.method == method and kind in info.value.details
    assert info.value.layer == "fc" and info.value.index == (1, 2)


def test_magnitude_through_protocol():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, -4.0]]))
    scores = MagnitudeImportance.l2().compute(lin)
    assert scores.method == "magnitude_l2"
    assert scores.values.flatten().tolist() == [1.0, 4.0, 9.0, 16.0]
    assert scores.values.dtype == torch.float32


def test_magnitude_empty_module_and_large_values():
    with pytest.raises(NoParameters):
        MagnitudeImportance.l2().compute(nn.ReLU())
    big = MagnitudeImportance.l1().compute(torch.tensor([1e10]))
    assert big.values.item() == pytest.approx(1e10, abs=1e5)
    with pytest.raises(NumericalInstability, match="overflow"):  # w² > float32 max
        MagnitudeImportance.l2().compute(torch.tensor([1e20]))


def test_magnitude_bf16_weights_scored_in_float32():
    w = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    out = magnitude_scores(w, NormType.L2)
    assert out.dtype == torch.float32 and out.tolist() == [[2.25, 4.0]]
