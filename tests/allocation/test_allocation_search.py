"""Allocation search: the level grid keeps the mean exact, the search finds a known allocation,
a resumed search equals an uninterrupted one, and candidates assemble exactly from the database."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from pruning_core.allocation import Allocation, allocation_units, layer_targets, prune_allocated_
from pruning_core.allocation.database import (
    CandidateAssembler,
    build_variant,
    database_tasks,
    evaluate_candidates,
)
from pruning_core.allocation.fitness import KLFitness, LossFitness
from pruning_core.allocation.search import (
    LevelGrid,
    SearchConfig,
    SearchState,
    advance,
    initial_state,
    nearest_levels,
    propose,
    run_search,
    step,
)
from pruning_core.calibration.capture import collect_activation_stats
from pruning_core.errors import ConfigError
from pruning_core.minitron.loss import lm_loss
from tests.conftest import make_tiny_llama


def test_grid_keeps_the_parameter_weighted_mean_exact_for_unequal_units():
    grid = LevelGrid(0.5, (1000, 300, 50), step_params=10, max_level=3)
    levels = (-2, 3, -1)  # sums to 0
    pruned = sum(grid.sparsity(u, lv) * n for u, (lv, n) in enumerate(zip(levels, grid.sizes, strict=True)))
    assert pruned == pytest.approx(0.5 * 1350, abs=1e-9)
    assert grid.sparsity(2, -1) == pytest.approx(0.3)
    assert grid.levels(2) == [-2, -1, 0, 1, 2]  # +-3 would leave [0, 0.99]
    with pytest.raises(ConfigError, match="summing"):
        grid.check((1, 0, 0))
    assert LevelGrid.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid


def test_nearest_levels_sum_to_zero_and_follow_the_allocation():
    grid = LevelGrid(0.6, (100,) * 4, step_params=2, max_level=5)
    wanted = [0.55, 0.61, 0.63, 0.61]  # (s_u - s) / 0.02 = -2.5, 0.5, 1.5, 0.5
    levels = nearest_levels(grid, wanted)
    assert sum(levels) == 0 and levels[0] < levels[1] <= levels[2]
    assert all(abs(lv - (w - 0.6) / 0.02) <= 1 for lv, w in zip(levels, wanted, strict=True))


def test_propose_is_reproducible_distinct_and_exact():
    grid = LevelGrid(0.5, (64,) * 6, step_params=4, max_level=2)
    config = SearchConfig(offspring=12, stages=(3, 1), seed=7)
    parent = (0,) * 6
    kids = propose(grid, parent, config, generation=3)
    assert kids == propose(grid, parent, config, generation=3)
    assert kids != propose(grid, parent, config, generation=4)
    assert len(set(kids)) == 12 and parent not in kids
    for kid in kids:
        grid.check(kid)


def test_elitism_keeps_the_parent_when_every_child_is_worse():
    grid = LevelGrid(0.5, (64,) * 4, step_params=4, max_level=2)
    config = SearchConfig(generations=2, offspring=4, stages=(2, 1))
    state = initial_state(grid, (0,) * 4, config)
    state = advance(state, [1.0, 2.0, 3.0, 4.0], grid, config)  # stage 0 -> 2 survivors + the parent
    assert state.stage == 1 and state.pending[-1] == (0,) * 4 and len(state.pending) == 3
    state = advance(state, [5.0, 6.0, 0.5], grid, config)
    assert state.parent == (0,) * 4 and state.parent_fitness == 0.5 and state.generation == 1
    with pytest.raises(ConfigError, match="finite"):
        advance(state, [float("nan")] * len(state.pending), grid, config)


class ToyDecoder(nn.Module):
    """Four parallel blocks, output ``Σ_i scale_i·W_i x``; block 2's output is scaled 20x, so its
    pruning error costs 400x more: the right allocation gives it the lowest sparsity."""

    def __init__(self, width: int = 32, scales=(1.0, 1.0, 20.0, 1.0)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width, bias=False)) for _ in scales)
        self.scales = scales

    def forward(self, x):
        return sum(scale * block(x) for block, scale in zip(self.layers, self.scales, strict=True))


def _toy_database(model, grid, units):
    weights = {n: model.get_submodule(n).weight.detach().clone() for u in units for n in u.layers}
    return {(u, lv): build_variant(units[u], grid.sparsity(u, lv), weights, {}, "magnitude")
            for u, lv in database_tasks(grid)}


def test_search_finds_the_known_allocation_on_a_toy_model():
    model = ToyDecoder()
    units = allocation_units(model, "block")
    grid = LevelGrid.for_units(units, 0.5, step=0.1, max_level=3)
    assembler = CandidateAssembler(model, units, _toy_database(model, grid, units))
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(x)

    def fitness(m):
        with torch.no_grad():
            return float((m(x) - dense).pow(2).mean())

    def evaluate(cands, stage):
        return evaluate_candidates(assembler, cands, fitness)

    config = SearchConfig(generations=12, offspring=8, stages=(3, 1), seed=0)
    final = run_search(initial_state(grid, (0,) * 4, config), evaluate, grid, config)
    every = [c for c in itertools.product(range(-3, 4), repeat=4) if sum(c) == 0]  # brute force: 231 candidates
    fits = evaluate(every, 0)
    assert final.parent == every[min(range(len(every)), key=fits.__getitem__)]
    assert final.parent[2] == -3  # the sensitive block at the grid's lowest sparsity (0.2)
    assert final.parent_fitness < evaluate([(0,) * 4], 0)[0] / 2
    assert abs(grid.allocation(units, final.parent).mean - 0.5) < 1e-12


def test_resumed_search_equals_uninterrupted_and_repeats_nothing():
    grid = LevelGrid(0.5, (100,) * 5, step_params=5, max_level=3)
    config = SearchConfig(generations=4, offspring=6, stages=(3, 1), seed=3)
    target = torch.tensor([-3.0, 1.0, 2.0, 0.0, 0.0])
    calls: list[int] = []

    def evaluate(cands, stage):
        calls.append(len(cands))
        return [float((torch.tensor(c, dtype=torch.float64) - target).pow(2).sum()) for c in cands]

    start = initial_state(grid, (0,) * 5, config)
    whole = run_search(start, evaluate, grid, config)
    n_whole = len(calls)
    calls.clear()
    state = start
    for _ in range(3):  # killed after three steps (one and a half generations); state persisted as JSON
        state = step(state, evaluate, grid, config)
    saved = json.dumps(state.to_dict())
    resumed = run_search(SearchState.from_dict(json.loads(saved)), evaluate, grid, config)
    assert resumed == whole and len(calls) == n_whole == 2 * config.generations
    assert whole.history[-1][1] <= whole.history[0][1]


def test_assembled_candidate_equals_direct_pruning(generator):
    model = make_tiny_llama(num_hidden_layers=3)
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=generator) for _ in range(2)]
    ctx = collect_activation_stats(model, batches, progress=False)
    units = allocation_units(model, "block")
    grid = LevelGrid.for_units(units, 0.5, step=0.1, max_level=2)
    weights = {n: model.get_submodule(n).weight.detach().clone() for u in units for n in u.layers}
    stats = {n: ctx.require_stats(n) for n in weights}
    database = {(u, lv): build_variant(units[u], grid.sparsity(u, lv), weights, stats, "wanda")
                for u, lv in database_tasks(grid)}
    assembler = CandidateAssembler(model, units, database)
    levels = (2, -1, -1)
    assert assembler.apply_(levels) == 3 and assembler.apply_((2, -2, 0)) == 2
    assembler.apply_(levels)
    assembled = {n: model.get_submodule(n).weight.detach().clone() for n in weights}
    assembler.restore_dense_()
    direct = make_tiny_llama(num_hidden_layers=3)
    alloc: Allocation = grid.allocation(units, levels)
    prune_allocated_(direct, ctx, layer_targets(direct, alloc, "wanda"), "wanda")
    for n, w in assembled.items():
        assert torch.equal(w, direct.get_submodule(n).weight), n
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in weights.items())  # dense again


def test_sparsegpt_variants_carry_their_updated_weights(generator):
    model = make_tiny_llama(num_hidden_layers=2)
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=generator) for _ in range(2)]
    ctx = collect_activation_stats(model, batches, hessian=True, progress=False)
    unit = allocation_units(model, "block")[0]
    weights = {n: model.get_submodule(n).weight.detach() for n in unit.layers}
    variant = build_variant(unit, 0.5, weights, {n: ctx.require_stats(n) for n in unit.layers}, "sparsegpt")
    for n in unit.layers:
        w, keep = variant.weights[n], variant.masks[n]
        assert torch.all(w[~keep] == 0) and not torch.equal(w[keep], weights[n][keep])  # OBS updated kept weights
    pruned = sum(int((~m).sum()) for m in variant.masks.values())
    assert abs(pruned - 0.5 * unit.num_params) <= 12 * len(unit.layers)


def test_kl_fitness_is_zero_for_the_dense_model_and_loss_fitness_is_lm_loss(generator):
    model = make_tiny_llama()
    windows = torch.randint(0, model.config.vocab_size, (3, 12), generator=generator)
    kl = KLFitness.from_model(model, windows, batch_size=2)
    assert abs(kl(model)) < 1e-6 and kl.first(1).windows.shape == (1, 12)
    other = make_tiny_llama()
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(0.0)
    assert kl(other) > 1e-4
    assert LossFitness(windows, 2)(model) == pytest.approx(lm_loss(model, list(windows.split(2))))
