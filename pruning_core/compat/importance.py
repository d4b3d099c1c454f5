"""The seed's ``Importance`` interface: ``compute(module, context) -> ImportanceScores``.

Stage: compat (see :mod:`pruning_core.compat` for the seed -> Python map). Each class scores a
*module's* weight, looking its statistics up by layer name in a :class:`CalibrationContext`, and
wraps the scores in a record with summary statistics. The scores themselves come from the
tensor-level methods (:mod:`pruning_core.methods`) and score functions
(:mod:`pruning_core.importance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import CalibrationRequired, ConfigError, NoParameters
from pruning_core.importance import NormType, TaylorReduction, taylor_scores
from pruning_core.masks.pattern import SparsityPattern
from pruning_core.methods import Magnitude, SparseGPT, Wanda


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
    """The weight to score: ``module.weight`` if it has one, else its first parameter.

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


@dataclass(frozen=True)
class MagnitudeImportance:
    """Magnitude importance; needs no calibration. Constructors :meth:`l1`, :meth:`l2`, :meth:`linf`."""

    norm: NormType = NormType.L2

    @classmethod
    def l1(cls) -> MagnitudeImportance:
        return cls(NormType.L1)

    @classmethod
    def l2(cls) -> MagnitudeImportance:
        return cls(NormType.L2)

    @classmethod
    def linf(cls) -> MagnitudeImportance:
        return cls(NormType.LINF)

    @classmethod
    def with_norm(cls, norm: NormType) -> MagnitudeImportance:
        return cls(norm)

    @property
    def name(self) -> str:
        return f"magnitude_{self.norm.value}"

    @property
    def requires_calibration(self) -> bool:
        return False

    def compute(
        self, module: nn.Module | torch.Tensor, context: CalibrationContext | None = None, *,
        layer_name: str | None = None,
    ) -> ImportanceScores:
        """Scores of ``module``'s weight (the context is ignored)."""
        weight = module_weight(module, layer_name)
        return ImportanceScores(Magnitude(self.norm).score(weight, name=layer_name), self.name)


@dataclass(frozen=True)
class WandaImportance:
    """Wanda importance; needs a calibration context with the layer's statistics.

    Args:
        layer_name: default layer to look up in the context (``compute(..., layer_name=)`` overrides).
        pattern: informational only (the mask's pattern and scope decide the comparison groups).
    """

    layer_name: str | None = None
    pattern: SparsityPattern | None = None

    @property
    def name(self) -> str:
        return "wanda"

    @property
    def requires_calibration(self) -> bool:
        return True

    def with_pattern(self, pattern: SparsityPattern) -> WandaImportance:
        return WandaImportance(self.layer_name, pattern)

    def compute(
        self, module: nn.Module | torch.Tensor, context: CalibrationContext | None = None, *,
        layer_name: str | None = None,
    ) -> ImportanceScores:
        """Scores of ``module``'s weight from the layer's ``sum_sq`` in ``context``.

        Raises:
            CalibrationRequired: no context (or zero tokens); MissingActivationStats: layer absent;
            ShapeMismatch / NumericalInstability: as :func:`~pruning_core.importance.wanda_scores`.
        """
        name = layer_name or self.layer_name
        stats = require_layer_stats(self.name, context, name)
        weight = module_weight(module, name)
        return ImportanceScores(Wanda().score(weight, stats, name=name), self.name)


@dataclass(frozen=True)
class SparseGPTImportance:
    """OBS saliency from the context's Hessian of the layer (``collect_activation_stats(..., hessian=True)``).

    Args:
        layer_name: default layer to look up (``compute(..., layer_name=)`` overrides).
        percdamp: relative dampening (the reference's default 0.01).
        block_size: the SparseGPT block size (``SparseGPTPruner`` uses it; scores do not).
    """

    layer_name: str | None = None
    percdamp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        SparseGPT(blocksize=self.block_size, percdamp=self.percdamp)  # ConfigError naming the field

    @property
    def name(self) -> str:
        return "sparsegpt"

    @property
    def requires_calibration(self) -> bool:
        return True

    def compute(
        self, module: nn.Module | torch.Tensor, context: CalibrationContext | None = None, *,
        layer_name: str | None = None,
    ) -> ImportanceScores:
        """Saliency of ``module``'s weight; CalibrationRequired if the stats carry no Hessian."""
        name = layer_name or self.layer_name
        stats = require_layer_stats(self.name, context, name)
        weight = module_weight(module, name)
        scores = SparseGPT(blocksize=self.block_size, percdamp=self.percdamp).score(weight, stats, name=name)
        return ImportanceScores(scores, "sparsegpt_saliency")


@dataclass(frozen=True)
class TaylorImportance:
    """First-order Taylor importance from the context's accumulated gradients
    (:func:`~pruning_core.importance.taylor_scores`)."""

    layer_name: str | None = None
    reduction: TaylorReduction = "mean_gradient"

    def __post_init__(self) -> None:
        if self.reduction not in ("mean_gradient", "mean_abs"):
            raise ConfigError("reduction", f"must be 'mean_gradient' or 'mean_abs', got {self.reduction!r}")

    @property
    def name(self) -> str:
        return "taylor"

    @property
    def requires_calibration(self) -> bool:
        return True

    def compute(
        self, module: nn.Module | torch.Tensor, context: CalibrationContext | None = None, *,
        layer_name: str | None = None,
    ) -> ImportanceScores:
        """Scores of ``module``'s weight; MissingActivationStats if the layer has no gradients."""
        name = layer_name or self.layer_name
        if context is None or name is None:
            raise CalibrationRequired(self.name, layer=name)
        grads = context.require_gradients(name)
        if grads.num_batches == 0:
            raise CalibrationRequired(self.name, layer=name)
        weight = module_weight(module, name)
        if self.reduction == "mean_gradient":
            values = taylor_scores(weight, grads.mean_gradient, layer_name=name)
        else:
            values = taylor_scores(weight.abs(), grads.mean_abs_gradient, layer_name=name)
        return ImportanceScores(values, f"taylor_{self.reduction}")


__all__ = [
    "Importance",
    "ImportanceScores",
    "ImportanceStats",
    "MagnitudeImportance",
    "SparseGPTImportance",
    "TaylorImportance",
    "WandaImportance",
    "module_weight",
    "require_layer_stats",
]
