"""OBS saliency ``w_ij² / [H⁻¹]_jj`` from the layer's real Hessian (LeCun et al. 1989, OBD;
Hassibi & Stork 1993, OBS; the selection criterion of SparseGPT, Frantar & Alistarh 2023).

Stage: scores. ``H = XᵀX / n`` comes from the calibration context (collected with
``hessian=True``), dampened as the SparseGPT reference does (dead inputs get ``H_jj = 1``,
``λ = percdamp · mean(diag H)``). The score is the increase of ``‖WX - ŴX‖²`` (up to the factor
½) when weight ij alone is removed and the rest of its row is optimally updated. It ranks
weights; the weight update itself is :func:`pruning_core.solvers.sparsegpt_prune` (used by
``SparseGPTPruner``). The seed's rank-1 stand-in Hessian built from ``sqrt(E[x²])`` is gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruning_core.calibration.context import CalibrationContext
from pruning_core.errors import CalibrationRequired, ConfigError
from pruning_core.importance.base import (
    SCORE_DTYPE,
    ImportanceScores,
    check_weight_2d,
    module_weight,
    require_layer_stats,
)
from pruning_core.solvers.hessian import check_hessian, inverse_hessian


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


@dataclass(frozen=True)
class SparseGPTImportance:
    """OBS saliency from the context's Hessian of the layer (``collect_activation_stats(..., hessian=True)``).

    Args:
        layer_name: default layer to look up (``compute(..., layer_name=)`` overrides).
        percdamp: relative dampening (the reference's default 0.01).
        block_size: kept for the seed's surface; used by ``SparseGPTPruner``.
    """

    layer_name: str | None = None
    percdamp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if not (0.0 <= self.percdamp < float("inf")):
            raise ConfigError("percdamp", f"must be a finite number >= 0, got {self.percdamp}")
        if self.block_size <= 0:
            raise ConfigError("block_size", f"must be positive, got {self.block_size}")

    @property
    def name(self) -> str:
        return "sparsegpt"

    @property
    def requires_calibration(self) -> bool:
        return True

    def compute(
        self, module: nn.Module | torch.Tensor, context: CalibrationContext | None = None, *,
        layer_name: str | None = None,
    ) -> ImportanceScores:
        """Saliency of ``module``'s weight; CalibrationRequired if the stats carry no Hessian."""
        name = layer_name or self.layer_name
        stats = require_layer_stats(self.name, context, name)
        hessian = stats.hessian
        if hessian is None:
            raise CalibrationRequired(f"{self.name} (statistics collected without hessian=True)", layer=name)
        weight = module_weight(module, name)
        return ImportanceScores(obs_saliency(weight, hessian, percdamp=self.percdamp, layer_name=name),
                                "sparsegpt_saliency")


__all__ = ["SparseGPTImportance", "obs_saliency"]
