"""Importance scoring: one non-negative score per weight, higher = keep longer.

Stage: scores. Pure tensor functions, float32 scores shaped like the weight:
:func:`magnitude_scores` (|w|, w²), :func:`wanda_scores` (|W|·‖X_j‖₂), :func:`obs_saliency`
(OBS saliency w²/[H⁻¹]_jj) and :func:`taylor_scores` (|w·∂L/∂w|). The pruning methods
(:mod:`pruning_core.methods`) call them.
"""

from pruning_core.importance.base import SCORE_DTYPE, check_weight_2d
from pruning_core.importance.magnitude import NormType, magnitude_scores
from pruning_core.importance.sparsegpt import obs_saliency
from pruning_core.importance.taylor import TaylorReduction, taylor_scores
from pruning_core.importance.wanda import wanda_scores

__all__ = [
    "SCORE_DTYPE",
    "NormType",
    "TaylorReduction",
    "check_weight_2d",
    "magnitude_scores",
    "obs_saliency",
    "taylor_scores",
    "wanda_scores",
]
