"""The integer grid: min-max scales and zero points, rounding, and round-to-nearest (RTN).

Stage: quantization (foundation part, torch only; ``solvers.gptq`` quantizes column by column
with these functions). Follows IST-DASLab/gptq ``quant.py`` (``Quantizer.find_params`` with
``mse=False``, ``quantize``): unsigned codes ``q ∈ [0, 2^bits - 1]``, ``w ≈ s · (q - z)``, the
range ``[min(x, 0), max(x, 0)]`` (so 0 is always inside), an all-zero group gets the range
``[-1, 1]``. Differences, both deliberate:

- Symmetric: ``s = 2·max|x| / (2^bits - 1)`` and ``z = 2^(bits-1)`` for every group. The
  reference keeps ``min = 0`` for a group with no negative value, which halves its scale and clips
  the upper half of its range; here the grid is always ``{-2^(bits-1)·s, ..., (2^(bits-1)-1)·s}``,
  compressed-tensors' symmetric grid.
- Scales are rounded to the dtype the checkpoint stores (``scale_dtype``) before the zero points
  and codes are computed, so the codes are those of the stored scales.

Exact zeros: 0 is always a grid point (the zero point is an integer in ``[0, 2^bits - 1]``), and
``round(0 / s) + z = z`` exactly, so a pruned weight (0) gets code ``z`` and dequantizes to
exactly 0; nothing needs forcing after dequantization.
"""

from __future__ import annotations

import torch

from pruning_core.errors import ConfigError, ShapeMismatch
from pruning_core.quant.spec import QuantSpec
from pruning_core.quant.weight import QuantizedWeight
from pruning_core.validate import check_finite, check_rank


def grid_params(
    x: torch.Tensor, spec: QuantSpec, *, dim: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of ``x`` reduced over ``dim`` (GPTQ's ``find_params``).

    Args:
        x: float tensor; every slice along ``dim`` is one group.
        spec: bits and symmetry.
        dim: the dimension holding a group's values.
        scale_dtype: the stored dtype of the scales; the returned scales are rounded to it.

    Returns:
        ``(scale, zero)`` in ``x.dtype`` with ``dim`` removed: ``scale > 0`` representable in
        ``scale_dtype``; ``zero`` integer-valued in ``[0, 2^bits - 1]`` (``2^(bits-1)`` if symmetric).
    """
    xmin = x.amin(dim=dim).clamp(max=0)
    xmax = x.amax(dim=dim).clamp(min=0)
    if spec.symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = xmin.masked_fill(empty, -1.0)
    xmax = xmax.masked_fill(empty, 1.0)
    scale = _stored(((xmax - xmin) / spec.maxq), scale_dtype)
    if spec.symmetric:
        zero = torch.full_like(scale, float(spec.offset))
    else:
        zero = torch.round(-xmin / scale).clamp_(0, spec.maxq)
    return scale, zero


def check_scale_dtype(scale_dtype: torch.dtype) -> torch.dtype:
    """ConfigError unless ``scale_dtype`` is a floating dtype a checkpoint can store scales in."""
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point or scale_dtype.itemsize < 2:
        raise ConfigError("scale_dtype", f"must be float32, float16, bfloat16 or float64, got {scale_dtype!r}")
    return scale_dtype


def _stored(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to ``scale_dtype`` (and back), never 0: a scale that underflows becomes
    the dtype's smallest normal number."""
    stored = scale.to(scale_dtype)
    stored = stored.masked_fill(stored <= 0, torch.finfo(scale_dtype).tiny)
    return stored.to(scale.dtype)


def to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Unsigned codes ``clamp(round(x / s) + z, 0, maxq)`` as integer-valued floats (round half to even)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def from_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Dequantized values ``(q - z) · s`` (the same product compressed-tensors forms)."""
    return (q - zero) * scale


def quantize_rtn(
    weight: torch.Tensor,
    spec: QuantSpec,
    *,
    mask: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    name: str | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` (the baseline GPTQ is compared with).

    Args:
        weight: ``[out, in]`` float weight (math orientation), finite.
        spec: bits, group size, symmetry; ``in`` must be a multiple of the group size.
        mask: optional bool keep mask ``[out, in]``; pruned weights are zeroed first and
            dequantize to exactly 0 (they also take part in the group ranges as zeros).
        scale_dtype: dtype of the stored scales (default: ``weight.dtype``).
        name: layer name for error messages.

    Returns:
        The :class:`QuantizedWeight` on ``weight``'s device.

    Raises:
        ShapeMismatch: not 2-D, a mask of another shape, or ``in`` not a multiple of the group size.
        NumericalInstability: NaN/Inf in ``weight``.
    """
    check_rank(weight, 2, name=name, what="weight")
    check_finite(weight, method="quantization", what="weight", layer=name)
    scale_dtype = check_scale_dtype(scale_dtype or weight.dtype)
    rows, cols = weight.shape
    groups = spec.num_groups(cols, name=name)
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    if mask is not None:
        if mask.shape != weight.shape:
            raise ShapeMismatch(list(weight.shape), list(mask.shape), name=name, reason="keep mask")
        W = torch.where(mask.to(device=W.device, dtype=torch.bool), W, torch.zeros((), dtype=W.dtype))
    Wg = W.reshape(rows, groups, cols // groups)  # (out, G, width)
    scale, zero = grid_params(Wg, spec, dim=2, scale_dtype=scale_dtype)  # (out, G)
    q = to_grid(Wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.maxq).reshape(rows, cols)
    return QuantizedWeight(
        codes=(q - spec.offset).to(torch.int8),
        scales=scale.to(scale_dtype),
        zero_points=(zero - spec.offset).to(torch.int8),
        spec=spec,
    )


__all__ = ["check_scale_dtype", "from_grid", "grid_params", "quantize_rtn", "to_grid"]
