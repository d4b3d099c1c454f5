"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
keep the largest ``|W_ij| · ‖X_j‖₂``, compared per output row.

Stage: methods. ``‖X_j‖₂`` comes from the layer's :class:`ActivationStats` (``sum_sq`` over all
calibration tokens, see :func:`~pruning_core.importance.wanda_scores`). The paper's comparison
group is one output row (§3, "per output"), hence ``default_scope = ROW``: the one place that
default lives. Kept weights are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruning_core.calibration.stats import ActivationStats
from pruning_core.importance import wanda_scores
from pruning_core.masks import MaskScope
from pruning_core.methods.base import BaseMethod, require_stats


@dataclass(frozen=True)
class Wanda(BaseMethod):
    """No options. Needs the layer's activation statistics."""

    name: ClassVar[str] = "wanda"
    needs_stats: ClassVar[bool] = True
    default_scope: ClassVar[MaskScope] = MaskScope.ROW

    def score(
        self, weight: torch.Tensor, stats: ActivationStats | None = None, *, name: str | None = None
    ) -> torch.Tensor:
        """``|W| · sqrt(Σ_t x_tj²)``, float32 ``[out, in]``.

        Raises:
            CalibrationRequired: no statistics, or statistics with zero tokens.
            ShapeMismatch / NumericalInstability: as :func:`~pruning_core.importance.wanda_scores`.
        """
        stats = require_stats(self.name, stats, name)
        return wanda_scores(weight, stats.sum_sq, layer_name=name)


__all__ = ["Wanda"]
