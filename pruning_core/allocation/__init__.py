"""Non-uniform sparsity allocation: OWL and an EvoPress-style search.

Stage: allocation (after calibration, before pruning). See ``units.py`` (units and the
:class:`Allocation` value), ``owl.py``, ``rounding.py``, ``apply.py`` and ``search.py``.
"""

from pruning_core.allocation.apply import (
    layer_targets,
    method_scope,
    prune_allocated_,
    prune_allocated_sequential_,
    prune_layer_weight,
)
from pruning_core.allocation.owl import (
    OWLConfig,
    allocation_from_ratios,
    outlier_ratio,
    owl_allocation,
    owl_sparsities,
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
]
