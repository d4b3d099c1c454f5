"""Pruning whole models: the loop over layers calling a method's ``prune_weight``, and its results.

Stage: pruning (after methods). ``prune_module`` prunes every targeted layer of a model (one
threshold per layer, per output row, or global); ``prune_sequential`` does it block by block on
inputs that flow through the already-pruned blocks (the Wanda/SparseGPT reference procedure).
"""

from typing import Any

from pruning_core.pruning.model import output_head_names, prune_module, target_layers
from pruning_core.pruning.result import PruningResult, sparse_format_for, sparse_savings_bytes
from pruning_core.pruning.sequential import prune_sequential

# TRANSITIONAL: flows/oneshot_tasks.py and benchmarks/ import the pre-contract pruner classes and
# helpers from here. They live in pruning_core.compat now; remove this table (and __getattr__)
# once those callers use pruning_core.methods.
_MOVED_TO_COMPAT = ("ImportancePruner", "MagnitudePruner", "Pruner", "SparseGPTPruner", "WandaPruner",
                    "prune_weight", "score_weight")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_COMPAT:
        import pruning_core.compat

        return getattr(pruning_core.compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PruningResult",
    "output_head_names",
    "prune_module",
    "prune_sequential",
    "sparse_format_for",
    "sparse_savings_bytes",
    "target_layers",
]
