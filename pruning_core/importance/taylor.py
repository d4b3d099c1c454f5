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

from typing import Literal

import torch

from pruning_core.errors import ShapeMismatch
from pruning_core.importance.base import SCORE_DTYPE
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


__all__ = ["TaylorReduction", "taylor_scores"]
