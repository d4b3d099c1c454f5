"""Mask generators: importance scores -> validated :class:`SparsityMask`.

Stage: masks. :func:`select_mask` is the entry point of the tensor-level contract: scores and a
:class:`~pruning_core.masks.spec.SparsitySpec` (already validated) in, a mask out. The
``generate_*`` functions take loose arguments and check them (sparsity in [0, 1], a well-formed
pattern, finite scores, a fitting shape). Both select with the vectorized kernels of
:mod:`pruning_core.masks.select`: exactly ``floor(L * s)`` elements (or rows, columns, blocks)
are pruned per comparison group; equal scores keep the lower index.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pruning_core.errors import InvalidPattern, InvalidSparsity
from pruning_core.masks.mask import SparsityMask
from pruning_core.masks.pattern import NM, Block, Column, MaskScope, Row, SparsityPattern, Unstructured
from pruning_core.masks.select import (
    keep_blocks,
    keep_columns,
    keep_nm,
    keep_rows,
    keep_topk,
    prepare_scores,
)
from pruning_core.masks.spec import NM_SPARSITY_TOL, SparsitySpec, parse_scope
from pruning_core.validate import check_sparsity


def select_mask(
    scores: torch.Tensor, spec: SparsitySpec, *, name: str | None = None, reduce: str = "sum"
) -> SparsityMask:
    """The keep-mask of ``scores`` for ``spec`` (the spec is trusted: it validated itself).

    Args:
        scores: ``[out, in]`` importance scores (any shape for unstructured/N:M), higher = keep.
        spec: sparsity, pattern and scope; GLOBAL scope on one tensor is the same as LAYER (use
            :func:`generate_global_masks` across layers).
        name: layer name for error messages and the mask.
        reduce: how structured patterns (Row, Column, Block) combine a group's scores:
            ``"sum"``, ``"max"`` or ``"l2"`` (see :func:`~pruning_core.masks.select.group_scores`).

    Raises:
        InvalidPattern / ShapeMismatch: the scores' shape cannot carry the pattern.
        NumericalInstability: non-finite scores.
    """
    return _select(scores, spec.pattern, spec.sparsity, spec.scope, name, reduce)


def _select(scores: torch.Tensor, pattern: SparsityPattern, sparsity: float | None, scope: MaskScope,
            name: str | None, reduce: str) -> SparsityMask:
    """Dispatch on the pattern (arguments already checked by the caller)."""
    if isinstance(pattern, Unstructured):
        return generate_unstructured_mask(scores, _required(sparsity, pattern, name), scope=scope, name=name)
    if isinstance(pattern, NM):
        return generate_nm_mask(scores, pattern.n, pattern.m, name=name)
    s = _required(sparsity, pattern, name)
    if isinstance(pattern, Block):
        return generate_block_mask(scores, pattern.height, pattern.width, s, name=name, reduce=reduce)
    if isinstance(pattern, Row):
        return generate_row_mask(scores, s, name=name, reduce=reduce)
    if isinstance(pattern, Column):
        return generate_column_mask(scores, s, name=name, reduce=reduce)
    raise InvalidPattern(f"unsupported pattern {pattern!r}", name=name)


def generate_unstructured_mask(
    scores: torch.Tensor,
    sparsity: float,
    *,
    scope: MaskScope | str = MaskScope.LAYER,
    name: str | None = None,
) -> SparsityMask:
    """Prune the ``floor(L * s)`` lowest scores of each comparison group.

    Args:
        scores: importance scores, any shape (``[out, in]`` for an nn.Linear).
        sparsity: fraction to prune in [0, 1].
        scope: ``LAYER`` (one group: the whole tensor), ``ROW`` (one group per output row,
            Wanda's comparison group; Sun et al. 2023 §3) or ``GLOBAL`` (on a single tensor the
            same as LAYER; use :func:`generate_global_masks` for many layers).
        name: layer name for error messages and the mask.
    """
    dim = -1 if parse_scope(scope) is MaskScope.ROW else None
    return SparsityMask._trusted(keep_topk(scores, sparsity, dim=dim, name=name), Unstructured(), name)


def generate_global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, SparsityMask]:
    """One threshold across all layers: exactly ``floor(total * s)`` scores pruned overall.

    Ties are broken by (layer order in ``scores``, flat index): the earlier one is kept. All
    tensors are moved to the device of the first one. The returned masks are views into one
    freshly allocated buffer.

    Args:
        scores: layer name -> scores (any shapes); names are used in errors and on the masks.
        sparsity: overall fraction to prune in [0, 1].
    """
    s = check_sparsity(sparsity)
    if not scores:
        return {}
    prepared = {layer: prepare_scores(t, name=layer) for layer, t in scores.items()}  # errors name the layer
    device = next(iter(prepared.values())).device
    flat = torch.cat([t.reshape(-1).to(device) for t in prepared.values()])  # [total]
    keep = keep_topk(flat, s)
    parts = torch.split(keep, [t.numel() for t in prepared.values()])
    return {
        layer: SparsityMask._trusted(part.view(t.shape), Unstructured(), layer)
        for (layer, t), part in zip(prepared.items(), parts, strict=True)
    }


def generate_nm_mask(scores: torch.Tensor, n: int, m: int, *, name: str | None = None) -> SparsityMask:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the last (input) dim.

    Raises:
        InvalidPattern: ``m == 0``, ``n > m``, or a last dimension not divisible by ``m``.
    """
    return SparsityMask._trusted(keep_nm(scores, n, m, name=name), NM(n, m), name)


def generate_block_mask(
    scores: torch.Tensor,
    height: int,
    width: int,
    sparsity: float,
    *,
    name: str | None = None,
    reduce: str = "sum",
) -> SparsityMask:
    """Prune ``floor(n_blocks * s)`` whole ``height x width`` blocks of a 2-D score matrix.

    Blocks are ranked by ``reduce`` of their scores: ``"sum"`` (default), ``"max"`` (L-inf of
    the scores) or ``"l2"``.
    """
    keep = keep_blocks(scores, height, width, sparsity, reduce=reduce, name=name)
    return SparsityMask._trusted(keep, Block(height, width), name)


def generate_row_mask(
    scores: torch.Tensor, sparsity: float, *, name: str | None = None, reduce: str = "sum"
) -> SparsityMask:
    """Prune ``floor(rows * s)`` whole rows (output neurons) of a 2-D score matrix."""
    return SparsityMask._trusted(keep_rows(scores, sparsity, reduce=reduce, name=name), Row(), name)


def generate_column_mask(
    scores: torch.Tensor, sparsity: float, *, name: str | None = None, reduce: str = "sum"
) -> SparsityMask:
    """Prune ``floor(cols * s)`` whole columns (input features) of a 2-D score matrix."""
    return SparsityMask._trusted(keep_columns(scores, sparsity, reduce=reduce, name=name), Column(), name)


def generate_mask(
    scores: torch.Tensor,
    pattern: SparsityPattern | str,
    sparsity: float | None,
    *,
    scope: MaskScope | str = MaskScope.LAYER,
    name: str | None = None,
    reduce: str = "sum",
) -> SparsityMask:
    """Dispatch on ``pattern`` (a :class:`SparsityPattern` or its text form, e.g. ``"2:4"``).

    The loose-argument form of :func:`select_mask`. N:M fixes the sparsity at ``1 - n/m``:
    ``sparsity`` must then be None or that value. ``scope`` applies to unstructured masks only;
    ``reduce`` to Row/Column/Block groups.

    Raises:
        InvalidSparsity: a sparsity that contradicts N:M, or a missing one for other patterns.
        InvalidPattern: a malformed pattern, or a non-LAYER scope with a structured pattern.
    """
    if isinstance(pattern, str):
        pattern = SparsityPattern.parse(pattern)
    pattern.check()
    scope = parse_scope(scope)
    if not isinstance(pattern, Unstructured) and scope is not MaskScope.LAYER:
        raise InvalidPattern(
            f"scope={scope.value} applies to unstructured masks only, not {pattern}", name=name
        )
    if isinstance(pattern, NM):
        _check_nm_sparsity(pattern, sparsity, name)
    return _select(scores, pattern, sparsity, scope, name, reduce)


def _required(sparsity: float | None, pattern: SparsityPattern, name: str | None) -> float:
    if sparsity is None:
        raise InvalidSparsity(float("nan"), f"a sparsity is required for the {pattern} pattern", name=name)
    return sparsity


def _check_nm_sparsity(pattern: NM, sparsity: float | None, name: str | None) -> None:
    if sparsity is None:
        return
    s = check_sparsity(sparsity, name=name)
    implied = pattern.theoretical_sparsity()
    if implied is None or abs(s - implied) > NM_SPARSITY_TOL:
        raise InvalidSparsity(
            s,
            f"N:M = {pattern} fixes the sparsity at {implied}; pass sparsity=None or {implied}",
            name=name,
        )


__all__ = [
    "generate_block_mask",
    "generate_column_mask",
    "generate_global_masks",
    "generate_mask",
    "generate_nm_mask",
    "generate_row_mask",
    "generate_unstructured_mask",
    "select_mask",
]
