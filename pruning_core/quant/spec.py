"""What a weight-only quantization asks for: bits, group size, symmetry (validated once).

Stage: quantization (foundation part: torch-free config, imported by ``solvers.gptq``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pruning_core.errors import ConfigError, ShapeMismatch

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """Integer weight-only quantization of ``[out, in]`` weights (W4A16 / W8A16).

    Each row of a weight is split into groups of ``group_size`` consecutive inputs (``-1``: the
    whole row, one scale per output channel); each group gets a scale ``s`` and an integer zero
    point ``z`` and stores codes ``q`` with ``w ≈ s · (q - z)``.

    Attributes:
        bits: 4 or 8 (codes ``q`` in ``[-2^(bits-1), 2^(bits-1) - 1]``, compressed-tensors' signed
            convention).
        group_size: inputs per group, > 0, or -1 for one group per output channel.
        symmetric: True: ``z = 0`` and ``s = 2·max|w| / (2^bits - 1)``, the grid
            ``{-2^(bits-1)·s, ..., (2^(bits-1) - 1)·s}`` (compressed-tensors' and GPTQ's symmetric
            scale); False: min-max, ``s = (max - min) / (2^bits - 1)`` with an integer zero point.
            Either way the range is widened to contain 0 and 0 is a grid point.

    Raises:
        ConfigError: a field out of range (names the field and the value).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ConfigError("bits", f"must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs > 0 or gs == -1):
            raise ConfigError("group_size", f"must be a positive integer or -1 (per output channel), got {gs!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError("symmetric", f"must be true or false, got {self.symmetric!r}")

    # ------------------------------------------------------------------ integer grid
    @property
    def maxq(self) -> int:
        """Largest unsigned code ``2^bits - 1`` (the solver works on unsigned codes ``0..maxq``)."""
        return (1 << self.bits) - 1

    @property
    def offset(self) -> int:
        """``2^(bits-1)``: unsigned code - offset = signed (stored) code."""
        return 1 << (self.bits - 1)

    @property
    def per_channel(self) -> bool:
        return self.group_size == -1

    def group_width(self, in_features: int) -> int:
        """Inputs per group for a layer with ``in_features`` inputs."""
        return in_features if self.per_channel else self.group_size

    def num_groups(self, in_features: int, *, name: str | None = None) -> int:
        """Groups per row; ShapeMismatch unless ``in_features`` is a multiple of ``group_size``."""
        if self.per_channel:
            return 1
        if in_features % self.group_size:
            raise ShapeMismatch(
                f"in_features divisible by group_size={self.group_size}", [in_features], name=name,
                reason=f"{in_features} inputs do not split into groups of {self.group_size}")
        return in_features // self.group_size

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError (no silent typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError("quantization", f"unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**dict(data))

    def __str__(self) -> str:
        group = "per-channel" if self.per_channel else f"g{self.group_size}"
        return f"W{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


__all__ = ["SUPPORTED_BITS", "QuantSpec"]
