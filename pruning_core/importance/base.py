"""The Importance protocol and the score records it returns.

Stage: scores. An importance method maps a layer (and, for activation-aware methods, the
calibration context) to one non-negative score per weight: higher means more important, i.e.
kept longer. Scores are float32 (``SCORE_DTYPE``) and have the weight's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import CalibrationRequired, ConfigError, NoParameters
from pruning_core.validate import check_finite, check_rank

SCORE_DTYPE = torch.float32


@dataclass(frozen=True)
class ImportanceStats:
    """Summary of a score tensor: min, max, mean and population std (divide by n), in float64.

    An empty tensor gives all zeros. :meth:`sparsity_at` needs the values; the ones the stats
    were computed from are kept (not compared, not printed).
    """

    min: float = 0.0
    max: float = 0.0
    mean: float = 0.0
    std: float = 0.0
    _values: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> ImportanceStats:
        if values.numel() == 0:
            return cls(_values=values)
        v = values.detach().to(torch.float64)
        return cls(float(v.min()), float(v.max()), float(v.mean()), float(v.std(correction=0)), values)

    def sparsity_at(self, threshold: float, values: torch.Tensor | None = None) -> float:
        """Fraction of the scores strictly below ``threshold`` (0.0 for no scores)."""
        v = values if values is not None else self._values
        if v is None or v.numel() == 0:
            return 0.0
        return float((v < threshold).sum()) / v.numel()


@dataclass(frozen=True)
class ImportanceScores:
    """Scores shaped like the weight, their summary statistics and the method that produced them."""

    values: torch.Tensor
    method: str
    stats: ImportanceStats = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.stats is None:
            object.__setattr__(self, "stats", ImportanceStats.from_tensor(self.values))

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __len__(self) -> int:
        return self.values.numel()

    def is_empty(self) -> bool:
        return self.values.numel() == 0

    def sparsity_at(self, threshold: float) -> float:
        """Fraction of the scores strictly below ``threshold``."""
        return self.stats.sparsity_at(threshold, self.values)


@runtime_checkable
class Importance(Protocol):
    """``compute(module, context=None, *, layer_name=None) -> ImportanceScores``."""

    @property
    def name(self) -> str: ...

    @property
    def requires_calibration(self) -> bool: ...

    def compute(
        self, module: nn.Module, context: CalibrationContext | None = None, *, layer_name: str | None = None
    ) -> ImportanceScores: ...


def module_weight(module: nn.Module | torch.Tensor, layer_name: str | None = None) -> torch.Tensor:
    """The weight to score: ``module.weight`` if it has one, else its first parameter (as the seed).

    A bare tensor is accepted as the weight itself.

    Raises:
        NoParameters: the module has no parameters.
    """
    if isinstance(module, torch.Tensor):
        return module.detach()
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.detach()
    first = next(module.parameters(), None)
    if first is None:
        raise NoParameters(layer_name or type(module).__name__)
    return first.detach()


def require_layer_stats(
    method: str, context: CalibrationContext | None, layer_name: str | None
) -> ActivationStats:
    """The layer's activation statistics, with the protocol's errors for what is missing.

    Raises:
        CalibrationRequired: no context, or statistics with zero tokens.
        ConfigError: a context but no layer name to look the statistics up by.
        MissingActivationStats: the context has no statistics for the layer.
    """
    if context is None:
        raise CalibrationRequired(method, layer=layer_name)
    if layer_name is None:
        raise ConfigError("layer_name", f"{method} needs the layer's name to find its statistics in the "
                          f"calibration context (it holds {len(context.layer_names())} layers); pass "
                          f"layer_name= or construct the importance with the name")
    stats = context.require_stats(layer_name)
    if stats.count == 0:
        raise CalibrationRequired(method, layer=layer_name)
    return stats


def check_weight_2d(weight: torch.Tensor, method: str, layer_name: str | None) -> None:
    """ShapeMismatch unless 2-D; NumericalInstability on NaN/Inf (first bad index)."""
    check_rank(weight, 2, name=layer_name, what="weight")
    check_finite(weight, method=method, what="weight", layer=layer_name)


__all__ = [
    "SCORE_DTYPE",
    "Importance",
    "ImportanceScores",
    "ImportanceStats",
    "check_weight_2d",
    "module_weight",
    "require_layer_stats",
]
