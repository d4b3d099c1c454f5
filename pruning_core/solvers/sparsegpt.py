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

The column loop itself is :func:`pruning_core.solvers.obs.obs_columns`, shared with GPTQ
(:mod:`pruning_core.solvers.gptq`, which also runs the joint prune-and-quantize pass of §3.5).

Hessian scale: the reference accumulates ``H = 2/n · Σ x xᵀ``; any positive multiple ``cH``
gives the same result here, because λ is relative (``cH + cλI``), ``U`` scales by ``1/sqrt(c)``,
the scores ``w²/U_jj²`` by ``c`` (same ranking) and the update ``(w - q)/U_ii · U_i,:`` not at all.
"""

from __future__ import annotations

import logging

import torch

from pruning_core.masks.pattern import SparsityPattern
from pruning_core.solvers.obs import check_solver_args, obs_columns, prepare_problem
from pruning_core.validate import check_finite

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
        NumericalInstability: NaN/Inf in the weight or Hessian, a Hessian that is not symmetric
            (beyond float32 rounding, see :func:`~pruning_core.calibration.hessian.check_symmetric`)
            or that stays singular.
    """
    nm = check_solver_args(weight, hessian, sparsity, pattern, blocksize, name, mask)
    W, U, forced, damping = prepare_problem(weight, hessian, mask, percdamp=percdamp, dtype=dtype, name=name)
    keep = obs_columns(W, U, sparsity, nm, blocksize, forced)
    check_finite(W, method="sparsegpt", what="updated weight", layer=name)
    logger.debug("%s: sparsegpt pruned %.4f (λ=%.3g)", name, 1 - keep.float().mean().item(), damping)
    return W.to(weight.dtype), keep


__all__ = ["sparsegpt_prune"]
