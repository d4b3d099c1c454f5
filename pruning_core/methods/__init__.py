"""One-shot pruning methods on tensors: ``score(weight, stats)`` and
``prune_weight(weight, stats, spec) -> (weight, mask)``.

Stage: methods (after masks and solvers, before the whole-model loop in
:mod:`pruning_core.pruning`). ``get_method("wanda")`` returns a registered method;
:class:`Method` is the protocol and :class:`BaseMethod` the base class a new method extends (one
file here plus one line in :mod:`pruning_core.methods.registry`).
"""

from pruning_core.methods.base import BaseMethod, Method, prune_by_scores
from pruning_core.methods.magnitude import Magnitude
from pruning_core.methods.registry import METHODS, get_method, method_options
from pruning_core.methods.sparsegpt import SparseGPT
from pruning_core.methods.wanda import Wanda

__all__ = [
    "METHODS",
    "BaseMethod",
    "Magnitude",
    "Method",
    "SparseGPT",
    "Wanda",
    "get_method",
    "method_options",
    "prune_by_scores",
]
