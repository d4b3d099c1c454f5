"""An evolutionary allocation search in the spirit of EvoPress (Sieberling et al. 2024, arXiv:2410.14649).

Stage: allocation. Candidates are *levels*, one integer per unit. As in EvoPress
(IST-DASLab/EvoPress ``prune.py``: ``weights_diff``), one level is a fixed number of weights
``Δ``: unit ``u`` at level ``l`` has sparsity ``s + l·Δ / n_u``, so every candidate whose levels
sum to zero prunes exactly ``s·N`` weights (parameter-weighted average exactly ``s``), whatever
the unit sizes. A mutation moves one level from one unit to another (1 to 3 times, biased to 1:
``min(randint(1, 3), randint(1, 3))``), so the sum stays zero.

One generation: ``offspring`` distinct mutants of the parent are screened in selection stages
(``stages[k]`` survivors after stage ``k``; the caller may use more calibration tokens in later
stages, as EvoPress's ``tokens_per_selection``); the parent joins the last stage (elitism), whose
single survivor is the next parent. Lower fitness is better (KL divergence to the dense model,
or LM loss).

Everything here is pure: :class:`SearchState` is a small JSON-able value, randomness comes from a
``random.Random`` seeded by ``(seed, generation)``, and :func:`advance` maps a state and the
fitnesses of its pending candidates to the next state. A flow persists the state after every
:func:`step`; a killed search resumes from it without repeating finished generations or stages.
The expensive parts (pruning every unit at every level, evaluating candidates) are in
``database.py``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pruning_core.allocation.units import Allocation, AllocationUnit
from pruning_core.errors import ConfigError

Levels = tuple[int, ...]
Evaluate = Callable[[list[Levels], int], Sequence[float]]  # (candidates, stage) -> fitness per candidate


@dataclass(frozen=True, slots=True)
class LevelGrid:
    """Sparsity levels of every unit: ``sparsity(u, l) = target + l·step_params / sizes[u]``.

    Attributes:
        target: the average sparsity ``s``.
        sizes: weights per unit ``n_u``.
        step_params: weights per level ``Δ`` (> 0).
        max_level: levels run from ``-max_level`` to ``max_level`` where the sparsity stays in
            ``[min_sparsity, max_sparsity]``.
    """

    target: float
    sizes: tuple[int, ...]
    step_params: int
    max_level: int
    min_sparsity: float = 0.0
    max_sparsity: float = 0.99

    def __post_init__(self) -> None:
        if self.step_params < 1 or self.max_level < 1 or not self.sizes or min(self.sizes) < 1:
            raise ConfigError("search.grid", f"need step_params >= 1, max_level >= 1 and positive unit sizes; "
                                             f"got {self.step_params}, {self.max_level}, {self.sizes[:3]}")
        if not (0.0 <= self.min_sparsity <= self.target <= self.max_sparsity < 1.0):
            raise ConfigError("search.grid", f"need 0 <= min {self.min_sparsity} <= target {self.target} "
                                             f"<= max {self.max_sparsity} < 1")

    @classmethod
    def for_units(cls, units: Sequence[AllocationUnit], target: float, *, step: float, max_level: int,
                  min_sparsity: float = 0.0, max_sparsity: float = 0.99) -> LevelGrid:
        """A grid whose level is ``step`` (a sparsity fraction) of the mean unit size; with equal
        units (SmolLM2's blocks) every level is exactly ``step``."""
        sizes = tuple(u.num_params for u in units)
        delta = max(1, round(step * sum(sizes) / len(sizes)))
        return cls(target, sizes, delta, max_level, min_sparsity, max_sparsity)

    def sparsity(self, unit: int, level: int) -> float:
        return self.target + level * self.step_params / self.sizes[unit]

    def valid(self, unit: int, level: int) -> bool:
        return abs(level) <= self.max_level and self.min_sparsity <= self.sparsity(unit, level) <= self.max_sparsity

    def levels(self, unit: int) -> list[int]:
        """Valid levels of ``unit``, ascending (always including 0)."""
        return [lv for lv in range(-self.max_level, self.max_level + 1) if self.valid(unit, lv)]

    def allocation(self, units: Sequence[AllocationUnit], levels: Levels, source: str = "search") -> Allocation:
        self.check(levels)
        return Allocation(self.target, tuple(units), tuple(self.sparsity(u, lv) for u, lv in enumerate(levels)), source)

    def check(self, levels: Levels) -> None:
        """ConfigError unless ``levels`` has one valid level per unit summing to 0."""
        if len(levels) != len(self.sizes) or sum(levels) != 0:
            raise ConfigError("levels", f"need {len(self.sizes)} levels summing to 0; got {len(levels)} "
                                        f"summing to {sum(levels)}")
        bad = [(u, lv) for u, lv in enumerate(levels) if not self.valid(u, lv)]
        if bad:
            raise ConfigError("levels", f"(unit, level) pairs outside the grid: {bad[:3]}")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "sizes": list(self.sizes), "step_params": self.step_params,
                "max_level": self.max_level, "min_sparsity": self.min_sparsity, "max_sparsity": self.max_sparsity}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LevelGrid:
        return cls(float(data["target"]), tuple(int(s) for s in data["sizes"]), int(data["step_params"]),
                   int(data["max_level"]), float(data["min_sparsity"]), float(data["max_sparsity"]))


def nearest_levels(grid: LevelGrid, sparsities: Sequence[float]) -> Levels:
    """Grid levels closest to ``sparsities`` (e.g. the OWL allocation) with sum exactly 0.

    Each ``x_u = (s_u − s)·n_u / Δ`` is rounded to the nearest valid level; the sum is then
    repaired one level at a time, moving the unit whose rounding error is largest in the needed
    direction (ties: lower index).
    """
    if len(sparsities) != len(grid.sizes):
        raise ConfigError("sparsities", f"{len(sparsities)} sparsities for {len(grid.sizes)} units")
    ideal = [(s - grid.target) * n / grid.step_params for s, n in zip(sparsities, grid.sizes, strict=True)]
    levels = [min(grid.levels(u), key=lambda lv, x=x: (abs(lv - x), lv)) for u, x in enumerate(ideal)]
    while (total := sum(levels)) != 0:
        move = -1 if total > 0 else 1
        movable = [u for u in range(len(levels)) if grid.valid(u, levels[u] + move)]
        if not movable:
            raise ConfigError("search.grid", "no unit can move to make the levels sum to 0; widen the grid")
        u = max(movable, key=lambda i: (move * (ideal[i] - levels[i]), -i))
        levels[u] += move
    return tuple(levels)


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchConfig:
    """Hyper-parameters of the search (EvoPress's defaults are 400 generations, 64 offspring,
    survivors 8, 2, 1; far fewer suffice for 30 blocks).

    Attributes:
        generations: number of generations to run.
        offspring: distinct mutants per generation.
        stages: survivors after each selection stage; the last must be 1.
        max_flips: at most this many level moves per mutant.
        seed: seeds every generation's ``random.Random``.
    """

    generations: int = 30
    offspring: int = 16
    stages: tuple[int, ...] = (4, 1)
    max_flips: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        ok = (self.generations >= 0 and self.offspring >= 1 and self.max_flips >= 1 and self.stages
              and self.stages[-1] == 1 and all(a >= b for a, b in itertools.pairwise(self.stages))
              and self.stages[0] <= self.offspring)
        if not ok:
            raise ConfigError("search", f"need generations >= 0, offspring >= 1, max_flips >= 1 and non-increasing "
                                        f"stages ending in 1 with stages[0] <= offspring; got {self}")


@dataclass(frozen=True, slots=True)
class SearchState:
    """Where a search stands (JSON-able via :meth:`to_dict`).

    Attributes:
        generation: generations completed.
        stage: selection stage of ``pending``.
        parent: the current best levels; ``parent_fitness`` its last fitness (None before any).
        pending: candidates to evaluate at ``stage`` (empty when the search is done).
        history: ``(generation, best fitness)`` per completed generation.
    """

    generation: int
    stage: int
    parent: Levels
    parent_fitness: float | None
    pending: tuple[Levels, ...]
    history: tuple[tuple[int, float], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "stage": self.stage, "parent": list(self.parent),
                "parent_fitness": self.parent_fitness, "pending": [list(c) for c in self.pending],
                "history": [list(h) for h in self.history]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchState:
        fit = data["parent_fitness"]
        return cls(int(data["generation"]), int(data["stage"]), tuple(int(x) for x in data["parent"]),
                   None if fit is None else float(fit), tuple(tuple(int(x) for x in c) for c in data["pending"]),
                   tuple((int(g), float(f)) for g, f in data["history"]))


def _mutant(grid: LevelGrid, parent: Levels, rng: random.Random, max_flips: int) -> Levels:
    levels = list(parent)
    flips = min(rng.randint(1, max_flips), rng.randint(1, max_flips))
    for _ in range(flips):
        down = [u for u in range(len(levels)) if grid.valid(u, levels[u] - 1)]
        up = [u for u in range(len(levels)) if grid.valid(u, levels[u] + 1)]
        if not down or not up:
            break
        d = rng.choice(down)
        choices = [u for u in up if u != d] or up
        levels[d] -= 1
        levels[rng.choice(choices)] += 1
    return tuple(levels)


def propose(grid: LevelGrid, parent: Levels, config: SearchConfig, generation: int) -> tuple[Levels, ...]:
    """``config.offspring`` distinct mutants of ``parent`` (none equal to it), reproducible from
    ``(config.seed, generation)``; fewer if the grid has fewer neighbours."""
    rng = random.Random(f"{config.seed}:{generation}")
    out: dict[Levels, None] = {}
    for _ in range(config.offspring * 50):
        if len(out) == config.offspring:
            break
        child = _mutant(grid, parent, rng, config.max_flips)
        if child != parent:
            out[child] = None
    return tuple(out)


def _stage_pending(candidates: Sequence[Levels], parent: Levels, config: SearchConfig, stage: int) -> tuple[Levels, ...]:
    last = stage == len(config.stages) - 1
    return tuple(candidates) + ((parent,) if last and parent not in candidates else ())


def initial_state(grid: LevelGrid, start: Levels, config: SearchConfig) -> SearchState:
    """Generation 0, stage 0: the first offspring of ``start`` (e.g. :func:`nearest_levels` of OWL)."""
    grid.check(start)
    pending = _stage_pending(propose(grid, start, config, 0), start, config, 0) if config.generations else ()
    return SearchState(0, 0, tuple(start), None, pending)


def advance(state: SearchState, fitnesses: Sequence[float], grid: LevelGrid, config: SearchConfig) -> SearchState:
    """The next state, given the fitness of every pending candidate (lower is better).

    Raises:
        ConfigError: the search is done, or the fitnesses do not match the pending candidates
            (count, finiteness).
    """
    if not state.pending:
        raise ConfigError("search", f"the search is done after {state.generation} generations")
    if len(fitnesses) != len(state.pending) or not all(math.isfinite(f) for f in fitnesses):
        raise ConfigError("fitness", f"need {len(state.pending)} finite values, got {list(fitnesses)[:5]}")
    order = sorted(range(len(fitnesses)), key=lambda i: (fitnesses[i], i))
    survivors = [state.pending[i] for i in order[: config.stages[state.stage]]]
    if state.stage + 1 < len(config.stages):
        return replace(state, stage=state.stage + 1,
                       pending=_stage_pending(survivors, state.parent, config, state.stage + 1))
    best, fit = survivors[0], float(fitnesses[order[0]])
    generation = state.generation + 1
    pending = (_stage_pending(propose(grid, best, config, generation), best, config, 0)
               if generation < config.generations else ())
    return SearchState(generation, 0, best, fit, pending, state.history + ((generation, fit),))


def step(state: SearchState, evaluate: Evaluate, grid: LevelGrid, config: SearchConfig) -> SearchState:
    """Evaluate the pending candidates at their stage and :func:`advance`."""
    return advance(state, list(evaluate(list(state.pending), state.stage)), grid, config)


def run_search(state: SearchState, evaluate: Evaluate, grid: LevelGrid, config: SearchConfig, *,
               on_state: Callable[[SearchState], None] | None = None) -> SearchState:
    """Step until done, calling ``on_state`` (e.g. persist it) after every step."""
    while state.pending:
        state = step(state, evaluate, grid, config)
        if on_state is not None:
            on_state(state)
    return state


__all__ = ["Evaluate", "LevelGrid", "Levels", "SearchConfig", "SearchState", "advance", "initial_state",
           "nearest_levels", "propose", "run_search", "step"]
