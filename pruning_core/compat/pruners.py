"""The seed's ``Pruner`` interface (``generate_mask``, ``apply_mask``; ``prune_layer`` on a module),
implemented on the tensor-level methods.

Stage: compat (see :mod:`pruning_core.compat` for the seed -> Python map). A pruner works on a
*module* and a :class:`CalibrationContext`: ``prune_layer`` looks up the layer's statistics by
name, builds a :class:`SparsitySpec` from the loose ``sparsity, pattern, scope`` values, calls
its method's ``prune_weight`` on ``module.weight`` and writes the result back in place.
``method`` gives the registry method a pruner stands for (``prune_module`` accepts either).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats
from pruning_core.compat.importance import (
    Importance,
    ImportanceScores,
    MagnitudeImportance,
    SparseGPTImportance,
    WandaImportance,
)
from pruning_core.errors import CalibrationRequired, ConfigError, NoParameters
from pruning_core.importance import NormType
from pruning_core.masks import (
    MaskScope,
    SparsityMask,
    SparsityPattern,
    SparsitySpec,
    Unstructured,
    generate_mask,
)
from pruning_core.methods import BaseMethod, Magnitude, Method, SparseGPT, Wanda, prune_by_scores
from pruning_core.pruning.result import PruningResult


@runtime_checkable
class Pruner(Protocol):
    """Selects and applies masks for one layer (module) at a time."""

    @property
    def name(self) -> str: ...

    @property
    def importance(self) -> Importance: ...

    @property
    def requires_hessian(self) -> bool: ...

    @property
    def default_scope(self) -> MaskScope: ...

    @property
    def method(self) -> Method: ...

    def generate_mask(self, scores: ImportanceScores | torch.Tensor, sparsity: float | None,
                      pattern: SparsityPattern, *, scope: MaskScope | None = None,
                      name: str | None = None) -> SparsityMask: ...

    def apply_mask(self, module: nn.Module, mask: SparsityMask, *, name: str | None = None) -> PruningResult: ...

    def prune_layer(self, module: nn.Module, sparsity: float | None, pattern: SparsityPattern,
                    context: CalibrationContext | None = None, *, name: str | None = None,
                    scope: MaskScope | None = None, mask: SparsityMask | None = None) -> SparsityMask: ...


def prunable_weight(module: nn.Module, name: str | None) -> torch.Tensor:
    """``module.weight``, else its first parameter; NoParameters if there is none."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    first = next(module.parameters(), None)
    if first is None:
        raise NoParameters(name or type(module).__name__)
    return first


def context_stats(method: Method, context: CalibrationContext | None, name: str | None) -> ActivationStats | None:
    """The layer's statistics for ``method`` from ``context``.

    Raises (only when the method needs statistics): CalibrationRequired (no context),
    ConfigError (no layer name), MissingActivationStats (the layer is not in the context).
    """
    if not method.needs_stats:
        return context.get_stats(name) if context is not None and name is not None else None
    if context is None:
        raise CalibrationRequired(method.name, layer=name)
    if name is None:
        raise ConfigError("layer_name", f"{method.name} needs the layer's name to find its statistics in the "
                                        f"calibration context; pass name=")
    return context.require_stats(name)


class _PrunerBase:
    """What every seed pruner shares: ``apply_mask`` and the ``prune_layer`` skeleton."""

    @property
    def default_scope(self) -> MaskScope:
        return MaskScope.LAYER

    @property
    def group_reduction(self) -> str:
        return "sum"

    def generate_mask(self, scores: ImportanceScores | torch.Tensor, sparsity: float | None,
                      pattern: SparsityPattern | str, *, scope: MaskScope | None = None,
                      name: str | None = None) -> SparsityMask:
        """A validated mask from ``scores`` alone (N:M: ``sparsity`` may be None or ``1 - n/m``)."""
        values = scores.values if isinstance(scores, ImportanceScores) else scores
        unstructured = isinstance(pattern, Unstructured) or pattern == "unstructured"
        chosen = scope or (self.default_scope if unstructured else MaskScope.LAYER)
        return generate_mask(values, pattern, sparsity, scope=chosen, name=name, reduce=self.group_reduction)

    def apply_mask(self, module: nn.Module, mask: SparsityMask, *, name: str | None = None) -> PruningResult:
        """Zero the weights ``mask`` prunes, in place; the layer's :class:`PruningResult`."""
        weight = prunable_weight(module, name)
        mask.apply_(weight)
        return PruningResult.for_layer(name or "", weight, mask)

    def prune_layer(self, module: nn.Module, sparsity: float | None, pattern: SparsityPattern | str | None,
                    context: CalibrationContext | None = None, *, name: str | None = None,
                    scope: MaskScope | str | None = None, mask: SparsityMask | None = None) -> SparsityMask:
        """Prune ``module``'s weight in place (ANDed with ``mask`` or the weight's zeros); the final mask."""
        spec = SparsitySpec.parse(sparsity, pattern, scope, default_scope=self.default_scope)
        weight = prunable_weight(module, name)
        new, keep = self._prune(weight, context, spec, None if mask is None else mask.tensor, name)
        with torch.no_grad():
            weight.copy_(new)
        return SparsityMask.from_keep(keep, spec.pattern, name=name)

    def _prune(self, weight: torch.Tensor, context: CalibrationContext | None, spec: SparsitySpec,
               mask: torch.Tensor | None, name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.method  # type: ignore[attr-defined]
        return method.prune_weight(weight, context_stats(method, context, name), spec, mask=mask, name=name)


@dataclass(frozen=True)
class ImportancePruner(_PrunerBase):
    """Prune by any seed :class:`Importance`: mask the lowest scores, leave kept weights unchanged.

    Args:
        importance: the scoring method (e.g. ``TaylorImportance()``).
        scope: default comparison scope for unstructured masks.
    """

    importance: Importance
    scope: MaskScope = MaskScope.LAYER

    @property
    def name(self) -> str:
        return f"{self.importance.name}_pruner"

    @property
    def requires_hessian(self) -> bool:
        return False

    @property
    def default_scope(self) -> MaskScope:
        return self.scope

    @property
    def group_reduction(self) -> str:
        norm = getattr(self.importance, "norm", None)
        return norm.group_reduction if isinstance(norm, NormType) else "sum"

    @property
    def method(self) -> Method:
        """The importance as a registry-style method (its statistics must be activation statistics)."""
        return _ImportanceMethod(self.importance, self.group_reduction)

    def _prune(self, weight: torch.Tensor, context: CalibrationContext | None, spec: SparsitySpec,
               mask: torch.Tensor | None, name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.method, _ImportanceMethod):  # magnitude, wanda: the registry method
            return super()._prune(weight, context, spec, mask, name)
        scores = self.importance.compute(weight, context, layer_name=name).values  # any context (Taylor)
        return prune_by_scores(weight, scores, spec, mask=mask, name=name, reduce=self.group_reduction)


class _ImportanceMethod(BaseMethod):
    """A seed :class:`Importance` seen as a :class:`Method` (statistics = the layer's ActivationStats)."""

    def __init__(self, importance: Importance, reduction: str) -> None:
        self.importance, self._reduction = importance, reduction
        self.name = importance.name  # type: ignore[misc]
        self.needs_stats = importance.requires_calibration  # type: ignore[misc]

    @property
    def group_reduction(self) -> str:
        return self._reduction

    def score(self, weight: torch.Tensor, stats: ActivationStats | None = None, *,
              name: str | None = None) -> torch.Tensor:
        context = CalibrationContext()
        if stats is not None and name is not None:
            context.add_layer_stats(name, stats)
        return self.importance.compute(weight, context, layer_name=name).values


@dataclass(frozen=True)
class MagnitudePruner(ImportancePruner):
    """Magnitude pruning (L2 by default; ``MagnitudePruner.l1()``); one threshold per layer."""

    importance: Importance = field(default_factory=MagnitudeImportance.l2)

    @classmethod
    def l1(cls) -> MagnitudePruner:
        return cls(MagnitudeImportance.l1())

    @classmethod
    def l2(cls) -> MagnitudePruner:
        return cls(MagnitudeImportance.l2())

    @property
    def name(self) -> str:
        return "magnitude_pruner"

    @property
    def method(self) -> Method:
        norm = getattr(self.importance, "norm", NormType.L2)
        return Magnitude(norm)


@dataclass(frozen=True)
class WandaPruner(ImportancePruner):
    """Wanda (Sun et al. 2023): |W|·‖X_j‖₂, compared per output row by default, as in the paper."""

    importance: Importance = field(default_factory=WandaImportance)
    scope: MaskScope = Wanda.default_scope

    @property
    def name(self) -> str:
        return "wanda_pruner"

    @property
    def method(self) -> Method:
        return Wanda()


@dataclass(frozen=True)
class SparseGPTPruner(_PrunerBase):
    """SparseGPT (Frantar & Alistarh 2023): OBS mask selection and weight reconstruction.

    Needs the layer's ``XᵀX`` in the context (``collect_activation_stats(..., hessian=True)``).
    Supports unstructured (per column block; scope LAYER only) and N:M patterns.
    """

    blocksize: int = 128
    percdamp: float = 0.01
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return "sparsegpt_pruner"

    @property
    def importance(self) -> Importance:
        return SparseGPTImportance(percdamp=self.percdamp, block_size=self.blocksize)

    @property
    def requires_hessian(self) -> bool:
        return True

    @property
    def method(self) -> Method:
        return SparseGPT(blocksize=self.blocksize, percdamp=self.percdamp, dtype=self.dtype)


__all__ = [
    "ImportancePruner",
    "MagnitudePruner",
    "Pruner",
    "SparseGPTPruner",
    "WandaPruner",
    "context_stats",
    "prunable_weight",
]
