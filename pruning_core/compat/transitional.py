"""TRANSITIONAL: the pre-contract per-tensor helpers ``prune_weight(pruner, weight, sparsity, pattern, ...)``
and ``score_weight(pruner, weight, stats)``.

Stage: compat. ``flows/oneshot_tasks.py`` still imports them from ``pruning_core.pruning``; new code
calls ``method.prune_weight(weight, stats, spec)`` / ``method.score(weight, stats)`` directly.
Delete this module once no caller is left.
"""

from __future__ import annotations

import torch

from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats
from pruning_core.compat.pruners import Pruner, context_stats
from pruning_core.masks import (
    MaskScope,
    SparsityMask,
    SparsityPattern,
    SparsitySpec,
    Unstructured,
    parse_pattern,
)


def _spec_for(pruner: Pruner, sparsity: float | None, pattern: SparsityPattern | str | None,
              scope: MaskScope | str | None) -> SparsitySpec:
    """The pre-contract rule: a scope applies to unstructured patterns only (else it is ignored)."""
    p = parse_pattern(pattern)
    chosen = scope if isinstance(p, Unstructured) else None
    return SparsitySpec.parse(sparsity, p, chosen, default_scope=pruner.default_scope)


def _layer_stats(pruner: Pruner, stats: ActivationStats | CalibrationContext | None,
                 name: str) -> ActivationStats | None:
    if isinstance(stats, CalibrationContext):
        return context_stats(pruner.method, stats, name)
    return stats


def prune_weight(
    pruner: Pruner,
    weight: torch.Tensor,
    sparsity: float | None,
    pattern: SparsityPattern | str | None,
    stats: ActivationStats | CalibrationContext | None = None,
    *,
    name: str = "layer",
    scope: MaskScope | str | None = None,
    mask: SparsityMask | None = None,
) -> tuple[torch.Tensor, SparsityMask]:
    """TRANSITIONAL pre-contract helper: ``pruner.method.prune_weight`` with loose arguments.

    Returns:
        ``(pruned weight, keep mask)``; ``weight`` is not modified.
    """
    spec = _spec_for(pruner, sparsity, pattern, scope)
    new, keep = pruner.method.prune_weight(weight, _layer_stats(pruner, stats, name), spec,
                                           mask=None if mask is None else mask.tensor, name=name)
    return new, SparsityMask.from_keep(keep, spec.pattern, name=name)


def score_weight(
    pruner: Pruner, weight: torch.Tensor, stats: ActivationStats | CalibrationContext | None = None, *,
    name: str = "layer",
) -> torch.Tensor:
    """TRANSITIONAL pre-contract helper: ``pruner.method.score`` (scores shaped like ``weight``)."""
    return pruner.method.score(weight, _layer_stats(pruner, stats, name), name=name)


__all__ = ["prune_weight", "score_weight"]
