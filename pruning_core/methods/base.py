"""The one-shot method contract: ``score`` and ``prune_weight`` on tensors.

Stage: methods. A method is a small frozen object (its options are its fields) that satisfies
the :class:`Method` protocol. Everything works on one weight in the math orientation
``[out, in]`` (output = ``x @ weightᵀ``), any float dtype, any device:

- ``score(weight, stats)`` -> float32 ``[out, in]`` importance, higher = keep longer;
- ``prune_weight(weight, stats, spec, mask=...)`` -> ``(new weight, bool keep mask)``; the new
  weight has the input's dtype and device and is exactly 0 where the mask is False.

:class:`BaseMethod` implements ``prune_weight`` for every method that only masks (kept weights
unchanged): score -> select the mask the :class:`~pruning_core.masks.SparsitySpec` asks for ->
AND it with the earlier mask -> zero the pruned weights. A new method subclasses it, sets its
class attributes and writes ``score``; :mod:`pruning_core.methods.registry` lists it by name.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import CalibrationRequired, ConfigError, ShapeMismatch
from pruning_core.masks import MaskScope, SparsityPattern, SparsitySpec, select_mask


@runtime_checkable
class Method(Protocol):
    """A one-shot pruning method on tensors (see the module docstring).

    Attributes:
        name: the registry name (``"wanda"``).
        needs_stats: ``score`` reads the layer's :class:`ActivationStats` (``sum_sq``, ...).
        needs_hessian: the statistics must carry ``XᵀX`` (``collect_activation_stats(..., hessian=True)``).
        default_scope: the comparison scope of unstructured masks when none is asked for (Wanda:
            ROW, as in the paper; others LAYER).
        scopes: the scopes the method supports (SparseGPT selects inside column blocks: LAYER only).
        structured_patterns: the method supports block/row/column patterns besides unstructured
            and N:M (SparseGPT's column solve does not).
    """

    name: ClassVar[str]
    needs_stats: ClassVar[bool]
    needs_hessian: ClassVar[bool]
    default_scope: ClassVar[MaskScope]
    scopes: ClassVar[frozenset[MaskScope]]
    structured_patterns: ClassVar[bool]

    def score(
        self, weight: torch.Tensor, stats: ActivationStats | None = None, *, name: str | None = None
    ) -> torch.Tensor: ...

    def prune_weight(
        self,
        weight: torch.Tensor,
        stats: ActivationStats | None,
        spec: SparsitySpec,
        *,
        mask: torch.Tensor | None = None,
        name: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class BaseMethod:
    """Base of the methods: class attributes with defaults, spec checks, masking ``prune_weight``.

    Subclasses are frozen dataclasses whose fields are the method's options; they set ``name``
    (and the flags that differ) and implement :meth:`score`.
    """

    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False
    default_scope: ClassVar[MaskScope] = MaskScope.LAYER
    scopes: ClassVar[frozenset[MaskScope]] = frozenset(MaskScope)
    structured_patterns: ClassVar[bool] = True

    @property
    def group_reduction(self) -> str:
        """How Row/Column/Block patterns combine a group's scores (``"sum"``, ``"max"``, ``"l2"``)."""
        return "sum"

    def spec(self, sparsity: float | None = None, pattern: SparsityPattern | str | None = "unstructured",
             scope: MaskScope | str | None = None) -> SparsitySpec:
        """:meth:`SparsitySpec.parse` with this method's ``default_scope`` (e.g. ROW for Wanda)."""
        return SparsitySpec.parse(sparsity, pattern, scope, default_scope=self.default_scope)

    def score(
        self, weight: torch.Tensor, stats: ActivationStats | None = None, *, name: str | None = None
    ) -> torch.Tensor:
        """Float32 importance scores shaped like ``weight`` ``[out, in]``; higher = keep longer."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def prune_weight(
        self,
        weight: torch.Tensor,
        stats: ActivationStats | None,
        spec: SparsitySpec,
        *,
        mask: torch.Tensor | None = None,
        name: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score, select per ``spec``, AND with the earlier mask, zero the pruned weights.

        Args:
            weight: ``[out, in]``, any float dtype and device (not modified).
            stats: the layer's statistics (ignored unless ``needs_stats``).
            spec: what to prune.
            mask: earlier bool keep mask ``[out, in]``; default: the weight's non-zeros (a weight
                that is exactly 0 counts as pruned, so iterative pruning stays monotone).
            name: layer name for error messages.

        Returns:
            ``(new weight, keep)``: ``weight``'s dtype and device, kept weights bit-identical,
            pruned ones 0; ``keep`` a bool tensor on the same device.
        """
        check_scope(self, spec, name=name)
        scores = self.score(weight, stats, name=name)
        return prune_by_scores(weight, scores, spec, mask=mask, name=name, reduce=self.group_reduction)


def check_scope(method: Method, spec: SparsitySpec, *, name: str | None = None) -> None:
    """Raise :class:`ConfigError` if ``method`` does not support ``spec``'s scope."""
    if spec.scope not in method.scopes:
        allowed = ", ".join(sorted(s.value for s in method.scopes))
        where = f" (layer '{name}')" if name else ""
        raise ConfigError("scope", f"method {method.name} supports scope {allowed}, not {spec.scope.value}{where}")


def prune_by_scores(
    weight: torch.Tensor,
    scores: torch.Tensor,
    spec: SparsitySpec,
    *,
    mask: torch.Tensor | None = None,
    name: str | None = None,
    reduce: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masking step of :meth:`BaseMethod.prune_weight` for precomputed ``scores``."""
    keep = select_mask(scores, spec, name=name, reduce=reduce).tensor.to(weight.device)
    keep = keep & earlier_mask(weight, mask, name=name)
    return zero_pruned(weight, keep), keep


def earlier_mask(weight: torch.Tensor, mask: torch.Tensor | None, *, name: str | None = None) -> torch.Tensor:
    """The bool keep mask a new one is ANDed with: ``mask`` (checked), or ``weight != 0``."""
    if mask is None:
        return weight.detach() != 0
    if tuple(mask.shape) != tuple(weight.shape):
        raise ShapeMismatch(list(weight.shape), list(mask.shape), name=name, reason="earlier mask")
    return mask.to(device=weight.device, dtype=torch.bool)


def zero_pruned(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` (same dtype/device) with the positions ``keep`` drops set to exactly 0."""
    return weight.detach().masked_fill(~keep, 0)


def require_stats(method: str, stats: ActivationStats | None, name: str | None) -> ActivationStats:
    """``stats`` if it holds at least one token; else :class:`CalibrationRequired` naming the layer."""
    if stats is None or stats.count == 0:
        raise CalibrationRequired(method, layer=name)
    return stats


def require_hessian(method: str, stats: ActivationStats | None, name: str | None) -> ActivationStats:
    """``stats`` if they carry ``XᵀX`` and at least one token; else CalibrationRequired naming the layer."""
    if stats is not None and stats.xtx is None:
        raise CalibrationRequired(f"{method} (statistics collected without hessian=True)", layer=name)
    return require_stats(method, stats, name)


__all__ = [
    "BaseMethod",
    "Method",
    "check_scope",
    "earlier_mask",
    "prune_by_scores",
    "require_hessian",
    "require_stats",
    "zero_pruned",
]
