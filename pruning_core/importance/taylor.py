"""First-order Taylor importance ``|w · ∂L/∂w|`` (Molchanov et al. 2016/2019; the element-wise
first-order term used by LLM-Pruner, Ma et al. 2023).

Stage: scores. Removing weight w changes the loss by ``ΔL ≈ -w · ∂L/∂w`` to first order. The
gradients come from :func:`pruning_core.calibration.collect_gradients`, which stores per layer
``Σ_b ∂L_b/∂W`` and ``Σ_b |∂L_b/∂W|`` over the calibration batches. Two reductions:

- ``"mean_gradient"`` (default): ``|W ⊙ mean_b ∂L_b/∂W|``, the first-order change of the mean
  calibration loss;
- ``"mean_abs"``: ``|W| ⊙ mean_b |∂L_b/∂W|`` = ``mean_b |W ⊙ ∂L_b/∂W|``, the per-batch
  magnitudes averaged (does not let batches with opposite gradients cancel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pruning_core.calibration.context import CalibrationContext
from pruning_core.errors import CalibrationRequired, ConfigError, ShapeMismatch
from pruning_core.importance.base import SCORE_DTYPE, ImportanceScores, module_weight
from pruning_core.validate import check_finite

TaylorReduction = Literal["mean_gradient", "mean_abs"]


def taylor_scores(weight: torch.Tensor, gradient: torch.Tensor, *, layer_name: str | None = None) -> torch.Tensor:
    """``|weight ⊙ gradient|`` in float32, shaped like ``weight``.

    Raises:
        ShapeMismatch: different shapes. NumericalInstability: NaN/Inf in either.
    """
    if weight.shape != gradient.shape:
        raise ShapeMismatch(list(weight.shape), list(gradient.shape), name=layer_name, reason="gradient")
    check_finite(weight, method="taylor", what="weight", layer=layer_name)
    check_finite(gradient, method="taylor", what="gradient", layer=layer_name)
    w = weight.detach().to(SCORE_DTYPE)
    scores = (w * gradient.detach().to(w.device, SCORE_DTYPE)).abs()
    check_finite(scores, method="taylor", what="score (float32 overflow)", layer=layer_name)
    return scores


@dataclass(frozen=True)
class TaylorImportance:
    """First-order Taylor importance from the context's accumulated gradients."""

    layer_name: str | None = None
    reduction: TaylorReduction = "mean_gradient"

    def __post_init__(self) -> None:
        if self.reduction not in ("mean_gradient", "mean_abs"):
            raise ConfigError("reduction", f"must be 'mean_gradient' or 'mean_abs', got {self.reduction!r}")

    @property
    def name(self) -> str:
        return "taylor"

    @property
    def requires_calibration(self) -> bool:
        return True

    def compute(
        self, module: nn.Module | torch.Tensor, context: CalibrationContext | None = None, *,
        layer_name: str | None = None,
    ) -> ImportanceScores:
        """Scores of ``module``'s weight; MissingActivationStats if the layer has no gradients."""
        name = layer_name or self.layer_name
        if context is None or name is None:
            raise CalibrationRequired(self.name, layer=name)
        grads = context.require_gradients(name)
        if grads.num_batches == 0:
            raise CalibrationRequired(self.name, layer=name)
        weight = module_weight(module, name)
        if self.reduction == "mean_gradient":
            values = taylor_scores(weight, grads.mean_gradient, layer_name=name)
        else:
            values = taylor_scores(weight.abs(), grads.mean_abs_gradient, layer_name=name)
        return ImportanceScores(values, f"taylor_{self.reduction}")


__all__ = ["TaylorImportance", "TaylorReduction", "taylor_scores"]
