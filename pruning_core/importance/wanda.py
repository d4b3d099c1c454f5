"""Wanda importance: ``S_ij = |W_ij| · ‖X_j‖₂`` (Sun et al. 2023, "A Simple and Effective
Pruning Approach for Large Language Models", eq. 1).

Stage: scores. ``‖X_j‖₂`` is the L2 norm of input channel j over *all* calibration tokens,
``sqrt(Σ_t x_tj²)``, taken from :attr:`ActivationStats.sum_sq`. The reference code
(locuslab/wanda ``lib/prune.py``) computes ``|W| * sqrt(scaler_row)`` where ``scaler_row`` is
``Σ_t x_tj² / n_samples``: the same metric up to a constant factor, so the same masks.

A channel that is never active gives zero scores: its weights never influence the output on the
calibration data.
"""

from __future__ import annotations

import torch

from pruning_core.errors import NumericalInstability, ShapeMismatch
from pruning_core.importance.base import SCORE_DTYPE, check_weight_2d
from pruning_core.validate import check_finite


def wanda_scores(weight: torch.Tensor, sum_sq: torch.Tensor, *, layer_name: str | None = None) -> torch.Tensor:
    """Wanda scores ``|W| * sqrt(sum_sq)[None, :]``.

    Args:
        weight: ``[out, in]`` weight.
        sum_sq: ``[in]`` per-channel sum of squared activations over all tokens (``Σ_t x_tj²``).

    Returns:
        float32 ``[out, in]`` scores.

    Raises:
        ShapeMismatch: ``weight`` not 2-D, or ``sum_sq`` not ``[in]``.
        NumericalInstability: NaN/Inf in either input, or a negative ``sum_sq`` entry.
    """
    check_weight_2d(weight, "wanda", layer_name)
    if sum_sq.dim() != 1 or sum_sq.shape[0] != weight.shape[1]:
        raise ShapeMismatch([weight.shape[1]], list(sum_sq.shape), name=layer_name,
                            reason="activation sum of squares must have one entry per input column")
    check_finite(sum_sq, method="wanda", what="activation norm", layer=layer_name)
    if bool((sum_sq < 0).any()):
        j = int(torch.nonzero(sum_sq < 0)[0, 0])
        raise NumericalInstability("wanda", f"negative sum of squares at input {j}: {float(sum_sq[j])}",
                                   layer=layer_name, index=(j,))
    norms = sum_sq.detach().to(torch.float64).sqrt().to(weight.device, SCORE_DTYPE)
    scores = weight.detach().to(SCORE_DTYPE).abs() * norms[None, :]  # (out, in)
    check_finite(scores, method="wanda", what="score (float32 overflow)", layer=layer_name)
    return scores


__all__ = ["wanda_scores"]
