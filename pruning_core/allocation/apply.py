"""Prune a model at per-layer sparsities (an allocation), one pass or block by block.

Stage: apply. :func:`prune_layer_weight` is the one call into the pruning methods
(``pruning_core.methods.get_method(name).prune_weight``: tensor in, tensor out). Methods: ``"magnitude"`` (per layer), ``"wanda"``
(per output row, as the paper), ``"sparsegpt"`` (OBS, per column block); unstructured only
(an N:M pattern fixes every layer's sparsity at ``1 − n/m``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.allocation.rounding import comparison_groups, round_to_groups
from pruning_core.allocation.units import Allocation
from pruning_core.arch import decoder_blocks
from pruning_core.calibration.capture import Batch
from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.sequential import calibrate_block, capture_block_inputs, run_block
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import ConfigError
from pruning_core.masks import MaskScope
from pruning_core.methods import Method, get_method

logger = logging.getLogger(__name__)

_ALLOCATED = ("magnitude", "wanda", "sparsegpt")


def _method(method: str) -> Method:
    if method not in _ALLOCATED:
        raise ConfigError("method", f"unknown method {method!r}; available: {', '.join(_ALLOCATED)}")
    return get_method(method)


def method_scope(method: str) -> MaskScope:
    """The comparison groups ``method`` selects in (Wanda ROW, the others LAYER)."""
    return _method(method).default_scope


def needs_stats(method: str) -> tuple[bool, bool]:
    """``(activation statistics, XᵀX)`` that ``method`` needs."""
    chosen = _method(method)
    return chosen.needs_stats or chosen.needs_hessian, chosen.needs_hessian


def prune_layer_weight(method: str, weight: torch.Tensor, stats: ActivationStats | None, sparsity: float, *,
                       name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one ``[out, in]`` weight out of place: ``(new weight, bool keep mask)``.

    The weight's existing zeros stay pruned (as ``prune_module`` does). Kept weights are unchanged
    except for SparseGPT, which updates them to reconstruct the layer's output.
    """
    chosen = _method(method)
    return chosen.prune_weight(weight, stats, chosen.spec(sparsity), name=name)


def layer_targets(model: nn.Module, allocation: Allocation, method: str) -> dict[str, float]:
    """The allocation's per-layer sparsities rounded to ``method``'s comparison groups, unit by unit
    (:func:`~pruning_core.allocation.rounding.round_to_groups`): each unit prunes
    ``floor(s_u·n_u)`` weights up to less than its smallest group count, exactly as the search's
    database variants (``database.build_variant``) do."""
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for u in allocation.units for n in u.layers}
    return shape_targets(allocation, shapes, method_scope(method))


def shape_targets(allocation: Allocation, shapes: Mapping[str, tuple[int, ...]], scope: MaskScope) -> dict[str, float]:
    """:func:`layer_targets` from the layers' ``[out, in]`` shapes and a comparison scope (ROW or
    LAYER) instead of a model and a method: what a job that never holds the model calls."""
    out: dict[str, float] = {}
    for unit, s in zip(allocation.units, allocation.sparsities, strict=True):
        groups = {n: comparison_groups(tuple(shapes[n]), scope) for n in unit.layers}
        out.update(round_to_groups(dict.fromkeys(unit.layers, s), groups))
    return out


def _prune_in_place(module: nn.Module, method: str, stats: ActivationStats | None, sparsity: float,
                    name: str) -> torch.Tensor:
    new, keep = prune_layer_weight(method, module.weight.detach(), stats, sparsity, name=name)
    with torch.no_grad():
        module.weight.copy_(new)
    return keep


def prune_allocated_(model: nn.Module, context: CalibrationContext | None, sparsities: Mapping[str, float],
                     method: str, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """Prune each named layer of ``model`` in place at its own sparsity (one-pass statistics).

    Args:
        model: the model; layer names are qualified names in it.
        context: statistics of the dense model (``collect_activation_stats``; with ``hessian=True``
            for SparseGPT); None for magnitude.
        sparsities: ``{layer: fraction}``, e.g. :func:`layer_targets`.
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.

    Returns:
        ``{layer: bool keep mask}``.
    """
    wants_stats, _ = needs_stats(method)
    masks = {}
    for name, s in tqdm(sparsities.items(), desc=f"{method} (allocated)", unit="layer", disable=not progress):
        stats = context.require_stats(name) if wants_stats and context is not None else None
        masks[name] = _prune_in_place(model.get_submodule(name), method, stats, s, name)
    return masks


def prune_allocated_sequential_(model: nn.Module, batches: Iterable[Batch], sparsities: Mapping[str, float],
                                method: str, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """As :func:`prune_allocated_`, block by block: block ``i`` is calibrated on the outputs of the
    already-pruned blocks ``< i`` (the Wanda/SparseGPT reference procedure).

    Layers of ``sparsities`` outside the decoder blocks are an error (ConfigError).
    """
    path, blocks = decoder_blocks(model)
    outside = [n for n in sparsities if not n.startswith(f"{path}.")]
    if outside:
        raise ConfigError("sparsities", f"layers outside the decoder blocks {path}: {outside[:3]}")
    wants_stats, hessian = needs_stats(method)
    inputs = capture_block_inputs(model, batches, progress=False)
    masks: dict[str, torch.Tensor] = {}
    for i, block in enumerate(tqdm(blocks, desc=f"{method} (sequential)", unit="block", disable=not progress)):
        prefix = f"{path}.{i}."
        mine = {n: s for n, s in sparsities.items() if n.startswith(prefix)}
        if mine:
            ctx = calibrate_block(block, inputs, hessian=hessian, prefix=prefix, layers=[n[len(prefix):] for n in mine]) \
                if wants_stats else None
            for name, s in mine.items():
                stats = ctx.require_stats(name) if ctx is not None else None
                masks[name] = _prune_in_place(block.get_submodule(name[len(prefix):]), method, stats, s, name)
        if i + 1 < len(blocks):
            inputs = run_block(block, inputs)
    return masks


__all__ = ["layer_targets", "method_scope", "needs_stats", "prune_allocated_", "prune_allocated_sequential_",
           "prune_layer_weight", "shape_targets"]
