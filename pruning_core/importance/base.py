"""Shared pieces of the score functions: the score dtype and the weight checks.

Stage: scores. Every score function maps a weight ``[out, in]`` (and, for activation-aware
methods, the layer's statistics) to one non-negative score per weight: higher means more
important, i.e. kept longer. Scores are float32 (``SCORE_DTYPE``) and have the weight's shape,
whatever the weight's dtype.
"""

from __future__ import annotations

import torch

from pruning_core.validate import check_finite, check_rank

SCORE_DTYPE = torch.float32


def check_weight_2d(weight: torch.Tensor, method: str, layer_name: str | None) -> None:
    """ShapeMismatch unless 2-D; NumericalInstability on NaN/Inf (first bad index)."""
    check_rank(weight, 2, name=layer_name, what="weight")
    check_finite(weight, method=method, what="weight", layer=layer_name)


__all__ = ["SCORE_DTYPE", "check_weight_2d"]
