"""Minitron / ShortGPT structured pruning of decoder LMs: depth and width, plans and search.

Stage: scores -> plans -> apply -> evaluate (Muralidharan et al. 2024, arXiv:2407.14679;
Men et al. 2024, arXiv:2403.03853). Depth: Block Importance (per token) and LM-loss drop
(per layer or per contiguous block), one-shot, contiguous-block or iterative selection. Width: activation-based head/neuron/channel importance,
GQA-consistent head selection, slicing through the traced dependency graph. Search: candidates
under a budget, built from cached scores, scored by calibration LM loss (optional distillation).

Supported: the Llama-like families of :data:`FAMILIES` (Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3, Phi-3); :func:`check_supported` refuses any other model before long work.
"""

from pruning_core.minitron.bi import BlockImportanceScores, block_importance
from pruning_core.minitron.config import Architecture, MinitronTarget, WidthImportanceConfig
from pruning_core.minitron.depth_scores import (
    bi_iterative,
    block_drop_losses,
    collect_block_importance,
    depth_plan,
    layer_drop_losses,
    loss_iterative,
    select_block,
    select_iterative,
    select_one_shot,
    without_layers,
)
from pruning_core.minitron.families import (
    FAMILIES,
    MinitronFamily,
    ModelShape,
    check_supported,
    minitron_family,
    supported_families,
)
from pruning_core.minitron.loss import distill_, lm_loss
from pruning_core.minitron.precision import cast_parameters_, to_compute_dtype_
from pruning_core.minitron.scores import MinitronScores, compute_scores
from pruning_core.minitron.search import (
    DEPTH_CRITERIA,
    CandidateResult,
    build_candidate,
    candidate_plan,
    enumerate_candidates,
    evaluate_candidate,
    search,
)
from pruning_core.minitron.structure import (
    AttentionUnit,
    DecoderStructure,
    MlpUnit,
    decoder_structure,
    trace_decoder,
)
from pruning_core.minitron.width_plan import select_heads, top_k_indices, width_plan
from pruning_core.minitron.width_scores import WidthScores, collect_width_scores
from pruning_core.minitron.windows import disjoint_windows, window_positions

__all__ = [
    "DEPTH_CRITERIA",
    "FAMILIES",
    "Architecture",
    "AttentionUnit",
    "BlockImportanceScores",
    "CandidateResult",
    "DecoderStructure",
    "MinitronFamily",
    "MinitronScores",
    "MinitronTarget",
    "MlpUnit",
    "ModelShape",
    "WidthImportanceConfig",
    "WidthScores",
    "bi_iterative",
    "block_drop_losses",
    "block_importance",
    "build_candidate",
    "cast_parameters_",
    "check_supported",
    "candidate_plan",
    "collect_block_importance",
    "collect_width_scores",
    "compute_scores",
    "decoder_structure",
    "depth_plan",
    "disjoint_windows",
    "distill_",
    "enumerate_candidates",
    "evaluate_candidate",
    "layer_drop_losses",
    "lm_loss",
    "loss_iterative",
    "minitron_family",
    "search",
    "select_block",
    "select_heads",
    "select_iterative",
    "select_one_shot",
    "supported_families",
    "to_compute_dtype_",
    "top_k_indices",
    "trace_decoder",
    "width_plan",
    "window_positions",
    "without_layers",
]
