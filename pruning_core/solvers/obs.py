"""The OBS column loop shared by SparseGPT (prune) and GPTQ (quantize, or prune and quantize).

Stage: solvers. SparseGPT (Frantar & Alistarh 2023, Algorithm 1) and GPTQ (Frantar et al. 2023,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
Algorithm 1) are the same solve: fix the columns of ``W`` one after the other (to 0 if pruned,
to a grid point if quantized) and spread each column's error over the columns not yet fixed with
the upper Cholesky factor of ``H⁻¹``. SparseGPT §3.5 (joint sparsification and quantization)
does both in one pass: prune, then quantize, each column. :func:`obs_columns` is that loop with
an optional per-column quantizer; with none it is exactly the SparseGPT loop.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pruning_core.calibration.hessian import check_hessian, inverse_hessian
from pruning_core.errors import ConfigError, InvalidPattern, InvalidSparsity, ShapeMismatch
from pruning_core.masks.pattern import NM, SparsityPattern, Unstructured
from pruning_core.masks.select import keep_nm, keep_topk
from pruning_core.validate import check_finite, check_rank, check_sparsity

# Scores w²/[U_jj]² are >= 0: a forced (already pruned) weight scores below every real one.
_FORCED_SCORE = -1.0


class ColumnQuantizer(Protocol):
    """Rounds column ``col`` of ``W`` (after pruning) to the grid; returns the dequantized column.

    ``pending`` is ``Wᵀ[col:block end]`` (columns not fixed yet, updated so far, ``(n, rows)``)
    and ``pruned`` the matching prune mask of the block as far as it is known: a quantizer that
    computes a group's grid when the loop reaches the group reads them."""

    def __call__(self, col: int, q: torch.Tensor, pending: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor: ...


def check_solver_args(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: SparsityPattern | None,
    blocksize: int, name: str | None, mask: torch.Tensor | None, *, method: str = "sparsegpt",
) -> tuple[int, int] | None:
    """Validate the arguments; return ``(n, m)`` for an N:M pattern, None for unstructured."""
    check_rank(weight, 2, name=name, what="weight")
    check_finite(weight, method=method, what="weight", layer=name)
    check_hessian(hessian, weight.shape[1], method=method, name=name)
    check_sparsity(sparsity, name=name, allow_one=False)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ConfigError("blocksize", f"must be a positive integer, got {blocksize!r}")
    if mask is not None and mask.shape != weight.shape:
        raise ShapeMismatch(list(weight.shape), list(mask.shape), name=name, reason="existing mask")
    if pattern is None or isinstance(pattern, Unstructured):
        return None
    if not isinstance(pattern, NM):
        raise InvalidPattern(f"SparseGPT supports unstructured and N:M patterns, got {pattern}", name=name)
    pattern.check()
    n, m = pattern.n, pattern.m
    if weight.shape[1] % m:
        raise InvalidPattern(f"in_features {weight.shape[1]} is not divisible by M={m}", name=name)
    if blocksize % m:
        raise ConfigError("blocksize", f"must be a multiple of M={m} for {pattern}, got {blocksize}")
    if abs(sparsity - (1 - n / m)) > 1e-9:
        raise InvalidSparsity(sparsity, f"{pattern} prunes exactly {1 - n / m:g}", name=name)
    return n, m


def prepare_problem(
    weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor | None, *,
    percdamp: float, dtype: torch.dtype, name: str | None, method: str = "sparsegpt",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """``(W, U, forced, λ)``: a working copy of the weight in ``dtype`` with dead inputs
    (``H_jj = 0``) zeroed, the upper Cholesky factor of the dampened ``H⁻¹``, the bool
    ``[out, in]`` weights that must end up pruned (the existing mask's and the dead inputs'), or
    None, and the damping used."""
    inv = inverse_hessian(hessian.to(weight.device), percdamp=percdamp, dtype=dtype, method=method, name=name)
    U, dead, damping = inv.upper, inv.dead, inv.damping
    assert U is not None
    del inv  # only U is needed from here on: free H⁻¹ before the column loop
    W = weight.detach().to(dtype).clone()  # (out, in)
    W[:, dead] = 0  # dead inputs never contribute: zero their weights (as the reference)
    forced = None if mask is None else ~mask.to(device=W.device, dtype=torch.bool)
    if bool(dead.any()):  # ... and report them as pruned, so the mask matches the zeros
        dead_w = dead.to(W.device)[None, :].expand_as(W)
        forced = dead_w if forced is None else forced | dead_w
    return W, U, forced, damping


def obs_columns(
    W: torch.Tensor, U: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, blocksize: int,
    forced: torch.Tensor | None, quantizer: ColumnQuantizer | None = None,
) -> torch.Tensor:
    """Algorithm 1 of the paper on ``W`` in place; returns the keep mask.

    ``U`` is the upper Cholesky factor of ``H⁻¹``: row ``U[i, i:]`` / ``U[i, i]`` is the OBS update
    direction for column i once columns ``< i`` are fixed, and ``U[i, i]²`` the matching ``[H⁻¹]_ii``.
    The loop works on the transpose ``Wt = Wᵀ`` (in, out) so that a column of W is a contiguous row.
    With a ``quantizer`` each column is pruned, then rounded to the grid (SparseGPT §3.5 / GPTQ),
    and the error of both is propagated; ``W`` ends up holding the dequantized weights.
    """
    rows, cols = W.shape
    Wt = W.T.contiguous()  # (in, out)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):  # loop over column blocks B = [i1, i2)
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wt[i1:i2]  # (count, rows) view: block weights, updated as columns are fixed
        Q1 = torch.zeros_like(W1)  # pruned/updated block result
        Err1 = torch.zeros_like(W1)  # scaled errors (w - q) / U_ii for the lazy update
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)  # (count,)
        F1 = None if forced is None else forced[:, i1:i2]
        if nm is None:
            # adaptive mask selection: once per block, w² / [U_jj]² over the whole (rows, count) block
            prune1 = _prune_lowest(W1.T.square() / d1.square()[None, :], sparsity, F1).T.contiguous()
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)  # (count, rows)
        for i in range(count):  # column-by-column OBS within the block
            if nm is not None and i % nm[1] == 0:
                # N:M selection every m columns, on the weights updated so far
                g = slice(i, i + nm[1])
                scores = W1[g].T.square() / d1[g].square()[None, :]  # (rows, m)
                prune1[g] = _prune_nm(scores, nm, None if F1 is None else F1[:, g]).T
            w = W1[i]
            q = w.masked_fill(prune1[i], 0.0)  # pruned weights go to 0, kept ones stay
            if quantizer is not None:
                q = quantizer(i1 + i, q, W1[i:], prune1[i:])  # ... then to the grid (0 stays 0)
            Q1[i] = q
            err = (w - q) / U1[i, i]  # OBS: δ = -(w_p / [H⁻¹]_pp) · H⁻¹_{p,:} in Cholesky form
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)  # update the rest of the block
            Err1[i] = err
        Wt[i1:i2] = Q1
        keep[:, i1:i2] = ~prune1.T
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)  # lazy batched update of later columns
    W.copy_(Wt.T)
    return keep


def _prune_lowest(scores: torch.Tensor, sparsity: float, forced: torch.Tensor | None) -> torch.Tensor:
    """Bool prune mask over the block: the ``floor(numel · s)`` lowest scores plus every forced one;
    ties keep the lower (row-major) index (:func:`~pruning_core.masks.select.keep_topk`)."""
    if forced is None:
        return ~keep_topk(scores, sparsity)
    return ~keep_topk(scores.masked_fill(forced, _FORCED_SCORE), sparsity) | forced


def _prune_nm(scores: torch.Tensor, nm: tuple[int, int], forced: torch.Tensor | None) -> torch.Tensor:
    """Bool prune mask over ``[rows, m]``: keep the ``n`` best per row (ties: the lower index,
    :func:`~pruning_core.masks.select.keep_nm`), never a forced one."""
    n, m = nm
    if forced is None:
        return ~keep_nm(scores, n, m)
    return ~keep_nm(scores.masked_fill(forced, _FORCED_SCORE), n, m) | forced


__all__ = ["ColumnQuantizer", "check_solver_args", "obs_columns", "prepare_problem"]
