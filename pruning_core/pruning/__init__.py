"""Pruning whole models: the loop over layers calling a method's ``prune_weight``, and its results.

Stage: pruning (after methods). ``prune_module`` prunes every targeted layer of a model (one
threshold per layer, per output row, or global); ``prune_sequential`` does it block by block on
inputs that flow through the already-pruned blocks (the Wanda/SparseGPT reference procedure).
"""

from pruning_core.pruning.model import output_head_names, prune_module, target_layers
from pruning_core.pruning.result import PruningResult, sparse_format_for, sparse_savings_bytes
from pruning_core.pruning.sequential import prune_sequential

__all__ = [
    "PruningResult",
    "output_head_names",
    "prune_module",
    "prune_sequential",
    "sparse_format_for",
    "sparse_savings_bytes",
    "target_layers",
]
