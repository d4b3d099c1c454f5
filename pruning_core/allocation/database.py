"""The allocation search's database (every unit pruned at every level) and candidate evaluation.

Stage: allocation. Three independent kinds of work, so a flow can fan them out over a task runner:

(a) :func:`database_tasks` lists ``(unit, level)`` pairs; :func:`build_variant` prunes one unit at
    one level from the *dense* weights and statistics (one-pass calibration, as EvoPress builds its
    database): a :class:`UnitVariant` of per-layer keep masks, plus the pruned weights for methods
    that change kept weights (SparseGPT). Variants do not depend on each other.
(b) :class:`CandidateAssembler` writes a candidate's variants into one model *in place*, rewriting
    only the units whose level changed since the last candidate (EvoPress ``load_layers``); no model
    copies. :func:`evaluate_candidates` assembles and scores candidates one after the other; a flow
    gives each worker its own model + assembler and a slice of the candidates.
(c) ``search.advance`` picks survivors and the next generation from the fitnesses.

A database is any ``Mapping[(unit index, level), UnitVariant]``: a dict in memory, or a lazy
mapping over files that a flow writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruning_core.allocation.apply import method_scope, prune_layer_weight
from pruning_core.allocation.rounding import comparison_groups, round_to_groups
from pruning_core.allocation.search import LevelGrid, Levels
from pruning_core.allocation.units import AllocationUnit
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import ConfigError
from pruning_core.masks import MaskScope

Fitness = Callable[[nn.Module], float]
PruneFn = Callable[[str, torch.Tensor, ActivationStats | None, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class UnitVariant:
    """One unit pruned at one level.

    Attributes:
        masks: ``{layer: bool [out, in]}`` keep masks.
        weights: ``{layer: pruned weight}`` for methods that update kept weights (SparseGPT);
            empty when the pruned weight is the dense weight times the mask.
        sparsity: the unit's allocated sparsity (before rounding to comparison groups).
    """

    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    sparsity: float


def database_tasks(grid: LevelGrid) -> list[tuple[int, int]]:
    """Every ``(unit index, level)`` the grid allows, unit-major."""
    return [(u, lv) for u in range(len(grid.sizes)) for lv in grid.levels(u)]


def build_variant(unit: AllocationUnit, sparsity: float, weights: Mapping[str, torch.Tensor],
                  stats: Mapping[str, ActivationStats | None], method: str, *, scope: MaskScope | None = None,
                  prune: PruneFn | None = None) -> UnitVariant:
    """Prune every layer of ``unit`` at ``sparsity`` (out of place).

    The unit's layers share the sparsity, rounded jointly to the comparison groups so the unit
    prunes ``floor(sparsity·n_u)`` weights up to less than one group (see ``rounding.py``).

    Args:
        unit: the unit (its layer names key ``weights`` and ``stats``).
        sparsity: the unit's sparsity (``grid.sparsity(u, level)``).
        weights: dense ``[out, in]`` weights of the unit's layers.
        stats: their one-pass statistics (None entries for magnitude; with XᵀX for SparseGPT).
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        scope: the comparison groups (default ``method``'s own: Wanda ROW, the others LAYER).
        prune: ``(layer, weight, stats, sparsity) -> (new weight, keep mask)`` instead of
            :func:`prune_layer_weight` (e.g. a job's method with its options).
    """
    scope = scope or method_scope(method)
    groups = {n: comparison_groups(tuple(weights[n].shape), scope) for n in unit.layers}
    targets = round_to_groups(dict.fromkeys(unit.layers, sparsity), groups)
    masks, pruned = {}, {}
    for name in unit.layers:
        if prune is not None:
            new, keep = prune(name, weights[name], stats.get(name), targets[name])
        else:
            new, keep = prune_layer_weight(method, weights[name], stats.get(name), targets[name], name=name)
        masks[name] = keep
        if method == "sparsegpt":
            pruned[name] = new
    return UnitVariant(masks, pruned, sparsity)


class CandidateAssembler:
    """Writes candidates from a database into ``model`` in place.

    Keeps one copy of the dense weights of the units' layers (for mask-only variants); the model's
    other parameters are never touched.
    """

    def __init__(self, model: nn.Module, units: Sequence[AllocationUnit],
                 database: Mapping[tuple[int, int], UnitVariant]) -> None:
        self.model, self.units, self.database = model, list(units), database
        self.dense = {n: model.get_submodule(n).weight.detach().clone() for u in self.units for n in u.layers}
        self.current: list[int | None] = [None] * len(self.units)

    def apply_(self, levels: Levels) -> int:
        """Make the model hold candidate ``levels``; returns the number of units rewritten.

        Raises:
            ConfigError: wrong length, or a ``(unit, level)`` missing from the database.
        """
        if len(levels) != len(self.units):
            raise ConfigError("levels", f"{len(levels)} levels for {len(self.units)} units")
        changed = 0
        with torch.no_grad():
            for u, level in enumerate(levels):
                if self.current[u] == level:
                    continue
                variant = self.database.get((u, level))
                if variant is None:
                    raise ConfigError("levels", f"unit {self.units[u].name} level {level} is not in the database")
                for name in self.units[u].layers:
                    source = variant.weights.get(name)
                    weight = self.model.get_submodule(name).weight
                    weight.copy_(source if source is not None else self.dense[name] * variant.masks[name])
                self.current[u] = level
                changed += 1
        return changed

    def restore_dense_(self) -> None:
        """Put the dense weights back."""
        with torch.no_grad():
            for name, w in self.dense.items():
                self.model.get_submodule(name).weight.copy_(w)
        self.current = [None] * len(self.units)


def evaluate_candidates(assembler: CandidateAssembler, candidates: Sequence[Levels], fitness: Fitness) -> list[float]:
    """Fitness of each candidate, assembled in turn in the assembler's model."""
    scores = []
    for levels in candidates:
        assembler.apply_(levels)
        scores.append(float(fitness(assembler.model)))
    return scores


__all__ = ["CandidateAssembler", "Fitness", "PruneFn", "UnitVariant", "build_variant", "database_tasks", "evaluate_candidates"]
