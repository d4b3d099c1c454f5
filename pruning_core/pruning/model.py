"""Prune every targeted layer of a whole model: ``prune_module``.

Stage: pruning (after methods). ``prune_module`` is a loop over the units (Linear, Conv1D,
MoE experts) :func:`target_units` selects, calling ``method.prune_weight`` on each weight and writing the
result back; with ``scope=GLOBAL`` one threshold over every layer's ``method.score`` picks the
masks instead. Each new mask is ANDed with the earlier one (or the weight's zeros), so iterative
pruning is monotone. A postcondition checks the achieved sparsity against the target within the
rounding of ``floor(n·s)`` per comparison group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.arch.units import PrunableUnit, prunable_units
from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import CalibrationRequired, InvalidMask, MissingActivationStats, NoParameters
from pruning_core.masks import (
    NM,
    Block,
    Column,
    MaskScope,
    Row,
    SparsityMask,
    SparsityPattern,
    SparsitySpec,
    generate_global_masks,
)
from pruning_core.methods.base import Method, check_scope, earlier_mask, zero_pruned
from pruning_core.metrics import reconstruction_error
from pruning_core.pruning.result import PruningResult

logger = logging.getLogger(__name__)

LayerFilter = Callable[[str, nn.Module], bool]
Stats = CalibrationContext | Mapping[str, ActivationStats]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the Linear output head(s): ``get_output_embeddings()``, ``lm_head``, tied Linears."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    emb_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is out_emb or name.split(".")[-1] == "lm_head" or module.weight.data_ptr() in emb_ptrs:
            heads.add(name)
    return heads


def target_units(model: nn.Module, filter_fn: LayerFilter | None = None, *,
                 prefix: str = "") -> dict[str, PrunableUnit]:
    """The units ``prune_module`` prunes, by qualified name (``prefix`` + name in ``model``).

    The one layer selector (:func:`~pruning_core.arch.prunable_units`: Linear, GPT-2 Conv1D and
    fused MoE experts inside the decoder blocks; never the head, embeddings or routers), or those
    of them ``filter_fn(name, module)`` accepts (``module``: the module holding the weight).

    Raises:
        NoParameters: nothing is selected.
        UnsupportedArchitecture: a weight the selector cannot map (see ``prunable_units``).
    """
    units = prunable_units(model, prefix=prefix)
    selected = {u.name: u for u in units
                if filter_fn is None or filter_fn(u.name, model.get_submodule(u.module) if u.module else model)}
    if not selected:
        raise NoParameters(f"{type(model).__name__} (no prunable layer selected)")
    return selected


def target_layers(model: nn.Module, filter_fn: LayerFilter | None = None, *, prefix: str = "") -> dict[str, nn.Module]:
    """The modules holding :func:`target_units` (Linear/Conv1D modules; the experts module per expert)."""
    return {name: model.get_submodule(u.module) if u.module else model
            for name, u in target_units(model, filter_fn, prefix=prefix).items()}


def prune_module(
    model: nn.Module,
    method: Method,
    spec: SparsitySpec,
    stats: Stats | None = None,
    *,
    filter_fn: LayerFilter | None = None,
    prefix: str = "",
    masks: Mapping[str, SparsityMask] | None = None,
    measure_memory: bool = True,
    progress: bool = False,
) -> PruningResult:
    """Prune every targeted layer of ``model`` in place.

    Args:
        model: any torch module (a whole model or one decoder block).
        method: e.g. ``get_method("wanda")`` (see :mod:`pruning_core.methods`).
        spec: sparsity, pattern and scope, e.g. ``SparsitySpec.parse(0.5, "2:4")``; a GLOBAL scope
            uses one threshold over all targeted layers.
        stats: per-layer statistics by qualified layer name (a :class:`CalibrationContext` or a
            mapping); required by methods with ``needs_stats``.
        filter_fn: ``(name, module) -> bool`` over the prunable units (:func:`target_units`);
            default all of them.
        prefix: prepended to layer names (to match ``stats`` when ``model`` is one block).
        masks: earlier masks by layer name; new masks are ANDed with them (default: the
            weights' current zeros).
        measure_memory: store each pruned weight in its sparse format to measure the bytes saved.
        progress: show a tqdm bar over layers.

    Returns:
        The :class:`PruningResult` with per-layer sparsity, masks, memory saved and, where the
        statistics hold ``XᵀX``, per-layer relative output reconstruction errors.

    Raises:
        ConfigError: a scope the method does not support. CalibrationRequired: the method needs
        statistics and none were given. InvalidMask: the postcondition failed.
    """
    units = target_units(model, filter_fn, prefix=prefix)
    check_scope(method, spec)
    if method.needs_stats and stats is None:
        raise CalibrationRequired(method.name)  # before any work, not at the first layer
    originals = {n: u.read(model).clone() for n, u in units.items() if _xtx_stats(stats, n) is not None}
    if spec.scope is MaskScope.GLOBAL:
        keeps, had_prior = _prune_global(model, units, method, spec, stats, masks)
    else:
        keeps, had_prior = {}, False
        for name, unit in tqdm(units.items(), desc=method.name, unit="layer", disable=not progress):
            weight = unit.read(model)
            prior = _prior(weight, masks, name)
            had_prior = had_prior or not bool(prior.all())
            chosen, layer_stats = _method_for(unit, method, stats)
            new, keeps[name] = chosen.prune_weight(weight, layer_stats, spec, mask=prior, name=name)
            unit.write(model, new)
    result = _result(model, units, keeps, spec, stats, originals, measure_memory)
    _check_postcondition(result, units, spec, method, had_prior=had_prior)
    logger.info("%s: %d layers, achieved sparsity %.4f", method.name, len(units), result.achieved_sparsity)
    return result


def _prior(weight: torch.Tensor, masks: Mapping[str, SparsityMask] | None, name: str) -> torch.Tensor:
    """The layer's earlier keep mask: from ``masks``, else the weight's non-zeros."""
    earlier = masks.get(name) if masks is not None else None
    return earlier_mask(weight, None if earlier is None else earlier.tensor, name=name)


def _method_for(unit: PrunableUnit, method: Method, stats: Stats | None) -> tuple[Method, ActivationStats | None]:
    """The method and statistics for one unit.

    The rule for mixture-of-experts experts that no calibration token was routed to (their
    statistics have ``count == 0``; the calibration hooks warn about each): they are pruned by
    weight magnitude at the same spec, so the target sparsity still holds.
    """
    layer_stats = _layer_stats(stats, unit.name, method) if unit.expert is None or method.needs_stats else None
    if unit.expert is not None and method.needs_stats and layer_stats is not None and layer_stats.count == 0:
        from pruning_core.methods.registry import get_method

        return get_method("magnitude"), None
    return method, layer_stats


def _layer_stats(stats: Stats | None, name: str, method: Method) -> ActivationStats | None:
    """The layer's statistics: required when the method needs them, else whatever is there."""
    if stats is None:
        return None
    if isinstance(stats, CalibrationContext):
        return stats.require_stats(name) if method.needs_stats else stats.get_stats(name)
    if method.needs_stats and name not in stats:
        raise MissingActivationStats(name, available=list(stats))
    return stats.get(name)


def _xtx_stats(stats: Stats | None, name: str) -> ActivationStats | None:
    """The layer's statistics if they carry ``XᵀX`` (for the reconstruction error), else None."""
    if stats is None:
        return None
    layer = stats.get_stats(name) if isinstance(stats, CalibrationContext) else stats.get(name)
    return layer if layer is not None and layer.xtx is not None and layer.count > 0 else None


def _prune_global(model: nn.Module, units: Mapping[str, PrunableUnit], method: Method, spec: SparsitySpec,
                  stats: Stats | None, masks: Mapping[str, SparsityMask] | None) -> tuple[dict[str, torch.Tensor], bool]:
    """One threshold across every unit's ``method.score``; kept weights unchanged.

    Returns the keep masks (ANDed with the earlier ones) and whether any earlier mask pruned.
    """
    scores = {}
    for n, u in units.items():
        chosen, layer_stats = _method_for(u, method, stats)
        scores[n] = chosen.score(u.read(model), layer_stats, name=n)
    new = generate_global_masks(scores, spec.sparsity)
    keeps, had_prior = {}, False
    for name, unit in units.items():
        weight = unit.read(model)
        prior = _prior(weight, masks, name)
        had_prior = had_prior or not bool(prior.all())
        keeps[name] = new[name].tensor.to(weight.device) & prior
        unit.write(model, zero_pruned(weight, keeps[name]))
    return keeps, had_prior


def _result(model: nn.Module, units: Mapping[str, PrunableUnit], keeps: Mapping[str, torch.Tensor],
            spec: SparsitySpec, stats: Stats | None, originals: Mapping[str, torch.Tensor],
            measure_memory: bool) -> PruningResult:
    """Per-unit results (masks with the spec's pattern where it still holds), merged."""
    results = []
    for name, unit in units.items():
        weight = unit.read(model)
        layer_stats = _xtx_stats(stats, name)
        err = reconstruction_error(originals[name], weight, layer_stats, name=name) if layer_stats else None
        mask = SparsityMask.from_keep(keeps[name], spec.pattern, name=name)
        results.append(PruningResult.for_layer(name, weight, mask, measure_memory=measure_memory, error=err))
    return PruningResult.merge(results)


def _slack(shape: torch.Size, pattern: SparsityPattern, scope: MaskScope, blocksize: int | None) -> int:
    """Elements one layer may fall short of ``n·s`` by flooring per comparison group."""
    rows, cols = (shape[0], shape[-1]) if len(shape) >= 2 else (1, shape[0] if len(shape) else 1)
    if isinstance(pattern, NM):
        return 0
    if isinstance(pattern, Block):
        return pattern.height * pattern.width
    if isinstance(pattern, Row):
        return cols
    if isinstance(pattern, Column):
        return rows
    if blocksize:  # SparseGPT: one group per block of columns
        return -(-cols // blocksize)
    return rows if scope is MaskScope.ROW else 1


def _check_postcondition(result: PruningResult, units: Mapping[str, PrunableUnit], spec: SparsitySpec,
                         method: Method, *, had_prior: bool) -> None:
    """Raise InvalidMask if the achieved count is off the target by more than the rounding allows.

    With earlier masks or zeros the AND may prune more than the target; only the lower bound is
    checked then.
    """
    if result.total_parameters == 0:
        return
    blocksize = getattr(method, "blocksize", None)
    expected = spec.sparsity * result.total_parameters
    slack = 1 if spec.scope is MaskScope.GLOBAL else sum(
        _slack(torch.Size(u.shape), spec.pattern, spec.scope, blocksize) for u in units.values())
    pruned = result.parameters_pruned
    if pruned < expected - slack - 1e-6 * expected or (not had_prior and pruned > expected * (1 + 1e-9) + 1e-6):
        raise InvalidMask(f"postcondition: {pruned} of {result.total_parameters} weights pruned, expected "
                          f"{expected:.1f} (at most {slack} fewer by rounding) for {spec} ({method.name})")


__all__ = ["LayerFilter", "output_head_names", "prune_module", "target_layers", "target_units"]
