"""Importance scoring: one non-negative score per weight, higher = keep longer.

Stage: scores. ``MagnitudeImportance`` (|w|, w²), ``WandaImportance`` (|W|·‖X_j‖₂),
``SparseGPTImportance`` (OBS saliency w²/[H⁻¹]_jj) and ``TaylorImportance`` (|w·∂L/∂w|) all
implement the :class:`Importance` protocol; each has a pure tensor function beside it.
"""

from pruning_core.importance.base import SCORE_DTYPE, Importance, ImportanceScores, ImportanceStats
from pruning_core.importance.magnitude import MagnitudeImportance, NormType, magnitude_scores
from pruning_core.importance.sparsegpt import SparseGPTImportance, obs_saliency
from pruning_core.importance.taylor import TaylorImportance, taylor_scores
from pruning_core.importance.wanda import WandaImportance, wanda_scores

__all__ = [
    "SCORE_DTYPE",
    "Importance",
    "ImportanceScores",
    "ImportanceStats",
    "MagnitudeImportance",
    "NormType",
    "SparseGPTImportance",
    "TaylorImportance",
    "WandaImportance",
    "magnitude_scores",
    "obs_saliency",
    "taylor_scores",
    "wanda_scores",
]
