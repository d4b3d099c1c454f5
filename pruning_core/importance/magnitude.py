"""Magnitude importance: ``|w|`` (L1), ``w²`` (L2) or ``|w|`` reduced with max over groups (L∞).

Stage: scores. Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
Networks". Element-wise, L1 and L∞ give the same scores; they differ in how a structured
pattern (rows, columns, blocks) reduces a group's scores: a sum for L1/L2, a max for L∞
(see :attr:`NormType.group_reduction`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

from pruning_core.calibration.context import CalibrationContext
from pruning_core.importance.base import SCORE_DTYPE, ImportanceScores, module_weight
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


@dataclass(frozen=True)
class MagnitudeImportance:
    """Magnitude importance; needs no calibration. Constructors :meth:`l1`, :meth:`l2`, :meth:`linf`."""

    norm: NormType = NormType.L2

    @classmethod
    def l1(cls) -> MagnitudeImportance:
        return cls(NormType.L1)

    @classmethod
    def l2(cls) -> MagnitudeImportance:
        return cls(NormType.L2)

    @classmethod
    def linf(cls) -> MagnitudeImportance:
        return cls(NormType.LINF)

    @classmethod
    def with_norm(cls, norm: NormType) -> MagnitudeImportance:
        return cls(norm)

    @property
    def name(self) -> str:
        return f"magnitude_{self.norm.value}"

    @property
    def requires_calibration(self) -> bool:
        return False

    def compute(
        self, module: nn.Module | torch.Tensor, context: CalibrationContext | None = None, *,
        layer_name: str | None = None,
    ) -> ImportanceScores:
        """Scores of ``module``'s weight (the context is ignored)."""
        weight = module_weight(module, layer_name)
        return ImportanceScores(magnitude_scores(weight, self.norm, layer_name=layer_name), self.name)


__all__ = ["MagnitudeImportance", "NormType", "magnitude_scores"]
