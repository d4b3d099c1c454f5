"""GPTQ: weight-only quantization with OBS error compensation, alone or joint with pruning.

Stage: solvers. Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1, checked against IST-DASLab/gptq ``gptq.py``
``GPTQ.fasterquant`` (commit 2d65066) and, for the joint pass, IST-DASLab/sparsegpt
``fasterprune``'s ``quantizer`` branch (SparseGPT §3.5: prune, then quantize, each column and
propagate the error of both). One column loop for all of it: :func:`~pruning_core.solvers.obs.obs_columns`.

Three uses of :func:`gptq_quantize`:

- GPTQ: ``sparsity=0`` and no mask.
- Joint SparseGPT + GPTQ: ``sparsity > 0`` (unstructured, or ``pattern=NM(n, m)``).
- A fixed earlier mask (Wanda's, magnitude's) kept exactly: ``mask=keep`` with ``sparsity=0``.
  Its pruned weights are 0 before rounding; 0 is a grid point of every group (see
  :mod:`pruning_core.quant.quantizer`), so they dequantize to exactly 0 (nothing is forced
  afterwards) and the mask comes back unchanged (plus dead inputs, which are zeroed).

Grids: ``group_size=-1``: one grid per output row, computed before the loop from the starting
weights, as the references do (here with dead inputs and masked weights counted as 0). Groups: a group's grid is computed when the
loop reaches its first column, from the group's weights as updated so far, with the weights
already known to be pruned counted as 0 (GPTQ's ``static_groups=False``). For that to read fully
updated weights a group must not straddle a lazy-update block: ``blocksize`` must be a multiple
of ``group_size`` (the reference reads a stale copy instead when it does not). With an N:M
pattern the masks of a group's later columns are not chosen yet, so their current weights count.
Act-order (``actorder``) is not implemented: columns are quantized in their natural order.

Differences from the references: the symmetric grid and scale rounding of
:mod:`pruning_core.quant.quantizer`; pruning as in :mod:`pruning_core.solvers.sparsegpt`
(exact counts, stable ties, damping retries).
"""

from __future__ import annotations

import logging

import torch

from pruning_core.errors import ConfigError
from pruning_core.masks.pattern import SparsityPattern
from pruning_core.quant.quantizer import check_scale_dtype, from_grid, grid_params, to_grid
from pruning_core.quant.spec import QuantSpec
from pruning_core.quant.weight import QuantizedWeight
from pruning_core.solvers.obs import check_solver_args, obs_columns, prepare_problem
from pruning_core.validate import check_finite

logger = logging.getLogger(__name__)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    sparsity: float = 0.0,
    pattern: SparsityPattern | None = None,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    scale_dtype: torch.dtype | None = None,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[QuantizedWeight, torch.Tensor]:
    """Quantize ``weight`` (optionally pruning it in the same pass) to minimise ``‖WX - ŴX‖²``.

    Args:
        weight: ``[out, in]`` weight of a linear layer (output = ``x @ weightᵀ``), any float dtype.
        hessian: ``[in, in]`` ``XᵀX`` of the layer inputs (any positive scale), e.g.
            ``ActivationStats.hessian``.
        spec: bits, group size, symmetry; ``in`` must be a multiple of the group size.
        sparsity, pattern: as :func:`~pruning_core.solvers.sparsegpt_prune` (0 = no pruning).
        mask: optional existing keep mask ``[out, in]``; its pruned weights stay exactly 0.
        blocksize: columns per lazy-update block (a multiple of the group size and of N:M's m).
        percdamp: relative dampening of the Hessian diagonal.
        scale_dtype: dtype the scales are stored in (default ``weight.dtype``); the codes are
            computed against the scales rounded to it.
        name: layer name for error messages.
        dtype: compute dtype of the solve, float32 (as the references) or float64.

    Returns:
        ``(quantized, keep_mask)``: the :class:`QuantizedWeight` on ``weight``'s device (the new
        layer weight is ``quantized.dequantize(weight.dtype)``) and the bool keep mask (False:
        pruned, dead input or masked; those dequantize to exactly 0).

    Raises:
        ShapeMismatch: bad shapes, or ``in`` not a multiple of the group size.
        InvalidSparsity, InvalidPattern, ConfigError: bad arguments (also: ``blocksize`` not a
            multiple of the group size, a ``scale_dtype`` that is not a float of 16 bits or more).
        NumericalInstability: NaN/Inf in the weight or Hessian, a non-symmetric Hessian, or one
            that stays singular.
    """
    nm = check_solver_args(weight, hessian, sparsity, pattern, blocksize, name, mask, method="gptq")
    spec.num_groups(weight.shape[1], name=name)
    scale_dtype = check_scale_dtype(scale_dtype or weight.dtype)
    if not spec.per_channel and blocksize % spec.group_size:
        raise ConfigError("blocksize", f"must be a multiple of group_size={spec.group_size} "
                                       f"(a group must not straddle two blocks), got {blocksize}")
    W, U, forced, damping = prepare_problem(weight, hessian, mask, percdamp=percdamp, dtype=dtype, name=name,
                                            method="gptq")
    quantizer = _GroupQuantizer(spec, W, forced, scale_dtype)
    keep = obs_columns(W, U, sparsity, nm, blocksize, forced, quantizer)
    check_finite(W, method="gptq", what="quantized weight", layer=name)
    logger.debug("%s: gptq %s, pruned %.4f (λ=%.3g)", name, spec, 1 - keep.float().mean().item(), damping)
    return quantizer.result(), keep


class _GroupQuantizer:
    """The :class:`~pruning_core.solvers.obs.ColumnQuantizer` of GPTQ: a grid per row and group,
    unsigned codes collected column by column (``[in, out]`` uint8, one byte per weight)."""

    def __init__(self, spec: QuantSpec, W: torch.Tensor, forced: torch.Tensor | None, scale_dtype: torch.dtype):
        rows, cols = W.shape
        self.spec, self.scale_dtype = spec, scale_dtype
        self.width = spec.group_width(cols)
        groups = spec.num_groups(cols)
        self.codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)  # (in, out)
        self.scales = torch.empty(rows, groups, dtype=W.dtype, device=W.device)
        self.zeros = torch.empty(rows, groups, dtype=W.dtype, device=W.device)
        if spec.per_channel:  # one grid per row, from the starting weights (as the references)
            x = W if forced is None else W.masked_fill(forced, 0.0)
            self.scales[:, 0], self.zeros[:, 0] = grid_params(x, spec, dim=1, scale_dtype=scale_dtype)

    def __call__(self, col: int, q: torch.Tensor, pending: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
        g, offset = divmod(col, self.width)
        if offset == 0 and not self.spec.per_channel:
            # the group's grid, from its weights as updated so far; known-pruned weights count as 0
            x = pending[: self.width].masked_fill(pruned[: self.width], 0.0)  # (width, rows)
            self.scales[:, g], self.zeros[:, g] = grid_params(x, self.spec, dim=0, scale_dtype=self.scale_dtype)
        scale, zero = self.scales[:, g], self.zeros[:, g]
        codes = to_grid(q, scale, zero, self.spec.maxq)  # (rows,)
        self.codes_t[col] = codes.to(torch.uint8)
        return from_grid(codes, scale, zero)

    def result(self) -> QuantizedWeight:
        offset = self.spec.offset
        return QuantizedWeight(
            codes=(self.codes_t.T.to(torch.int16) - offset).to(torch.int8).contiguous(),
            scales=self.scales.to(self.scale_dtype),
            zero_points=(self.zeros - offset).to(torch.int8),
            spec=self.spec,
        )


__all__ = ["gptq_quantize"]
