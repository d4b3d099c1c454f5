"""Integer rounding of allocations to comparison groups, and pruning at an allocation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.allocation import (
    Allocation,
    allocation_units,
    comparison_groups,
    layer_targets,
    prune_allocated_,
    prune_allocated_sequential_,
    realised_count,
    round_to_groups,
)
from pruning_core.calibration.capture import collect_activation_stats
from pruning_core.errors import ConfigError
from pruning_core.masks import MaskScope
from pruning_core.methods import get_method
from pruning_core.pruning import prune_sequential
from tests.conftest import make_tiny_llama


def test_round_to_groups_golden():
    # A: 2 groups of 10, B: 1 group of 5, both at 0.33: per group 3.3 and 1.65 -> floors 3 and 1 prune
    # 2*3 + 1 = 7 of floor(0.33 * 25) = 8; the missing 1 goes to B (fraction .65 > .3, and r_B = 1 <= 1)
    out = round_to_groups({"A": 0.33, "B": 0.33}, {"A": (2, 10), "B": (1, 5)})
    assert out == {"A": 0.3, "B": 0.4}
    assert realised_count(out, {"A": (2, 10), "B": (1, 5)}) == 8


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(2, 60), st.floats(0.0, 0.95)), min_size=1, max_size=12))
def test_round_to_groups_properties(layers):
    groups = {f"l{i}": (r, g) for i, (r, g, _) in enumerate(layers)}
    wanted = {f"l{i}": s for i, (_, _, s) in enumerate(layers)}
    out = round_to_groups(wanted, groups)
    target = math.floor(round(math.fsum(wanted[n] * r * g for n, (r, g) in groups.items()), 6))
    got = realised_count(out, groups)
    assert got <= target
    raised = {n for n in out if round(out[n] * groups[n][1]) > math.floor(round(wanted[n] * groups[n][1], 9))}
    assert all(target - got < groups[n][0] for n in out if n not in raised)  # shortfall < every r not raised
    for n, (_, g) in groups.items():
        k = out[n] * g
        assert abs(k - round(k)) < 1e-9 and abs(k - wanted[n] * g) < 1 + 1e-9


def test_comparison_groups():
    assert comparison_groups((8, 16), MaskScope.ROW) == (8, 16)
    assert comparison_groups((8, 16), MaskScope.LAYER) == (1, 128)
    with pytest.raises(ConfigError, match="ROW or LAYER"):
        comparison_groups((8, 16), MaskScope.GLOBAL)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_pruning_at_an_allocation_realises_the_rounded_counts(method, generator):
    model = make_tiny_llama(num_hidden_layers=3)
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=generator) for _ in range(2)]
    ctx = collect_activation_stats(model, batches, progress=False)
    units = allocation_units(model, "block")
    alloc = Allocation(0.55, tuple(units), (0.5, 0.6, 0.55))
    targets = layer_targets(model, alloc, method)
    scope = MaskScope.ROW if method == "wanda" else MaskScope.LAYER
    masks = prune_allocated_(model, ctx, targets, method)
    for unit, s in zip(units, alloc.sparsities, strict=True):
        groups = {n: comparison_groups(tuple(model.get_submodule(n).weight.shape), scope) for n in unit.layers}
        zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in unit.layers)
        assert zeros == realised_count({n: targets[n] for n in unit.layers}, groups)
        assert zeros == sum(int((~masks[n]).sum()) for n in unit.layers)
        assert 0 <= math.floor(s * unit.num_params) - zeros < max(r for r, _ in groups.values())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_uniform_allocation_equals_prune_sequential(method, generator):
    model = make_tiny_llama(num_hidden_layers=2)
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=generator) for _ in range(2)]
    reference = copy.deepcopy(model)
    chosen = get_method(method)
    prune_sequential(reference, batches, chosen, chosen.spec(0.5), progress=False, measure_memory=False)
    alloc = Allocation.uniform(allocation_units(model, "block"), 0.5)
    prune_allocated_sequential_(model, batches, layer_targets(model, alloc, method), method)
    for name, param in reference.named_parameters():
        assert torch.equal(param, model.get_parameter(name)), name
