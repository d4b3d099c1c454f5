"""OBS saliency ``w_ij² / [H⁻¹]_jj`` from the layer's real Hessian (LeCun et al. 1989, OBD;
Hassibi & Stork 1993, OBS; the selection criterion of SparseGPT, Frantar & Alistarh 2023).

Stage: scores. ``H = XᵀX / n`` comes from the calibration context (collected with
``hessian=True``), dampened as the SparseGPT reference does (dead inputs get ``H_jj = 1``,
``λ = percdamp · mean(diag H)``). The score is the increase of ``‖WX - ŴX‖²`` (up to the factor
½) when weight ij alone is removed and the rest of its row is optimally updated. It ranks
weights; the weight update itself is :func:`pruning_core.solvers.sparsegpt_prune` (used by
the ``sparsegpt`` method, :mod:`pruning_core.methods.sparsegpt`).
"""

from __future__ import annotations

import torch

from pruning_core.calibration.hessian import check_hessian, inverse_hessian
from pruning_core.importance.base import SCORE_DTYPE, check_weight_2d


def obs_saliency(weight: torch.Tensor, hessian: torch.Tensor, *, percdamp: float = 0.01,
                 layer_name: str | None = None) -> torch.Tensor:
    """``w_ij² / [H⁻¹]_jj`` with the dampened Hessian.

    Args:
        weight: ``[out, in]``.
        hessian: ``[in, in]`` (any positive scale; the ranking does not depend on it).
        percdamp: relative dampening.

    Returns:
        float32 ``[out, in]`` scores.

    Raises:
        ShapeMismatch: weight not 2-D or Hessian not ``[in, in]``.
        NumericalInstability: NaN/Inf in either, or a Hessian that stays singular.
    """
    check_weight_2d(weight, "sparsegpt", layer_name)
    check_hessian(hessian, weight.shape[1], method="sparsegpt", name=layer_name)
    inv = inverse_hessian(hessian.to(weight.device), percdamp=percdamp, dtype=torch.float64,
                          upper=False, name=layer_name)
    hinv_diag = torch.diagonal(inv.hinv)  # (in,) > 0 for a positive definite H
    w = weight.detach().to(torch.float64).masked_fill(inv.dead[None, :], 0.0)
    return (w.square() / hinv_diag[None, :]).to(SCORE_DTYPE)


__all__ = ["obs_saliency"]
