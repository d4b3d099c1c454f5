"""Solvers: weight reconstruction after pruning (SparseGPT) and the Hessian helpers it needs."""

from pruning_core.solvers.hessian import InverseHessian, inverse_hessian
from pruning_core.solvers.sparsegpt import sparsegpt_prune

__all__ = ["InverseHessian", "inverse_hessian", "sparsegpt_prune"]
