"""A quantized weight: integer codes, per-group scales and zero points, and how to dequantize.

Stage: quantization (foundation part, torch only). The layout is compressed-tensors' (what its
``pack-quantized`` compressor stores and vLLM serves): signed codes, ``w = (q - z) · s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning_core.errors import ConfigError, NumericalInstability, ShapeMismatch
from pruning_core.quant.spec import QuantSpec
from pruning_core.validate import check_finite


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One ``[out, in]`` weight quantized group-wise along its rows.

    Attributes:
        codes: int8 ``[out, in]``, signed codes in ``[-2^(bits-1), 2^(bits-1) - 1]``.
        scales: ``[out, groups]`` float (the dtype the checkpoint stores, e.g. the model's), > 0.
        zero_points: int8 ``[out, groups]`` in the code range; all 0 when ``spec.symmetric``.
        spec: the :class:`QuantSpec`; ``groups = in / group_size`` (1 per channel).

    Column ``j`` belongs to group ``j // group_size``. Construction validates shapes, dtypes and
    ranges (ShapeMismatch / ConfigError / NumericalInstability).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    spec: QuantSpec

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.int8:
            raise ShapeMismatch("int8 [out, in] codes", list(self.codes.shape), reason=f"got {self.codes.dtype}")
        rows, cols = self.codes.shape
        expected = [rows, self.spec.num_groups(cols)]
        for what, t in (("scales", self.scales), ("zero_points", self.zero_points)):
            if list(t.shape) != expected:
                raise ShapeMismatch(expected, list(t.shape), reason=f"{what} of a {rows}x{cols} weight, {self.spec}")
        if self.zero_points.dtype != torch.int8 or not self.scales.is_floating_point():
            raise ConfigError("zero_points", f"need int8 zero points and float scales, got "
                                             f"{self.zero_points.dtype} / {self.scales.dtype}")
        check_finite(self.scales, method="quantization", what="scales")
        if self.scales.numel() and not bool((self.scales > 0).all()):
            raise NumericalInstability("quantization", "scales must be > 0")
        lo, hi = -self.spec.offset, self.spec.offset - 1
        for what, t in (("codes", self.codes), ("zero_points", self.zero_points)):
            if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
                raise ConfigError(what, f"values outside [{lo}, {hi}] for {self.spec.bits} bits")
        if self.spec.symmetric and bool(self.zero_points.any()):
            raise ConfigError("zero_points", "a symmetric quantization has zero points 0")

    @property
    def shape(self) -> torch.Size:
        """The dense weight's ``[out, in]``."""
        return self.codes.shape

    @property
    def group_width(self) -> int:
        return self.spec.group_width(self.codes.shape[1])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(q - z) · s`` as a dense ``[out, in]`` tensor in ``dtype`` (default: the scales' dtype).

        This is compressed-tensors' ``dequantize``, which computes in the scales' dtype: float32
        (float64) scales give the same float32 (float64) products; for bfloat16/float16 scales the
        float32 product is exact (a 9-bit integer times an 11-bit significand) and is rounded
        once, as their half-precision multiply rounds it. A reloaded checkpoint therefore holds
        the very same weights as ``dequantize(dtype=scales.dtype)``.
        """
        rows, cols = self.codes.shape
        groups = self.scales.shape[1]
        work = torch.promote_types(self.scales.dtype, torch.float32)
        q = self.codes.view(rows, groups, cols // groups).to(work)  # (out, G, width)
        z = self.zero_points.to(work).unsqueeze(-1)  # (out, G, 1)
        s = self.scales.to(work).unsqueeze(-1)
        return ((q - z) * s).reshape(rows, cols).to(dtype or self.scales.dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), self.zero_points.to(device), self.spec)

    def __repr__(self) -> str:
        return f"QuantizedWeight({list(self.shape)}, {self.spec}, scales {self.scales.dtype})"


__all__ = ["QuantizedWeight"]
