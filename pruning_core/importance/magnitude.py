"""Magnitude importance: ``|w|`` (L1), ``w²`` (L2) or ``|w|`` reduced with max over groups (L∞).

Stage: scores. Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
Networks". Element-wise, L1 and L∞ give the same scores; they differ in how a structured
pattern (rows, columns, blocks) reduces a group's scores: a sum for L1/L2, a max for L∞
(see :attr:`NormType.group_reduction`).
"""

from __future__ import annotations

import enum

import torch

from pruning_core.importance.base import SCORE_DTYPE
from pruning_core.validate import check_finite


class NormType(enum.Enum):
    """Element score and group reduction of magnitude importance."""

    L1 = "l1"
    L2 = "l2"
    LINF = "linf"

    @property
    def group_reduction(self) -> str:
        """How a structured group's element scores combine: ``"sum"`` (L1, L2) or ``"max"`` (L∞)."""
        return "max" if self is NormType.LINF else "sum"


def magnitude_scores(weight: torch.Tensor, norm: NormType = NormType.L2, *,
                     layer_name: str | None = None) -> torch.Tensor:
    """Element-wise magnitude scores, float32, shaped like ``weight`` (any rank).

    Raises:
        NumericalInstability: NaN/Inf in ``weight``, or scores that overflow float32 (L2 of |w| > 1.8e19).
    """
    method = f"magnitude_{norm.value}"
    check_finite(weight, method=method, what="weight", layer=layer_name)
    w = weight.detach().to(SCORE_DTYPE)
    scores = w.square() if norm is NormType.L2 else w.abs()
    check_finite(scores, method=method, what="score (float32 overflow)", layer=layer_name)
    return scores


__all__ = ["NormType", "magnitude_scores"]
