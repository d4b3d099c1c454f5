"""pruning_core: one-shot pruning (magnitude, Wanda, SparseGPT), sparse formats, structured
(Minitron depth/width) pruning and Lottery Ticket search, on plain torch.

Stages, arrows pointing one way: ``errors``, ``validate`` -> ``calibration`` (statistics) ->
``importance`` (tensor scores) -> ``masks`` (patterns, :class:`SparsitySpec`, selection) ->
``solvers`` (SparseGPT) -> ``methods`` (the one-shot method registry) -> ``pruning``
(``prune_module`` loop, results) -> ``sparse`` (formats). ``graph``/``minitron``, ``lottery``,
``lm`` (models, text, perplexity) and ``io`` (atomic, checksummed artifacts) sit beside them. It
imports no Prefect, MLflow or Dask.

This top level exports the entry point of each stage; everything else is one import deeper
(``pruning_core.masks.keep_nm``, ``pruning_core.methods.Wanda``, ...). Masks are boolean tensors
where True means *keep*. The interface of the Rust original (``aprender::pruning``:
``MagnitudePruner``, ``generate_mask``/``apply_mask``, builders, ...) lives in
:mod:`pruning_core.compat`, with the page that maps each of its names to ours.

Example::

    from pruning_core import SparsitySpec, collect_activation_stats, get_method, prune_module

    stats = collect_activation_stats(model, batches)
    result = prune_module(model, get_method("wanda"), SparsitySpec.parse(0.5), stats)
"""

from pruning_core.calibration import ActivationStats, CalibrationContext, collect_activation_stats
from pruning_core.errors import ConfigError, PruningError
from pruning_core.graph import apply_plan_, build_dependency_graph
from pruning_core.lottery import LotteryTicketConfig, LotteryTicketPruner
from pruning_core.masks import MaskScope, SparsityMask, SparsityPattern, SparsitySpec, keep_topk
from pruning_core.methods import METHODS, Method, get_method
from pruning_core.minitron import build_candidate, candidate_plan, compute_scores, trace_decoder
from pruning_core.pruning import PruningResult, prune_module, prune_sequential
from pruning_core.solvers import sparsegpt_prune
from pruning_core.sparse import export_sparse, sparsify

__all__ = [
    "METHODS",
    "ActivationStats",
    "CalibrationContext",
    "ConfigError",
    "LotteryTicketConfig",
    "LotteryTicketPruner",
    "MaskScope",
    "Method",
    "PruningError",
    "PruningResult",
    "SparsityMask",
    "SparsityPattern",
    "SparsitySpec",
    "apply_plan_",
    "build_candidate",
    "build_dependency_graph",
    "candidate_plan",
    "collect_activation_stats",
    "compute_scores",
    "export_sparse",
    "get_method",
    "keep_topk",
    "prune_module",
    "prune_sequential",
    "sparsegpt_prune",
    "sparsify",
    "trace_decoder",
]
