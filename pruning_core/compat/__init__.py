"""The seed's interface (Rust ``aprender::pruning``): every seed name, and how it maps to ours.

Stage: compat, above every other stage (it imports them; nothing in the library imports it).
Every name of the seed module is importable from here (``SEED_NAMES``); the library's own API is
the tensor-level contract (:class:`~pruning_core.masks.SparsitySpec`,
:mod:`pruning_core.methods`, :func:`~pruning_core.prune_module`) and the stage packages. This
page is the one place that records how the seed behaved and where we deliberately differ.

Seed name -> Python name
========================

=====================================================  ================================================================
seed (``aprender::pruning``)                           Python
=====================================================  ================================================================
``PruningError::{NumericalInstability,                 ``pruning_core.errors.<same>`` (subclasses of ``PruningError``
CalibrationRequired, ShapeMismatch, InvalidMask,       with the seed's fields; the bad-input ones also subclass
InvalidPattern, MissingActivationStats,                ``ValueError``), plus ``ConfigError``, ``GraphError``,
InvalidSparsity, NoParameters}``                       ``ArtifactError``, ``ServiceUnavailable``, ``UnsupportedOperation``
``Importance`` trait (``compute(module, ctx)``),       ``compat.Importance``, ``compat.ImportanceScores``,
``ImportanceScores``, ``ImportanceStats``              ``compat.ImportanceStats``; ours: ``Method.score(weight, stats)``
``NormType``, ``MagnitudeImportance``                  ``importance.NormType`` (+ ``LINF``), ``compat.MagnitudeImportance``
                                                       (-> ``methods.Magnitude``, ``importance.magnitude_scores``)
``WandaImportance``                                    ``compat.WandaImportance`` (-> ``methods.Wanda``,
                                                       ``importance.wanda_scores``)
``SparseGPTImportance``                                ``compat.SparseGPTImportance`` (-> ``methods.SparseGPT.score``,
                                                       ``importance.obs_saliency``)
(none)                                                 ``compat.TaylorImportance`` (-> ``importance.taylor_scores``)
``ActivationStats``, ``CalibrationContext``            ``calibration.ActivationStats`` (exact float64 sums;
                                                       ``input_norms`` = ‖X_j‖₂, ``squared_mean`` = E[x²]),
                                                       ``calibration.CalibrationContext``; filled by
                                                       ``collect_activation_stats`` (forward hooks)
``SparsityPattern::{Unstructured, NM, Block, Row,      ``masks.SparsityPattern`` (``SparsityPattern.NM(2, 4)`` works) and
Column}``                                              ``masks.{Unstructured, NM, Block, Row, Column}``
``SparsityMask``                                       ``masks.SparsityMask`` (bool, True = keep, immutable)
``generate_unstructured_mask``, ``generate_nm_mask``,  ``masks.<same>``; the contract: ``masks.select_mask(scores, spec)``
``generate_block_mask``, ``generate_row_mask``,
``generate_column_mask``
``Pruner`` trait (``generate_mask``, ``apply_mask``,   ``compat.Pruner`` (+ ``prune_layer(module, ...)``, ``method``);
``importance``, ``name``)                              ours: ``methods.Method`` (``score``, ``prune_weight``)
``MagnitudePruner``, ``WandaPruner``                   ``compat.MagnitudePruner``, ``compat.WandaPruner``; ours:
                                                       ``get_method("magnitude")``, ``get_method("wanda")``
(no SparseGPT pruner)                                  ``compat.SparseGPTPruner``; ours: ``get_method("sparsegpt")``
``prune_module(module, pruner, s, pattern, ctx)``      ``pruning_core.prune_module(model, method, spec, stats)``
                                                       (every targeted layer of a model)
``PruningResult``                                      ``pruning.PruningResult``
``SparseFormat``, ``CSRTensor``, ``COOTensor``,        ``sparse.<same>`` (+ ``SemiStructuredTensor``, ``export_sparse``)
``BlockSparseTensor``, ``SparseTensor``, ``sparsify``
``DependencyType``, ``NodeType``, ``GraphNode``,       ``graph.<same>`` (``DependencyGraph.linear_chain``; graphs are
``GraphEdge``, ``DependencyGraph``, ``PruningPlan``,   traced from real models by ``graph.build_dependency_graph``)
``propagate_channel_pruning``
``DepthPruner``, ``DepthPruningResult``                ``compat.DepthPruner``, ``compat.DepthPruningResult``; ours:
                                                       ``minitron.depth_scores`` (BI, LM-loss drop, ``depth_plan``)
``BlockImportanceScores``                              ``minitron.BlockImportanceScores``
``WidthPruner``, ``ChannelImportance``,                ``compat.<same>``; ours: ``minitron.collect_width_scores``,
``WidthPruningResult``                                 ``minitron.width_plan``
``RewindStrategy``                                     ``lottery.RewindStrategy`` (``Init``, ``Early``, ``Late``,
                                                       ``LearningRate``, ``NoRewind`` = the seed's ``None``)
``LotteryTicketConfig``, ``WinningTicket``             ``lottery.<same>`` (``WinningTicket.initial_weights`` is
                                                       ``rewind_weights``)
``LotteryTicketPruner``                                ``lottery.LotteryTicketPruner`` (the search); with the seed's
                                                       ``builder()``, ``with_config``, ``name``, ``generate_mask``,
                                                       ``apply_mask``: ``compat.LotteryTicketPruner``
``LotteryTicketPrunerBuilder``                         ``compat.LotteryTicketPrunerBuilder``
=====================================================  ================================================================

What the seed did, and what we do instead
=========================================

Masks and patterns.

- Unstructured masks pruned *every* score equal to the k-th smallest (``[1, 1, 1, 1]`` at 50%
  pruned all four); structured masks pruned the lower block/row/column index first. We prune
  exactly ``floor(L·s)`` per comparison group and keep the lower index among ties, everywhere.
- ``k = (len as f32 * s) as usize`` truncated in f32 (``len = 100, s = 0.53`` gave 52); we use
  ``floor(round(n·s, 9))`` (:func:`pruning_core.validate.num_to_prune`).
- NaN scores were pruned silently; they raise ``NumericalInstability`` naming the layer.
- Group scores of Row/Column/Block masks were sums; the sum stays the default (``reduce="sum"``),
  ``"max"`` and ``"l2"`` are added.
- ``NM::validate`` demanded exactly n kept per group; we allow at most n, so masks ANDed with
  earlier ones stay valid. ``NM{m: 0}`` and ``Block{0, _}`` divided by zero; they raise
  ``InvalidPattern``. ``SparsityPattern.is_valid`` keeps the seed's answer (``0 <= n <= m``,
  ``m > 0``), but ``SparsityPattern.parse`` and ``SparsitySpec`` need ``1 <= N < M``: ``0:4``
  would prune everything and ``4:4`` nothing.
- ``generate_mask`` ignored the target sparsity for N:M; a contradicting value is an error.
- One global threshold per tensor was the only scope; we have LAYER, ROW (Wanda's per-output
  groups) and GLOBAL (one threshold across layers).

Scores.

- The seed scored ``params[0]``; we score ``module.weight`` (else the first parameter).
- Wanda took the square root of an RMS (``|W|·E[x²]^¼``, halving the activation exponent) and
  added ``sqrt(eps)`` for dead channels; its ``pattern`` field was dead and ``WandaPruner`` used a
  per-tensor threshold. We use ``|W|·sqrt(Σ_t x_tj²)`` (the paper's ‖X_j‖₂) and per-row groups by
  default (``methods.Wanda.default_scope``).
- SparseGPT built a rank-1 stand-in Hessian from ``sqrt(E[x²])`` and only computed the saliency
  ``w²/[H⁻¹]_jj`` (no weight update; ``block_size`` unused). We keep the real ``XᵀX`` and run the
  blocked OBS reconstruction (:func:`pruning_core.solvers.sparsegpt_prune`).
- ``ActivationStats`` kept a count-weighted average of per-batch RMS values (not the RMS of all
  tokens; mean |x| on the 1-D path) and misread ``[B, T, D]`` inputs; we keep exact sums.
- Nothing collected activations (no hooks); ``collect_activation_stats`` does.

Pruning.

- ``prune_module`` scored, masked and applied one module's first parameter; ours prunes every
  targeted layer of a model (one threshold per layer, per row, or global) with a per-layer report
  and a postcondition on the achieved sparsity.
- ``apply_mask`` counted every zero of the tensor as pruned; we count by mask.
  ``PruningResult.memory_savings_bytes`` was ``pruned × 4``; we measure real sparse formats.
  ``layer_sparsity`` was never filled; it is. ``with_layer_sparsity`` is kept.

Sparse formats.

- ``COOTensor::to_csr`` panicked on out-of-range rows and kept duplicates; we reject both.
- ``BlockSparseTensor`` returned the padded shape; we keep the original one. Formats store 2-D
  matrices only, as in the seed.

Graph.

- ``propagate_channel_pruning`` went one hop over Sequential edges; ours is a view of the full
  channel group (residual adds, concatenation offsets, attention heads).
- ``PruningPlan::remove_layer`` counted a repeated layer twice; repeating it is a no-op.
  ``DependencyGraph::add_node`` replaces a node with the same id and keeps its edges, and
  ``GraphNode::with_dims`` takes **(input, output)**, both as in the seed. ``NodeType`` is the
  seed's list plus traced ops. Nothing built a graph from a model; ``build_dependency_graph``
  traces one.

Minitron.

- Block Importance was one cosine over the flattened tensor (tokens weighted by their norm,
  ``num_samples = 1``); ours averages the per-token cosine. ``DepthPruner.iterative`` was stored
  but unused; it recomputes BI after each removal.
- ``WidthPruner`` divided by zero for 0 heads (now ``ConfigError``), ``generate_hidden_mask``
  ignored out-of-range indices (now an error), and nothing sliced weights (``prune_`` does).
  ``compute_channel_importance`` is the seed's ``mean(x²)`` per channel, kept as is;
  ``head_dim_after_pruning`` is the seed's ``target_hidden_dim / heads`` (Minitron itself keeps
  head_dim fixed).

Lottery Ticket.

- ``find_ticket`` never trained: its rounds re-ranked the same weights (one-shot magnitude
  pruning). Ours trains through a ``train_fn``, rewinds and retrains; ``Init``, ``Early(k)`` and
  ``Late(f)`` were labels only and are real now.
- ``LotteryTicketConfig::new`` and the builder clamped the sparsity silently and derived the rate
  from the unclamped value (``1.5`` gave a NaN rate); we validate and raise.
- The survivor rule ``max(1, round(n·(1-p)^r))`` per round and ``sparsity_history`` (pruning
  rounds only, the dense round left out) are the seed's; ``apply_ticket`` keeps the current
  weights for non-rewinding strategies, as the seed did.

Errors.

- The spec named ``InvalidShape`` and ``InvalidConfiguration``, which the seed never had; we
  have ``ShapeMismatch`` and ``ConfigError``. ``InvalidSparsity`` is still used for out-of-range
  counts (too many layers to remove, a width above the original), as in the seed.
"""

from pruning_core.calibration import ActivationStats, CalibrationContext
from pruning_core.compat.calls import accepts_legacy_call
from pruning_core.compat.depth import DepthPruner, DepthPruningResult
from pruning_core.compat.importance import (
    Importance,
    ImportanceScores,
    ImportanceStats,
    MagnitudeImportance,
    SparseGPTImportance,
    TaylorImportance,
    WandaImportance,
)
from pruning_core.compat.lottery import LotteryTicketPruner, LotteryTicketPrunerBuilder
from pruning_core.compat.pruners import (
    ImportancePruner,
    MagnitudePruner,
    Pruner,
    SparseGPTPruner,
    WandaPruner,
)
from pruning_core.compat.transitional import prune_weight, score_weight
from pruning_core.compat.width import ChannelImportance, WidthPruner, WidthPruningResult
from pruning_core.errors import (
    CalibrationRequired,
    InvalidMask,
    InvalidPattern,
    InvalidSparsity,
    MissingActivationStats,
    NoParameters,
    NumericalInstability,
    PruningError,
    ShapeMismatch,
)
from pruning_core.graph import (
    DependencyGraph,
    DependencyType,
    GraphEdge,
    GraphNode,
    NodeType,
    PruningPlan,
    propagate_channel_pruning,
)
from pruning_core.importance import NormType
from pruning_core.lottery import LotteryTicketConfig, RewindStrategy, WinningTicket
from pruning_core.masks import (
    SparsityMask,
    SparsityPattern,
    generate_block_mask,
    generate_column_mask,
    generate_nm_mask,
    generate_row_mask,
    generate_unstructured_mask,
)
from pruning_core.minitron import BlockImportanceScores
from pruning_core.pruning import PruningResult
from pruning_core.pruning import prune_module as _prune_module
from pruning_core.pruning import prune_sequential as _prune_sequential
from pruning_core.sparse import BlockSparseTensor, COOTensor, CSRTensor, SparseFormat, SparseTensor, sparsify

# The whole-model passes, also in the seed's call form (a pruner and a loose sparsity/pattern/scope).
prune_module = accepts_legacy_call(spec_position=2)(_prune_module)
prune_sequential = accepts_legacy_call(spec_position=3, takes_stats=False)(_prune_sequential)

# Every public name of the seed module, as the seed spells it (the table above).
SEED_NAMES = (
    "PruningError", "NumericalInstability", "CalibrationRequired", "ShapeMismatch", "InvalidMask",
    "InvalidPattern", "MissingActivationStats", "InvalidSparsity", "NoParameters",
    "Importance", "ImportanceScores", "ImportanceStats", "NormType", "MagnitudeImportance",
    "WandaImportance", "SparseGPTImportance", "ActivationStats", "CalibrationContext",
    "SparsityPattern", "SparsityMask", "generate_unstructured_mask", "generate_nm_mask",
    "generate_block_mask", "generate_row_mask", "generate_column_mask",
    "Pruner", "MagnitudePruner", "WandaPruner", "prune_module", "PruningResult",
    "SparseFormat", "CSRTensor", "COOTensor", "BlockSparseTensor", "SparseTensor", "sparsify",
    "DependencyType", "NodeType", "GraphNode", "GraphEdge", "DependencyGraph", "PruningPlan",
    "propagate_channel_pruning",
    "DepthPruner", "BlockImportanceScores", "DepthPruningResult", "WidthPruner", "ChannelImportance",
    "WidthPruningResult",
    "RewindStrategy", "LotteryTicketConfig", "LotteryTicketPrunerBuilder", "LotteryTicketPruner",
    "WinningTicket",
)

__all__ = [
    "ActivationStats",
    "BlockImportanceScores",
    "BlockSparseTensor",
    "COOTensor",
    "CSRTensor",
    "CalibrationContext",
    "CalibrationRequired",
    "ChannelImportance",
    "DependencyGraph",
    "DependencyType",
    "DepthPruner",
    "DepthPruningResult",
    "GraphEdge",
    "GraphNode",
    "Importance",
    "ImportancePruner",
    "ImportanceScores",
    "ImportanceStats",
    "InvalidMask",
    "InvalidPattern",
    "InvalidSparsity",
    "LotteryTicketConfig",
    "LotteryTicketPruner",
    "LotteryTicketPrunerBuilder",
    "MagnitudeImportance",
    "MagnitudePruner",
    "MissingActivationStats",
    "NoParameters",
    "NodeType",
    "NormType",
    "NumericalInstability",
    "Pruner",
    "PruningError",
    "PruningPlan",
    "PruningResult",
    "RewindStrategy",
    "SEED_NAMES",
    "ShapeMismatch",
    "SparseFormat",
    "SparseGPTImportance",
    "SparseGPTPruner",
    "SparseTensor",
    "SparsityMask",
    "SparsityPattern",
    "TaylorImportance",
    "WandaImportance",
    "WandaPruner",
    "WidthPruner",
    "WidthPruningResult",
    "WinningTicket",
    "generate_block_mask",
    "generate_column_mask",
    "generate_nm_mask",
    "generate_row_mask",
    "generate_unstructured_mask",
    "propagate_channel_pruning",
    "prune_module",
    "prune_sequential",
    "prune_weight",
    "score_weight",
    "sparsify",
]
