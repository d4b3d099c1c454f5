"""Hessian checks and preparation shared by the OBS solvers (SparseGPT, GPTQ) and the OBS saliency.

Stage: calibration (next to the statistics that hold ``XᵀX``; imported by ``solvers`` and
``importance``, never the reverse). Follows IST-DASLab/sparsegpt ``SparseGPT.fasterprune``: dead inputs (``H_jj = 0``)
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
#: Largest accepted ``|H_ij - H_ji| / sqrt(H_ii · H_jj)``. A float32 sum of n products has a
#: relative error of about ``log2(n) · 6e-8`` of ``Σ|x_i x_j| <= sqrt(H_ii H_jj)`` (Cauchy-Schwarz),
#: ~1e-6 for 10^4 tokens; anything above 1e-4 is not a rounding artefact of ``XᵀX``.
SYMMETRY_RTOL = 1e-4
_SYMMETRY_CHUNK = 256


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
    """ShapeMismatch unless ``[in, in]``; NumericalInstability on NaN/Inf or a non-symmetric matrix."""
    if list(hessian.shape) != [in_features, in_features]:
        raise ShapeMismatch([in_features, in_features], list(hessian.shape), name=name,
                            reason="the Hessian must be [in_features, in_features]")
    check_finite(hessian, method=method, what="Hessian", layer=name)
    check_symmetric(hessian, method=method, name=name)


def check_symmetric(
    hessian: torch.Tensor, *, method: str, name: str | None, rtol: float = SYMMETRY_RTOL
) -> None:
    """NumericalInstability unless ``|H_ij - H_ji| <= rtol · sqrt(H_ii · H_jj)`` for all i, j.

    The bound is the Cauchy-Schwarz scale of entry (i, j) of ``XᵀX``, so the test is as strict
    for a quiet channel as for an outlier channel; a dead input (``H_ii = 0``) must have an exactly
    symmetric row. Works on chunks of rows (``256 x in`` temporaries) and names the worst entry.
    """
    n = hessian.shape[0]
    root = torch.diagonal(hessian).detach().abs().to(torch.float64).sqrt()  # (in,)
    worst, where = 0.0, (0, 0)
    for r0 in range(0, n, _SYMMETRY_CHUNK):
        r1 = min(n, r0 + _SYMMETRY_CHUNK)
        diff = (hessian[r0:r1] - hessian[:, r0:r1].T).abs().to(torch.float64)  # (b, in)
        ratio = diff / (root[r0:r1, None] * root[None, :])  # inf where a dead input is asymmetric
        ratio = ratio.nan_to_num_(nan=0.0, posinf=float("inf"))  # 0/0: dead and symmetric
        top = float(ratio.max()) if ratio.numel() else 0.0
        if top > worst:
            flat = int(ratio.argmax())
            worst, where = top, (r0 + flat // n, flat % n)
    if worst > rtol:
        i, j = where
        raise NumericalInstability(
            method, f"Hessian is not symmetric: |H[{i},{j}] - H[{j},{i}]| = "
                    f"{float((hessian[i, j] - hessian[j, i]).abs()):.3g}, {worst:.3g} x sqrt(H[{i},{i}]·H[{j},{j}]) "
                    f"(float32 sums of XᵀX stay below {rtol:g})", layer=name, index=where)


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


__all__ = [
    "DAMPING_GROWTH",
    "MAX_DAMPING_RETRIES",
    "SYMMETRY_RTOL",
    "InverseHessian",
    "check_hessian",
    "check_symmetric",
    "inverse_hessian",
]
