"""Pruning and weight-only quantization of one weight in one go, on one calibration Hessian.

Stage: pruning (after methods and solvers). SparseGPT §3.5 (joint sparsification and
quantization) and GPTQ are the same OBS column solve (:mod:`pruning_core.solvers.obs`), so a
layer can be pruned and quantized from the statistics collected once for pruning:

- SparseGPT + GPTQ: one pass of :func:`~pruning_core.solvers.gptq.gptq_quantize` with the
  sparsity and pattern, which chooses the mask *and* rounds the kept weights column by column,
  propagating the error of both (the method's ``blocksize``, ``percdamp`` and ``dtype``).
- Any other method (Wanda, magnitude, ...): the method chooses the mask and prunes
  (``prune_weight``), then GPTQ quantizes the pruned weight with that mask held fixed, on the same
  Hessian (``XᵀX`` of the same calibration tokens).
- ``solver="rtn"``: the method prunes, then round-to-nearest with the mask.

Exact zeros: a pruned weight is 0 when it is rounded, and 0 is a grid point of every group
(:mod:`pruning_core.quant.quantizer`), so it dequantizes to exactly 0; an N:M group keeps at most N
non-zeros (kept weights that round to 0 only add zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import ConfigError
from pruning_core.masks import SparsitySpec
from pruning_core.methods.base import Method, check_scope, earlier_mask, require_hessian
from pruning_core.methods.sparsegpt import SparseGPT
from pruning_core.quant.quantizer import quantize_rtn
from pruning_core.quant.spec import QuantSpec
from pruning_core.quant.weight import QuantizedWeight
from pruning_core.solvers.gptq import gptq_quantize

SOLVERS = ("gptq", "rtn")


@dataclass(frozen=True, eq=False)
class PrunedQuantized:
    """One weight pruned and quantized.

    Attributes:
        quantized: the :class:`QuantizedWeight`; ``quantized.dequantize(...)`` is the new layer
            weight, exactly 0 where ``keep`` is False.
        keep: bool ``[out, in]`` keep mask (the method's, plus the inputs no token reached, which
            the OBS solve zeroes).
        baseline: with ``baseline=True``, the same method's pruning alone followed by
            round-to-nearest with its mask (what the joint solve is compared with); else None.
    """

    quantized: QuantizedWeight
    keep: torch.Tensor
    baseline: QuantizedWeight | None = None


def gptq_blocksize(spec: QuantSpec) -> int:
    """GPTQ's lazy-update block for ``spec``: 128 columns, or the multiple of the group size nearest below."""
    return 128 if spec.per_channel else spec.group_size * max(1, 128 // spec.group_size)


def is_joint_solve(method: Method, solver: str) -> bool:
    """Whether the method's pruning and GPTQ are one OBS pass (SparseGPT with ``solver="gptq"``)."""
    return isinstance(method, SparseGPT) and solver == "gptq"


def prune_and_quantize(
    method: Method,
    weight: torch.Tensor,
    stats: ActivationStats | None,
    spec: SparsitySpec,
    qspec: QuantSpec,
    *,
    solver: Literal["gptq", "rtn"] = "gptq",
    percdamp: float = 0.01,
    scale_dtype: torch.dtype | None = None,
    baseline: bool = False,
    name: str | None = None,
) -> PrunedQuantized:
    """Prune ``weight`` with ``method`` to ``spec`` and quantize it to ``qspec`` (see the module docstring).

    Args:
        method: a registered method (:func:`~pruning_core.methods.get_method`).
        weight: ``[out, in]`` weight (math orientation), any float dtype and device.
        stats: the layer's statistics; with ``XᵀX`` (``hessian=True``) for GPTQ and SparseGPT.
        spec: what to prune (sparsity 0: quantization alone).
        qspec: bits, group size, symmetry.
        solver: ``gptq`` (OBS error compensation) or ``rtn`` (round to nearest).
        percdamp: GPTQ's relative dampening when the mask comes first (the joint SparseGPT solve
            uses the method's own ``percdamp``).
        scale_dtype: dtype the scales are stored in (default ``weight.dtype``).
        baseline: also compute the method's pruning followed by round-to-nearest (for SparseGPT
            + GPTQ that is a second, pruning-only solve).
        name: layer name for error messages.

    Raises:
        ConfigError: an unknown solver, a scope the method does not support, or (joint SparseGPT)
            a ``blocksize`` that is not a multiple of the group size.
        CalibrationRequired: GPTQ or SparseGPT without ``XᵀX``.
        ShapeMismatch, InvalidPattern, InvalidSparsity, NumericalInstability: as the solvers.
    """
    if solver not in SOLVERS:
        raise ConfigError("solver", f"must be one of {SOLVERS}, got {solver!r}")
    scale_dtype = scale_dtype or weight.dtype
    if is_joint_solve(method, solver):
        assert isinstance(method, SparseGPT)
        check_scope(method, spec, name=name)
        xtx = require_hessian(method.name, stats, name).xtx
        assert xtx is not None
        qw, keep = gptq_quantize(weight.detach(), xtx, qspec, sparsity=spec.sparsity, pattern=spec.pattern,
                                 mask=earlier_mask(weight, None), blocksize=method.blocksize,
                                 percdamp=method.percdamp, scale_dtype=scale_dtype, name=name, dtype=method.dtype)
        base = _prune_then_rtn(method, weight, stats, spec, qspec, scale_dtype, name) if baseline else None
        return PrunedQuantized(qw, keep, base)
    pruned, keep = method.prune_weight(weight, stats, spec, name=name)
    rtn = quantize_rtn(pruned, qspec, mask=keep, scale_dtype=scale_dtype, name=name)
    if solver == "rtn":
        return PrunedQuantized(rtn, keep, rtn if baseline else None)
    xtx = require_hessian("gptq", stats, name).xtx
    assert xtx is not None
    qw, keep = gptq_quantize(pruned, xtx, qspec, mask=keep, blocksize=gptq_blocksize(qspec), percdamp=percdamp,
                             scale_dtype=scale_dtype, name=name)
    return PrunedQuantized(qw, keep, rtn if baseline else None)


def _prune_then_rtn(method: Method, weight: torch.Tensor, stats: ActivationStats | None, spec: SparsitySpec,
                    qspec: QuantSpec, scale_dtype: torch.dtype, name: str | None) -> QuantizedWeight:
    pruned, keep = method.prune_weight(weight, stats, spec, name=name)
    return quantize_rtn(pruned, qspec, mask=keep, scale_dtype=scale_dtype, name=name)


__all__ = ["SOLVERS", "PrunedQuantized", "gptq_blocksize", "is_joint_solve", "prune_and_quantize"]
