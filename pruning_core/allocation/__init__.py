"""Non-uniform sparsity allocation: OWL and an EvoPress-style search.

Stage: allocation (after calibration, before pruning). ``units.py`` (units and the JSON-able
:class:`Allocation`), ``owl.py`` (OWL), ``rounding.py`` (integer counts per comparison group),
``apply.py`` (pruning at per-layer sparsities, one pass or block by block), ``search.py`` (the
pure search state machine), ``database.py`` (pruned variants, in-place candidate assembly),
``fitness.py`` (KL / LM-loss fitness).

How a job uses it (the flow owns persistence and fan-out):

1. ``units = allocation_units(model, granularity)``; one-pass statistics of the dense model
   (``collect_activation_stats``) give ``owl_allocation(model, ctx, units, s, OWLConfig(m, lam))``;
   save ``allocation.to_dict()`` as JSON (``Allocation.from_dict`` + ``check_units`` to reuse it).
2. Prune: ``layer_targets(model, allocation, method)`` is ``{layer: sparsity}``; per-layer tasks
   call ``prune_layer_weight(method, weight, stats, sparsity, name=layer)``; sequential mode uses
   ``prune_allocated_sequential_`` (or the same per block).
3. Search: ``grid = LevelGrid.for_units(units, s, step=..., max_level=...)``;
   (a) fan out ``database_tasks(grid)``: each ``(unit, level)`` runs ``build_variant`` on that
   unit's dense weights and statistics and saves the masks (and SparseGPT weights);
   (b) per step, split ``state.pending`` over workers, each holding one model, a
   ``CandidateAssembler`` over the saved variants and a ``KLFitness`` (``.first(n)`` per stage),
   calling ``evaluate_candidates``; (c) gather the fitnesses in order, ``advance(state, fits,
   grid, config)``, persist ``state.to_dict()``. Start from ``initial_state(grid,
   nearest_levels(grid, owl.sparsities), config)``; resume from the saved state. The result is
   ``grid.allocation(units, state.parent)``.
"""

from pruning_core.allocation.apply import (
    layer_targets,
    method_scope,
    prune_allocated_,
    prune_allocated_sequential_,
    prune_layer_weight,
    shape_targets,
)
from pruning_core.allocation.owl import (
    OWLConfig,
    allocation_from_ratios,
    outlier_ratio,
    owl_allocation,
    owl_sparsities,
    unit_outlier_ratios,
)
from pruning_core.allocation.rounding import comparison_groups, realised_count, round_to_groups
from pruning_core.allocation.units import Allocation, AllocationUnit, allocation_units

__all__ = [
    "Allocation",
    "AllocationUnit",
    "OWLConfig",
    "allocation_from_ratios",
    "allocation_units",
    "comparison_groups",
    "layer_targets",
    "method_scope",
    "outlier_ratio",
    "owl_allocation",
    "owl_sparsities",
    "prune_allocated_",
    "prune_allocated_sequential_",
    "prune_layer_weight",
    "realised_count",
    "round_to_groups",
    "shape_targets",
    "unit_outlier_ratios",
]
