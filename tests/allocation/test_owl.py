"""OWL allocation: outlier ratios, the band, the exact parameter-weighted mean, degenerate inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.allocation import (
    Allocation,
    OWLConfig,
    allocation_from_ratios,
    allocation_units,
    outlier_ratio,
    owl_allocation,
    owl_sparsities,
)
from pruning_core.calibration.capture import collect_activation_stats
from pruning_core.errors import ConfigError, NumericalInstability
from tests.conftest import make_tiny_llama


def weighted_mean(s: torch.Tensor, n: torch.Tensor) -> float:
    return math.fsum((s.double() * n.double()).tolist()) / float(n.double().sum())


def test_outlier_ratio_golden():
    # scores 1, 1, 1, 1, 10 (pooled from two tensors): mean 2.8; M = 2 -> threshold 5.6 -> 1 of 5 above
    assert outlier_ratio([torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 1.0, 10.0]])], 2.0) == pytest.approx(0.2)
    # strictly above: the threshold itself is not an outlier (mean 1 -> M = 1 -> threshold 1)
    assert outlier_ratio([torch.ones(4)], 1.0) == 0.0


@given(ratios=st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=40),
       sizes=st.lists(st.integers(1, 10_000), min_size=40, max_size=40),
       sparsity=st.floats(0.3, 0.8), lam=st.floats(0.0, 0.2))
def test_band_and_exact_weighted_mean(ratios, sizes, sparsity, lam):
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes[: len(ratios)], dtype=torch.float64)
    s = owl_sparsities(r, n, sparsity, lam)
    assert torch.isfinite(s).all()
    assert float(s.min()) >= sparsity - lam - 1e-12 and float(s.max()) <= sparsity + lam + 1e-12
    assert weighted_mean(s, n) == pytest.approx(sparsity, abs=1e-12)
    order = torch.argsort(r, stable=True)  # more outliers -> never more sparsity
    assert bool((s[order][1:] <= s[order][:-1] + 1e-12).all())


def test_mean_is_parameter_weighted_not_block_count_weighted():
    r = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    n = torch.tensor([1000.0, 10.0, 10.0], dtype=torch.float64)
    s = owl_sparsities(r, n, 0.5, 0.1)
    assert weighted_mean(s, n) == pytest.approx(0.5, abs=1e-12)
    assert float(s.mean()) != pytest.approx(0.5, abs=1e-3)  # the unweighted mean is not the target


def test_matches_reference_formula_when_inside_the_band():
    # equal sizes, symmetric ratios: the references' min-max + mean shift stays in the band
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    s, lam = 0.7, 0.08
    lor = 2 * lam * (r - r.min()) / (r.max() - r.min())  # luuyin/OWL prune_wanda_outlier, in sparsity form
    reference = s - lor + lor.mean()
    assert torch.allclose(owl_sparsities(r, torch.ones(4), s, lam), reference, atol=1e-15)


def test_one_outlier_block_stays_in_the_band():
    # the reference would give the outlier block s - 2*lam + 2*lam/U = 0.55 < s - lam
    r = torch.tensor([0.0] * 9 + [1.0], dtype=torch.float64)
    s = owl_sparsities(r, torch.ones(10), 0.7, 0.08)
    assert float(s[-1]) == pytest.approx(0.62, abs=1e-12)
    assert float(s.mean()) == pytest.approx(0.7, abs=1e-12)


@pytest.mark.parametrize("ratios", [[3.0, 3.0, 3.0], [7.0], [0.0, 0.0]])
def test_equal_ratios_give_uniform_without_nan(ratios):
    r = torch.tensor(ratios, dtype=torch.float64)
    s = owl_sparsities(r, torch.ones(len(ratios)), 0.6, 0.08)
    assert torch.equal(s, torch.full_like(r, 0.6))


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(ConfigError, match="band"):
        owl_sparsities(torch.tensor([1.0, 2.0]), torch.ones(2), 0.05, 0.08)
    with pytest.raises(NumericalInstability):
        owl_sparsities(torch.tensor([1.0, float("nan")]), torch.ones(2), 0.5, 0.08)
    with pytest.raises(ConfigError):
        owl_sparsities(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), 0.5, 0.08)
    with pytest.raises(ConfigError, match="owl.m"):
        OWLConfig(m=0)
    with pytest.raises(ConfigError, match="owl.lambda"):
        OWLConfig(lam=-0.1)


def _tiny_stats(model, generator):
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=generator) for _ in range(2)]
    return collect_activation_stats(model, batches, progress=False)


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_owl_allocation_on_a_model(granularity, generator):
    model = make_tiny_llama(num_hidden_layers=4)
    with torch.no_grad():  # outlier features into the last block (no block downstream): its Wanda scores get a heavy tail
        model.model.layers[3].input_layernorm.weight[:3] *= 20.0
    ctx = _tiny_stats(model, generator)
    units = allocation_units(model, granularity)
    alloc = owl_allocation(model, ctx, units, 0.6, OWLConfig(m=5, lam=0.1))
    assert alloc.mean == pytest.approx(0.6, abs=1e-12)
    assert all(0.5 - 1e-12 <= s <= 0.7 + 1e-12 for s in alloc.sparsities)
    lowest = alloc.units[min(range(len(units)), key=lambda i: alloc.sparsities[i])].name
    assert lowest.startswith("model.layers.3")
    assert set(alloc.layer_sparsities()) == {n for u in units for n in u.layers}
    again = Allocation.from_dict(json.loads(json.dumps(alloc.to_dict())))
    assert again == alloc


def test_allocation_from_ratios_by_name_and_validation():
    units = allocation_units(make_tiny_llama(num_hidden_layers=3), "block")
    alloc = allocation_from_ratios(units, {u.name: i for i, u in enumerate(units)}, 0.5, 0.05)
    assert alloc.sparsities[0] > alloc.sparsities[-1] and alloc.source == "owl"
    with pytest.raises(ConfigError):
        Allocation(0.5, tuple(units), (0.5, 1.0, 0.0))
    with pytest.raises(ConfigError, match="granularity"):
        allocation_units(make_tiny_llama(), "row")
    alloc.check_units(units)
    with pytest.raises(ConfigError, match="other units"):
        alloc.check_units(allocation_units(make_tiny_llama(num_hidden_layers=3), "layer"))
