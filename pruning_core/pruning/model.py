"""Prune every targeted layer of a whole model: ``prune_module``.

Stage: apply. Targets are ``nn.Linear`` modules selected by ``filter_fn(name, module)``; the
default is every ``nn.Linear`` except the output head (``get_output_embeddings()``, a module
named ``lm_head``, or any Linear whose weight is tied to an ``nn.Embedding``). Each target is
pruned by ``pruner.prune_layer`` (its mask ANDed with the earlier mask or the weight's zeros, so
iterative pruning is monotone) or, with ``scope=GLOBAL``, by one threshold across all targets.
A postcondition checks the achieved sparsity against the target within the rounding of
``floor(n·s)`` per comparison group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.calibration.context import CalibrationContext
from pruning_core.errors import ConfigError, InvalidMask, NoParameters
from pruning_core.masks import (
    NM,
    Block,
    Column,
    MaskScope,
    Row,
    SparsityMask,
    SparsityPattern,
    Unstructured,
    generate_global_masks,
)
from pruning_core.metrics import reconstruction_error
from pruning_core.pruning.pruners import ImportancePruner, Pruner, existing_mask
from pruning_core.pruning.result import PruningResult

logger = logging.getLogger(__name__)

LayerFilter = Callable[[str, nn.Module], bool]


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


def target_layers(model: nn.Module, filter_fn: LayerFilter | None = None, *, prefix: str = "") -> dict[str, nn.Module]:
    """The layers ``prune_module`` prunes, by qualified name (``prefix`` + name in ``model``).

    Raises:
        NoParameters: nothing is selected.
    """
    heads = output_head_names(model)
    selected = {}
    for name, module in model.named_modules():
        full = f"{prefix}{name}"
        if not isinstance(module, nn.Linear):
            continue
        keep = filter_fn(full, module) if filter_fn is not None else name not in heads
        if keep:
            selected[full] = module
    if not selected:
        raise NoParameters(f"{type(model).__name__} (no nn.Linear layer selected)")
    return selected


def prune_module(
    model: nn.Module,
    pruner: Pruner,
    sparsity: float | None,
    pattern: SparsityPattern | str | None = None,
    context: CalibrationContext | None = None,
    *,
    filter_fn: LayerFilter | None = None,
    scope: MaskScope | str | None = None,
    prefix: str = "",
    masks: Mapping[str, SparsityMask] | None = None,
    measure_memory: bool = True,
    progress: bool = False,
) -> PruningResult:
    """Prune every targeted layer of ``model`` in place.

    Args:
        model: any torch module (a whole model or one decoder block).
        pruner: e.g. ``MagnitudePruner()``, ``WandaPruner()``, ``SparseGPTPruner()``.
        sparsity: target fraction (None allowed for N:M, which fixes it at ``1 - n/m``).
        pattern: sparsity pattern (default unstructured), or its text form (``"2:4"``).
        context: calibration statistics by layer name (Wanda, SparseGPT, Taylor).
        filter_fn: ``(name, module) -> bool`` over the ``nn.Linear`` layers; default all but the head.
        scope: LAYER, ROW or GLOBAL (or ``"layer"``, ...) for unstructured masks; None = the
            pruner's default (ROW for Wanda, LAYER otherwise).
        prefix: prepended to layer names (to match the context when ``model`` is one block).
        masks: earlier masks by layer name; new masks are ANDed with them (default: the
            weights' current zeros).
        measure_memory: store each pruned weight in its sparse format to measure the bytes saved.
        progress: show a tqdm bar over layers.

    Returns:
        The :class:`PruningResult` with per-layer sparsity, masks, memory saved and, where the
        context has ``XᵀX``, per-layer relative output reconstruction errors.
    """
    pattern, scope = parse_pattern_scope(pattern, scope)
    chosen = scope if scope is not None else pruner.default_scope
    layers = target_layers(model, filter_fn, prefix=prefix)
    originals = _originals(layers, context)
    prior_pruned = sum(existing_mask(m.weight, None if masks is None else masks.get(n), n).num_zeros
                       for n, m in layers.items())
    if chosen is MaskScope.GLOBAL:
        final = _prune_global(layers, pruner, sparsity, pattern, context, masks)
    else:
        final = {}
        for name, module in tqdm(layers.items(), desc=pruner.name, unit="layer", disable=not progress):
            final[name] = pruner.prune_layer(module, sparsity, pattern, context, name=name, scope=scope,
                                             mask=None if masks is None else masks.get(name))
    results = []
    for name, module in layers.items():
        weight = module.weight.detach()
        err = reconstruction_error(originals[name], weight, context.require_stats(name), name=name) \
            if name in originals and context is not None else None
        results.append(PruningResult.for_layer(name, weight, final[name], measure_memory=measure_memory, error=err))
    result = PruningResult.merge(results)
    _check_postcondition(result, layers, sparsity, pattern, chosen, pruner, had_prior=prior_pruned > 0)
    logger.info("%s: %d layers, achieved sparsity %.4f", pruner.name, len(layers), result.achieved_sparsity)
    return result


def parse_pattern_scope(pattern: SparsityPattern | str | None,
                        scope: MaskScope | str | None) -> tuple[SparsityPattern, MaskScope | None]:
    """Accept the text forms (``"2:4"``, ``"row"``) of a pattern and a scope."""
    if pattern is None:
        pattern = Unstructured()
    elif isinstance(pattern, str):
        pattern = SparsityPattern.parse(pattern)
    if isinstance(scope, str):
        try:
            scope = MaskScope(scope.lower())
        except ValueError:
            allowed = ", ".join(s.value for s in MaskScope)
            raise ConfigError("scope", f"must be one of {allowed}; got {scope!r}") from None
    return pattern, scope


def _originals(layers: Mapping[str, nn.Module], context: CalibrationContext | None) -> dict[str, torch.Tensor]:
    """Copies of the weights whose layers have ``XᵀX`` (for the reconstruction error)."""
    if context is None:
        return {}
    return {n: m.weight.detach().clone() for n, m in layers.items()
            if context.has_stats(n) and context.require_stats(n).xtx is not None}


def _prune_global(layers: Mapping[str, nn.Module], pruner: Pruner, sparsity: float | None,
                  pattern: SparsityPattern, context: CalibrationContext | None,
                  masks: Mapping[str, SparsityMask] | None) -> dict[str, SparsityMask]:
    """One threshold across all layers (unstructured, score-based pruners only)."""
    if not isinstance(pattern, Unstructured) or not isinstance(pruner, ImportancePruner):
        raise ConfigError("scope", f"GLOBAL scope needs an unstructured pattern and a score-based pruner, "
                                   f"got {pattern} with {pruner.name}")
    if sparsity is None:
        raise ConfigError("sparsity", "a sparsity is required for unstructured pruning")
    scores = {n: pruner.importance.compute(m, context, layer_name=n).values for n, m in layers.items()}
    new = generate_global_masks(scores, sparsity)
    final = {}
    for name, module in layers.items():
        prior = existing_mask(module.weight, None if masks is None else masks.get(name), name)
        final[name] = (new[name] & prior)
        final[name].apply_(module.weight)
    return final


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


def _check_postcondition(result: PruningResult, layers: Mapping[str, nn.Module], sparsity: float | None,
                         pattern: SparsityPattern, scope: MaskScope, pruner: Pruner, *, had_prior: bool) -> None:
    """Raise InvalidMask if the achieved count is off the target by more than the rounding allows.

    With earlier masks or zeros the AND may prune more than the target; only the lower bound is
    checked then.
    """
    target = pattern.theoretical_sparsity() if isinstance(pattern, NM) else sparsity
    if target is None or result.total_parameters == 0:
        return
    blocksize = getattr(pruner, "blocksize", None)
    expected = target * result.total_parameters
    slack = 1 if scope is MaskScope.GLOBAL else sum(
        _slack(m.weight.shape, pattern, scope, blocksize) for m in layers.values())
    pruned = result.parameters_pruned
    if pruned < expected - slack - 1e-6 * expected or (not had_prior and pruned > expected * (1 + 1e-9) + 1e-6):
        raise InvalidMask(f"postcondition: {pruned} of {result.total_parameters} weights pruned, expected "
                          f"{expected:.1f} (at most {slack} fewer by rounding) for sparsity {target} with {pattern}")


__all__ = ["output_head_names", "parse_pattern_scope", "prune_module", "target_layers"]
