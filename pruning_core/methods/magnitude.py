"""Magnitude pruning (Han et al. 2015, "Learning both Weights and Connections for Efficient
Neural Networks"): keep the largest ``|w|``.

Stage: methods. Needs no calibration. ``norm`` picks the element score (``w²`` for L2, ``|w|``
for L1/L∞; the same ranking) and how Row/Column/Block groups combine it (a sum for L1/L2, the
max for L∞).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import ConfigError
from pruning_core.importance import NormType, magnitude_scores
from pruning_core.methods.base import BaseMethod


@dataclass(frozen=True)
class Magnitude(BaseMethod):
    """Options: ``norm`` = ``"l2"`` (default), ``"l1"`` or ``"linf"`` (or a :class:`NormType`)."""

    name: ClassVar[str] = "magnitude"

    norm: NormType = NormType.L2

    def __post_init__(self) -> None:
        if isinstance(self.norm, str):
            try:
                object.__setattr__(self, "norm", NormType(self.norm.lower()))
            except ValueError:
                allowed = ", ".join(n.value for n in NormType)
                raise ConfigError("norm", f"must be one of {allowed}; got {self.norm!r}") from None
        if not isinstance(self.norm, NormType):
            raise ConfigError("norm", f"must be a NormType or its name, got {self.norm!r}")

    @property
    def group_reduction(self) -> str:
        return self.norm.group_reduction

    def score(
        self, weight: torch.Tensor, stats: ActivationStats | None = None, *, name: str | None = None
    ) -> torch.Tensor:
        """``w²`` (L2) or ``|w|`` (L1, L∞), float32 ``[out, in]``; ``stats`` is ignored."""
        return magnitude_scores(weight, self.norm, layer_name=name)


__all__ = ["Magnitude"]
