"""Forward-hook collection of activation statistics from any torch model.

Stage: calibration. :func:`collect_activation_stats` hooks every targeted unit (``nn.Linear``,
GPT-2 ``Conv1D``, one unit per fused MoE expert and parameter: :mod:`pruning_core.arch.units`),
runs the calibration batches through the model (eval mode, ``torch.no_grad``) and returns a
:class:`CalibrationContext` with one :class:`ActivationStats` per unit, keyed by unit name (for a
Linear, its module name, as before). The hooks (:mod:`pruning_core.calibration.hooks`) only read
their input and return nothing, so the model's outputs are unchanged; they are removed
afterwards, also when a batch raises. Experts that received no tokens are reported (see hooks).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.arch import PrunableUnit, eval_mode, matrix_units, model_device
from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.hooks import PartialsCache as _PartialsCache  # noqa: F401 (benchmarks patch it)
from pruning_core.calibration.hooks import attach_unit_hooks, report_unrouted
from pruning_core.calibration.stats import batch_partials  # noqa: F401 (benchmarks use capture.batch_partials)
from pruning_core.errors import ConfigError

logger = logging.getLogger(__name__)

LayerFilter = Callable[[str, nn.Module], bool]
LayerSelection = Sequence[str | PrunableUnit] | LayerFilter | None
Batch = torch.Tensor | Mapping[str, Any]


def _holder(model: nn.Module, unit: PrunableUnit) -> nn.Module:
    return model.get_submodule(unit.module) if unit.module else model


def select_units(model: nn.Module, layers: LayerSelection = None) -> list[PrunableUnit]:
    """The targeted units of ``model`` (names relative to ``model``), in module order.

    Args:
        model: any torch module.
        layers: None (every Linear, Conv1D and fused-expert unit, the LM head included), a list
            of unit names (or units), or ``filter_fn(name, module)`` over the units (``module``
            is the module holding the weight: the Linear, the Conv1D or the experts module).

    Raises:
        ConfigError: a named unit does not exist; nothing was selected.
    """
    units = matrix_units(model)
    if layers is None:
        selected = units
    elif callable(layers):
        selected = [u for u in units if layers(u.name, _holder(model, u))]
    else:
        wanted = {w.name if isinstance(w, PrunableUnit) else w for w in layers}
        known = {u.name for u in units}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ConfigError("layers", f"not prunable units of the model: {sorted(unknown)[:5]}; "
                              f"available (first 5): {[u.name for u in units[:5]]}")
        selected = [u for u in units if u.name in wanted]
    if not selected:
        raise ConfigError("layers", f"no layer selected ({len(units)} units in the model)")
    return selected


def select_linear_layers(model: nn.Module, layers: LayerSelection = None) -> dict[str, nn.Linear]:
    """The targeted ``nn.Linear`` modules by qualified name, in module order (selection as
    :func:`select_units`; only Linear units are kept, and naming another unit is an error).

    Raises:
        ConfigError: a named layer does not exist or is not an ``nn.Linear``; nothing was selected.
    """
    units = select_units(model, layers)
    others = [u.name for u in units if u.kind != "linear"]
    if others and layers is not None and not callable(layers):
        raise ConfigError("layers", f"not nn.Linear layers of the model: {others[:5]}")
    linears = {u.name: _holder(model, u) for u in units if u.kind == "linear"}
    if not linears:
        raise ConfigError("layers", f"no nn.Linear layer selected ({len(units)} units selected)")
    return linears  # type: ignore[return-value]


def batch_size_of(batch: Batch) -> int:
    """Number of sequences in a batch: dim 0 of the token tensor (or of ``input_ids`` / the first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        tensor = batch.get("input_ids")
        values: Iterable[Any] = batch.values()
    else:  # e.g. an (inputs, targets) tuple for a custom loss_fn
        tensor, values = None, batch if isinstance(batch, tuple | list) else ()
    if not isinstance(tensor, torch.Tensor):
        tensor = next((v for v in values if isinstance(v, torch.Tensor)), None)
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() else 1


def _takes_use_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def run_batch(model: nn.Module, batch: Batch, device: torch.device) -> Any:
    """Call ``model`` on a token tensor (positional) or a dict of keyword arguments, on ``device``.

    Models whose ``forward`` takes ``use_cache`` get ``use_cache=False`` (no KV cache is built
    during calibration) unless the batch sets it.
    """
    extra = {"use_cache": False} if _takes_use_cache(model) else {}
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device), **extra)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return model(**{**extra, **kwargs})


def collect_activation_stats(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    layers: LayerSelection = None,
    hessian: bool = False,
    dataset: str = "",
    progress: bool = True,
    batch_dtype: torch.dtype = torch.float32,
    context: CalibrationContext | None = None,
) -> CalibrationContext:
    """Run ``batches`` through ``model`` and collect the input statistics of its units.

    Args:
        model: any torch module; it is put in eval mode for the run and restored afterwards.
        batches: token-id tensors ``[B, T]`` (passed positionally) or dicts of keyword arguments.
        layers: which units to hook (see :func:`select_units`); default every Linear, Conv1D and
            fused-expert unit.
        hessian: also accumulate ``XᵀX`` ``[in, in]`` per unit (for SparseGPT).
        dataset: name recorded in the context.
        progress: show a tqdm bar.
        batch_dtype: dtype of each batch's partial sums and ``XᵀX`` (added into float64 sums).
        context: an existing context to add the layers to (its stats for these layers are replaced).

    Returns:
        The context: per-unit :class:`ActivationStats` keyed by unit name (insertion order = unit
        order) and ``num_samples`` = number of sequences seen. An expert that received no tokens
        has ``count == 0`` and is named in a WARNING (the pruning rule is in
        :mod:`pruning_core.calibration.hooks`).
    """
    units = select_units(model, layers)
    ctx = context if context is not None else CalibrationContext(dataset)
    device = model_device(model)
    handles, cache = attach_unit_hooks(model, units, ctx, hessian=hessian, batch_dtype=batch_dtype)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                run_batch(model, batch, device)
                ctx.increment_samples(batch_size_of(batch))
                cache.clear()
    finally:
        for handle in handles:
            handle.remove()
        cache.clear()
    report_unrouted(ctx, units)
    logger.info("calibration: %d units, %d samples, %d shared-input reuses", len(units), ctx.num_samples, cache.hits)
    return ctx


__all__ = [
    "Batch",
    "LayerFilter",
    "LayerSelection",
    "batch_size_of",
    "collect_activation_stats",
    "model_device",
    "run_batch",
    "select_linear_layers",
    "select_units",
]
