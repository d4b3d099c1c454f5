"""Pruners: importance scores -> a validated mask -> pruned weights, for one layer at a time.

Stage: masks/apply. The :class:`Pruner` protocol keeps the seed's surface (``generate_mask``,
``apply_mask``, ``importance``, ``name``) and adds ``prune_layer``, which does the whole step
for one module and is what :func:`~pruning_core.pruning.prune_module` calls:

- :class:`ImportancePruner` (and its :class:`MagnitudePruner` / :class:`WandaPruner`
  specialisations): score the weight, select a mask, AND it with the earlier mask, zero the
  pruned weights. Kept weights are unchanged.
- :class:`SparseGPTPruner`: :func:`~pruning_core.solvers.sparsegpt_prune` selects the mask *and
  updates the kept weights* to reconstruct the layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import CalibrationRequired, ConfigError, NoParameters
from pruning_core.importance import (
    Importance,
    ImportanceScores,
    MagnitudeImportance,
    NormType,
    SparseGPTImportance,
    WandaImportance,
)
from pruning_core.masks import (
    NM,
    Block,
    Column,
    MaskScope,
    Row,
    SparsityMask,
    SparsityPattern,
    Unstructured,
    generate_block_mask,
    generate_column_mask,
    generate_mask,
    generate_row_mask,
)
from pruning_core.pruning.result import PruningResult
from pruning_core.solvers import sparsegpt_prune
from pruning_core.validate import check_finite


@runtime_checkable
class Pruner(Protocol):
    """Selects and applies masks for one layer at a time."""

    @property
    def name(self) -> str: ...

    @property
    def importance(self) -> Importance: ...

    @property
    def requires_hessian(self) -> bool: ...

    @property
    def default_scope(self) -> MaskScope: ...

    def generate_mask(self, scores: ImportanceScores | torch.Tensor, sparsity: float | None,
                      pattern: SparsityPattern, *, scope: MaskScope | None = None,
                      name: str | None = None) -> SparsityMask: ...

    def apply_mask(self, module: nn.Module, mask: SparsityMask, *, name: str | None = None) -> PruningResult: ...

    def prune_layer(self, module: nn.Module, sparsity: float | None, pattern: SparsityPattern,
                    context: CalibrationContext | None = None, *, name: str | None = None,
                    scope: MaskScope | None = None, mask: SparsityMask | None = None) -> SparsityMask: ...


def prunable_weight(module: nn.Module, name: str | None) -> torch.Tensor:
    """``module.weight`` (the seed pruned the first parameter); NoParameters if there is none."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    first = next(module.parameters(), None)
    if first is None:
        raise NoParameters(name or type(module).__name__)
    return first


def existing_mask(weight: torch.Tensor, mask: SparsityMask | None, name: str | None) -> SparsityMask:
    """The mask a new one is ANDed with: ``mask`` if given, else the weight's non-zeros."""
    if mask is not None:
        return mask
    return SparsityMask(weight.detach() != 0, name=name)


def select_mask(scores: torch.Tensor, sparsity: float | None, pattern: SparsityPattern,
                scope: MaskScope, name: str | None, reduce: str = "sum") -> SparsityMask:
    """Dispatch to the mask generators; structured groups combine scores with ``reduce``."""
    if isinstance(pattern, Row | Column | Block) and scope is MaskScope.LAYER and sparsity is not None:
        if isinstance(pattern, Row):
            return generate_row_mask(scores, sparsity, name=name, reduce=reduce)
        if isinstance(pattern, Column):
            return generate_column_mask(scores, sparsity, name=name, reduce=reduce)
        return generate_block_mask(scores, pattern.height, pattern.width, sparsity, name=name, reduce=reduce)
    return generate_mask(scores, pattern, sparsity, scope=scope, name=name)


@dataclass(frozen=True)
class ImportancePruner:
    """Prune by any :class:`Importance`: mask the lowest scores, leave kept weights unchanged.

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

    def _reduce(self) -> str:
        norm = getattr(self.importance, "norm", None)
        return norm.group_reduction if isinstance(norm, NormType) else "sum"

    def generate_mask(self, scores: ImportanceScores | torch.Tensor, sparsity: float | None,
                      pattern: SparsityPattern, *, scope: MaskScope | None = None,
                      name: str | None = None) -> SparsityMask:
        """A validated mask from ``scores`` (N:M: ``sparsity`` may be None or ``1 - n/m``)."""
        values = scores.values if isinstance(scores, ImportanceScores) else scores
        return select_mask(values, sparsity, pattern, scope or self.scope, name, self._reduce())

    def apply_mask(self, module: nn.Module, mask: SparsityMask, *, name: str | None = None) -> PruningResult:
        """Zero the weights ``mask`` prunes, in place; the layer's :class:`PruningResult`."""
        weight = prunable_weight(module, name)
        mask.apply_(weight)
        return PruningResult.for_layer(name or "", weight, mask)

    def prune_layer(self, module: nn.Module, sparsity: float | None, pattern: SparsityPattern,
                    context: CalibrationContext | None = None, *, name: str | None = None,
                    scope: MaskScope | None = None, mask: SparsityMask | None = None) -> SparsityMask:
        """Score, select, AND with the earlier mask (or the weight's zeros) and apply, in place."""
        weight = prunable_weight(module, name)
        scores = self.importance.compute(module, context, layer_name=name)
        new = self.generate_mask(scores, sparsity, pattern, scope=scope, name=name)
        final = new & existing_mask(weight, mask, name)
        final.apply_(weight)
        return final


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


@dataclass(frozen=True)
class WandaPruner(ImportancePruner):
    """Wanda (Sun et al. 2023): |W|·‖X_j‖₂, compared per output row by default, as in the paper."""

    importance: Importance = field(default_factory=WandaImportance)
    scope: MaskScope = MaskScope.ROW

    @property
    def name(self) -> str:
        return "wanda_pruner"

    def generate_mask(self, scores: ImportanceScores | torch.Tensor, sparsity: float | None,
                      pattern: SparsityPattern, *, scope: MaskScope | None = None,
                      name: str | None = None) -> SparsityMask:
        """As :meth:`ImportancePruner.generate_mask`; ROW scope applies to unstructured only."""
        chosen = scope or self.scope
        if chosen is MaskScope.ROW and not _is_unstructured(pattern):
            chosen = MaskScope.LAYER  # the default ROW scope is meaningless for structured patterns
        return super().generate_mask(scores, sparsity, pattern, scope=chosen, name=name)


def _is_unstructured(pattern: SparsityPattern) -> bool:
    return not isinstance(pattern, NM | Block | Row | Column)


@dataclass(frozen=True)
class SparseGPTPruner:
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
    def default_scope(self) -> MaskScope:
        return MaskScope.LAYER

    def generate_mask(self, scores: ImportanceScores | torch.Tensor, sparsity: float | None,
                      pattern: SparsityPattern, *, scope: MaskScope | None = None,
                      name: str | None = None) -> SparsityMask:
        """A mask from OBS saliency scores alone (no weight update; see :meth:`prune_layer`)."""
        values = scores.values if isinstance(scores, ImportanceScores) else scores
        return select_mask(values, sparsity, pattern, scope or MaskScope.LAYER, name)

    def apply_mask(self, module: nn.Module, mask: SparsityMask, *, name: str | None = None) -> PruningResult:
        """Zero the pruned weights (no reconstruction: use :meth:`prune_layer` for that)."""
        weight = prunable_weight(module, name)
        mask.apply_(weight)
        return PruningResult.for_layer(name or "", weight, mask)

    def prune_layer(self, module: nn.Module, sparsity: float | None, pattern: SparsityPattern,
                    context: CalibrationContext | None = None, *, name: str | None = None,
                    scope: MaskScope | None = None, mask: SparsityMask | None = None) -> SparsityMask:
        """Run :func:`sparsegpt_prune` on the module's weight and write the result in place."""
        if scope not in (None, MaskScope.LAYER):
            raise ConfigError("scope", f"SparseGPT selects per column block; scope {scope.value} is not supported")
        if context is None or name is None:
            raise CalibrationRequired("sparsegpt", layer=name)
        hessian = context.require_stats(name).xtx
        if hessian is None:
            raise CalibrationRequired("sparsegpt (statistics collected without hessian=True)", layer=name)
        weight = prunable_weight(module, name)
        if isinstance(pattern, NM) and sparsity is None:
            sparsity = 1 - pattern.n / pattern.m
        if sparsity is None:
            raise ConfigError("sparsity", f"a sparsity is required for {pattern}")
        prior = existing_mask(weight, mask, name)
        new_weight, keep = sparsegpt_prune(weight.detach(), hessian, sparsity, pattern=pattern,
                                           blocksize=self.blocksize, percdamp=self.percdamp, name=name,
                                           mask=prior.tensor, dtype=self.dtype)
        final = SparsityMask(keep, pattern if isinstance(pattern, NM) else Unstructured(), name=name)
        with torch.no_grad():
            weight.copy_(new_weight)
        check_finite(weight, method="sparsegpt", what="pruned weight", layer=name)
        return final


class _WeightHolder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)


def prune_weight(
    pruner: Pruner,
    weight: torch.Tensor,
    sparsity: float | None,
    pattern: SparsityPattern,
    stats: ActivationStats | CalibrationContext | None = None,
    *,
    name: str = "layer",
    scope: MaskScope | None = None,
    mask: SparsityMask | None = None,
) -> tuple[torch.Tensor, SparsityMask]:
    """Prune one weight tensor out of place (tensor in, tensor out: for per-layer flow tasks).

    Args:
        pruner: any :class:`Pruner`.
        weight: ``[out, in]`` weight (not modified).
        sparsity, pattern, scope, mask: as :meth:`Pruner.prune_layer`.
        stats: the layer's :class:`ActivationStats` (e.g. from ``io.stats.load_layer_stats``), or
            a context that holds them under ``name``.
        name: the layer name (in errors, and the key looked up in a context).

    Returns:
        ``(pruned weight, keep mask)``.
    """
    if isinstance(stats, ActivationStats):
        context: CalibrationContext | None = CalibrationContext()
        context.add_layer_stats(name, stats)
    else:
        context = stats
    holder = _WeightHolder(weight)
    final = pruner.prune_layer(holder, sparsity, pattern, context, name=name, scope=scope, mask=mask)
    return holder.weight.detach(), final


__all__ = [
    "ImportancePruner",
    "MagnitudePruner",
    "Pruner",
    "SparseGPTPruner",
    "WandaPruner",
    "prune_weight",
    "select_mask",
]
