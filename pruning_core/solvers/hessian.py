"""Hessian preparation shared by the SparseGPT solver and the OBS saliency score.

Stage: solvers. Follows IST-DASLab/sparsegpt ``SparseGPT.fasterprune``: dead inputs (``H_jj = 0``)
get ``H_jj = 1``; the dampening ``λ = percdamp · mean(diag H)`` is added to the diagonal; then
``H⁻¹`` comes from a Cholesky factorization (``cholesky`` -> ``cholesky_inverse``) and, for the
solver, the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``).

Unlike the reference, a failed factorization is retried with ``λ`` grown ``growth``-fold up to
``max_retries`` times before :class:`NumericalInstability` names the layer and the last ``λ``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pruning_core.errors import ConfigError, NumericalInstability, ShapeMismatch
from pruning_core.validate import check_finite

logger = logging.getLogger(__name__)

MAX_DAMPING_RETRIES = 6
DAMPING_GROWTH = 10.0


@dataclass(frozen=True)
class InverseHessian:
    """Result of :func:`inverse_hessian`.

    Attributes:
        hinv: ``H⁻¹`` of the dampened Hessian ``[in, in]``.
        upper: the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), or None if not requested.
        dead: bool ``[in]``, inputs whose ``H_jj`` was 0.
        damping: the ``λ`` that was finally added to the diagonal.
        retries: how many times ``λ`` had to grow.
    """

    hinv: torch.Tensor
    upper: torch.Tensor | None
    dead: torch.Tensor
    damping: float
    retries: int


def check_hessian(hessian: torch.Tensor, in_features: int, *, method: str, name: str | None) -> None:
    """ShapeMismatch unless ``[in, in]``; NumericalInstability on NaN/Inf."""
    if list(hessian.shape) != [in_features, in_features]:
        raise ShapeMismatch([in_features, in_features], list(hessian.shape), name=name,
                            reason="the Hessian must be [in_features, in_features]")
    check_finite(hessian, method=method, what="Hessian", layer=name)


def inverse_hessian(
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    upper: bool = True,
    method: str = "sparsegpt",
    name: str | None = None,
    max_retries: int = MAX_DAMPING_RETRIES,
    growth: float = DAMPING_GROWTH,
) -> InverseHessian:
    """Dampened inverse Hessian (and its upper Cholesky factor), with damping retries.

    Args:
        hessian: ``[in, in]`` symmetric PSD matrix (any positive scale: ``XᵀX``, ``XᵀX/n``, ``2XᵀX/n``).
        percdamp: relative dampening; ``λ = percdamp · mean(diag H)`` after the dead-input fix.
        dtype: compute dtype (float32 as the reference, or float64).
        upper: also compute ``U = cholesky(H⁻¹, upper=True)``.

    Raises:
        ConfigError: ``percdamp`` negative or not finite.
        NumericalInstability: still not positive definite after ``max_retries`` growths of λ.
    """
    if not (percdamp >= 0.0 and percdamp < float("inf")):
        raise ConfigError("percdamp", f"must be a finite number >= 0, got {percdamp}")
    base = torch.diagonal(hessian.detach()).to(dtype, copy=True)  # (in,) undamped diagonal
    dead = base == 0
    base[dead] = 1.0  # 1. dead inputs: H_jj = 1 (their weights are zeroed by the solver)
    mean_diag = float(base.mean())
    lam = percdamp * mean_diag  # 2. dampening λ = percdamp · mean(diag H)
    tried = lam
    for attempt in range(max_retries + 1):
        tried = lam
        result = _try_factor(_damped(hessian, base, lam, dtype), upper)  # a fresh H + λI per try
        if result is not None:
            if attempt:
                logger.warning("%s: Hessian needed damping %.3g (%d retries)", name or method, lam, attempt)
            return InverseHessian(result[0], result[1], dead, lam, attempt)
        lam = max(lam * growth, 1e-8 * mean_diag, 1e-12)
    raise NumericalInstability(
        method, f"Hessian is not positive definite even with damping λ={tried:.3g} "
                f"after {max_retries} retries (percdamp={percdamp})", layer=name)


def _damped(hessian: torch.Tensor, diag: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``hessian`` in ``dtype`` with diagonal ``diag + λ``."""
    H = hessian.detach().to(dtype, copy=True)
    torch.diagonal(H).copy_(diag).add_(lam)
    return H


def _try_factor(damped: torch.Tensor, upper: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``damped⁻¹`` and its upper Cholesky factor, or None if a factorization fails.

    Takes ownership of ``damped`` and frees each ``[in, in]`` matrix as soon as the next one
    exists, so at most two are alive at once (plus LAPACK's workspace)."""
    L, info = torch.linalg.cholesky_ex(damped)  # 3. H = LLᵀ
    del damped
    if int(info) != 0:
        return None
    hinv = torch.cholesky_inverse(L)  # 4. H⁻¹ from the factor
    del L
    if not bool(torch.isfinite(hinv).all()):
        return None
    if not upper:
        return hinv, None
    U, info = torch.linalg.cholesky_ex(hinv, upper=True)  # 5. H⁻¹ = UᵀU
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return hinv, U


__all__ = ["DAMPING_GROWTH", "MAX_DAMPING_RETRIES", "InverseHessian", "check_hessian", "inverse_hessian"]
