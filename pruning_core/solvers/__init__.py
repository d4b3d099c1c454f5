"""Solvers: OBS weight reconstruction after pruning (SparseGPT) and quantization (GPTQ, alone or
joint with pruning), on one shared column loop (``obs.py``). The Hessian helpers live in
:mod:`pruning_core.calibration.hessian` (re-exported here for existing importers)."""

from pruning_core.calibration.hessian import InverseHessian, inverse_hessian
from pruning_core.solvers.gptq import gptq_quantize
from pruning_core.solvers.sparsegpt import sparsegpt_prune

__all__ = ["InverseHessian", "gptq_quantize", "inverse_hessian", "sparsegpt_prune"]
