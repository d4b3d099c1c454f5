"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", Algorithm 1).

Stage: solvers. Checked line by line against the authors' reference, IST-DASLab/sparsegpt
``sparsegpt.py`` ``SparseGPT.fasterprune`` (commit 147d215). Same algorithm, with these documented
differences:

- Exact counts: each block of columns prunes exactly ``floor(rows · count · s)`` weights. The
  reference thresholds at the ``int(numel·s)``-th smallest score and prunes ``score <= thresh``,
  i.e. at least one weight more per block, plus every tie at the threshold.
- Ties: among equal scores the lower (row-major) index is kept, here and in N:M groups (the
  reference uses ``torch.topk``, whose tie order is unspecified).
- Damping retries: if a Cholesky factorization fails, λ grows 10x (at most 6 times) before
  :class:`NumericalInstability`; the reference just fails.
- An optional existing keep mask (iterative pruning): weights it prunes stay pruned.

Hessian scale: the reference accumulates ``H = 2/n · Σ x xᵀ``; any positive multiple ``cH``
gives the same result here, because λ is relative (``cH + cλI``), ``U`` scales by ``1/sqrt(c)``,
the scores ``w²/U_jj²`` by ``c`` (same ranking) and the update ``(w - q)/U_ii · U_i,:`` not at all.
"""

from __future__ import annotations

import logging

import torch

from pruning_core.errors import ConfigError, InvalidPattern, InvalidSparsity, ShapeMismatch
from pruning_core.masks.pattern import NM, SparsityPattern, Unstructured
from pruning_core.solvers.hessian import check_hessian, inverse_hessian
from pruning_core.validate import check_finite, check_rank, check_sparsity, num_to_prune

logger = logging.getLogger(__name__)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    pattern: SparsityPattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str | None = None,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` to ``sparsity`` and update the kept weights to minimise ``‖WX - ŴX‖²``.

    Args:
        weight: ``[out, in]`` weight of a linear layer (output = ``x @ weightᵀ``).
        hessian: ``[in, in]`` ``XᵀX`` of the layer inputs (any positive scale).
        sparsity: fraction pruned, in [0, 1). For an N:M pattern it must equal ``1 - n/m``.
        pattern: None / ``Unstructured()`` (adaptive mask per column block) or ``NM(n, m)``
            (n kept in every m consecutive inputs of each row).
        blocksize: columns per lazy-update block (a multiple of m for N:M).
        percdamp: relative dampening of the Hessian diagonal.
        name: layer name for error messages.
        mask: optional existing keep mask ``[out, in]`` (True = keep); its pruned weights stay pruned.
        dtype: compute dtype, float32 (as the reference) or float64.

    Returns:
        ``(new_weight, keep_mask)``: the updated weight in ``weight``'s dtype and device (exactly
        zero where ``keep_mask`` is False) and the bool keep mask. Columns of dead inputs
        (``H_jj = 0``) are zeroed, as in the reference, and pruned in the mask: they count towards
        the block's pruning budget, and an N:M group of dead inputs keeps none.

    Raises:
        ShapeMismatch, InvalidSparsity, InvalidPattern, ConfigError: bad arguments.
        NumericalInstability: NaN/Inf in the weight or Hessian, or a Hessian that stays singular.
    """
    nm = _check_args(weight, hessian, sparsity, pattern, blocksize, name, mask)
    inv = inverse_hessian(hessian.to(weight.device), percdamp=percdamp, dtype=dtype, name=name)
    U, dead, damping = inv.upper, inv.dead, inv.damping
    assert U is not None
    del inv  # only U is needed from here on: free H⁻¹ before the column loop
    W = weight.detach().to(dtype).clone()  # (out, in)
    W[:, dead] = 0  # dead inputs never contribute: zero their weights (as the reference)
    forced = None if mask is None else ~mask.to(device=W.device, dtype=torch.bool)
    if bool(dead.any()):  # ... and report them as pruned, so the mask matches the zeros
        dead_w = dead.to(W.device)[None, :].expand_as(W)
        forced = dead_w if forced is None else forced | dead_w
    keep = _obs_prune(W, U, sparsity, nm, blocksize, forced)
    check_finite(W, method="sparsegpt", what="updated weight", layer=name)
    logger.debug("%s: sparsegpt pruned %.4f (λ=%.3g)", name, 1 - keep.float().mean().item(), damping)
    return W.to(weight.dtype), keep


def _obs_prune(
    W: torch.Tensor, U: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, blocksize: int,
    forced: torch.Tensor | None,
) -> torch.Tensor:
    """Algorithm 1 of the paper on ``W`` in place; returns the keep mask.

    ``U`` is the upper Cholesky factor of ``H⁻¹``: row ``U[i, i:]`` / ``U[i, i]`` is the OBS update
    direction for column i once columns ``< i`` are fixed, and ``U[i, i]²`` the matching ``[H⁻¹]_ii``.
    The loop works on the transpose ``Wt = Wᵀ`` (in, out) so that a column of W is a contiguous row.
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
            k = num_to_prune(rows * count, sparsity)
            prune1 = _select_lowest(W1.T.square() / d1.square()[None, :], k, F1).T.contiguous()
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)  # (count, rows)
        for i in range(count):  # column-by-column OBS within the block
            if nm is not None and i % nm[1] == 0:
                # N:M selection every m columns, on the weights updated so far
                g = slice(i, i + nm[1])
                scores = W1[g].T.square() / d1[g].square()[None, :]  # (rows, m)
                prune1[g] = _select_nm(scores, nm[0], None if F1 is None else F1[:, g]).T
            w = W1[i]
            q = w.masked_fill(prune1[i], 0.0)  # pruned weights go to 0, kept ones stay
            Q1[i] = q
            err = (w - q) / U1[i, i]  # OBS: δ = -(w_p / [H⁻¹]_pp) · H⁻¹_{p,:} in Cholesky form
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)  # update the rest of the block
            Err1[i] = err
        Wt[i1:i2] = Q1
        keep[:, i1:i2] = ~prune1.T
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)  # lazy batched update of later columns
    W.copy_(Wt.T)
    return keep


def _select_lowest(scores: torch.Tensor, k: int, forced: torch.Tensor | None) -> torch.Tensor:
    """Bool prune mask: the ``k`` lowest scores (plus every forced one); ties keep the lower
    (row-major) index. O(n) with ``kthvalue`` instead of a full stable sort."""
    flat = scores.reshape(-1)
    if forced is not None:
        flat = flat.masked_fill(forced.reshape(-1), float("-inf"))
    prune = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        v = flat.kthvalue(k).values  # the k-th smallest score
        prune = flat < v
        ties = flat == v
        extra = k - int(prune.sum())  # how many of the tied scores must go: the highest indices
        from_end = ties.flip(0).cumsum(0).flip(0)  # rank of each tie counted from the end
        prune |= ties & (from_end <= extra)
    if forced is not None:
        prune |= forced.reshape(-1)
    return prune.reshape(scores.shape)


def _select_nm(scores: torch.Tensor, n: int, forced: torch.Tensor | None) -> torch.Tensor:
    """Bool prune mask over ``[rows, m]``: keep the ``n`` best per row; ties keep the lower index."""
    if forced is not None:
        scores = scores.masked_fill(forced, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    prune = torch.ones_like(scores, dtype=torch.bool)
    prune.scatter_(1, order[:, :n], False)
    if forced is not None:
        prune |= forced
    return prune


def _check_args(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: SparsityPattern | None,
    blocksize: int, name: str | None, mask: torch.Tensor | None,
) -> tuple[int, int] | None:
    """Validate the arguments; return ``(n, m)`` for an N:M pattern, None for unstructured."""
    check_rank(weight, 2, name=name, what="weight")
    check_finite(weight, method="sparsegpt", what="weight", layer=name)
    check_hessian(hessian, weight.shape[1], method="sparsegpt", name=name)
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


__all__ = ["sparsegpt_prune"]
