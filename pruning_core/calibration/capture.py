"""Forward-hook collection of activation statistics from any torch model.

Stage: calibration. :func:`collect_activation_stats` puts a forward hook on every targeted
``nn.Linear``, runs the calibration batches through the model (eval mode, ``torch.no_grad``) and
returns a :class:`CalibrationContext` with one :class:`ActivationStats` per layer. The hooks only
read their input and return nothing, so the model's outputs are unchanged; they are removed
afterwards, also when a batch raises.

Shared inputs: in a Llama block q/k/v (and gate/up) receive the very same tensor. The hooks keep
the last input they saw and its partial sums, so those are computed once and added into each
layer's own accumulator (the cache holds a strong reference to that tensor, so its memory cannot be
reused by a different tensor while it is cached; the tensor's version counter catches in-place
changes). Each layer still owns its statistics object.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats, batch_partials
from pruning_core.errors import ConfigError

logger = logging.getLogger(__name__)

LayerFilter = Callable[[str, nn.Module], bool]
LayerSelection = Sequence[str] | LayerFilter | None
Batch = torch.Tensor | Mapping[str, Any]


def select_linear_layers(model: nn.Module, layers: LayerSelection = None) -> dict[str, nn.Linear]:
    """The targeted ``nn.Linear`` modules by qualified name, in module order.

    Args:
        model: any torch module.
        layers: None (every ``nn.Linear``), a list of qualified names, or ``filter_fn(name, module)``.

    Raises:
        ConfigError: a named layer does not exist or is not an ``nn.Linear``; nothing was selected.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        selected = linears
    elif callable(layers):
        selected = {name: m for name, m in linears.items() if layers(name, m)}
    else:
        wanted = list(layers)
        unknown = [n for n in wanted if n not in linears]
        if unknown:
            raise ConfigError("layers", f"not nn.Linear layers of the model: {unknown[:5]}; "
                              f"available (first 5): {list(linears)[:5]}")
        selected = {name: linears[name] for name in linears if name in set(wanted)}
    if not selected:
        raise ConfigError("layers", f"no nn.Linear layer selected ({len(linears)} in the model)")
    return selected


class _PartialsCache:
    """Partial sums of the most recent input tensor, reused while the same tensor comes back."""

    def __init__(self, hessian: bool, batch_dtype: torch.dtype) -> None:
        self.hessian, self.batch_dtype = hessian, batch_dtype
        self.hits = 0
        self.clear()

    def clear(self) -> None:
        self._x: torch.Tensor | None = None
        self._version = -1
        self._partials: tuple[Any, ...] | None = None

    def get(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[Any, ...]:
        if self._partials is not None and x is self._x and x._version == self._version:
            self.hits += 1
            return self._partials
        self._x, self._version = x, x._version
        self._partials = batch_partials(tokens, hessian=self.hessian, batch_dtype=self.batch_dtype)
        return self._partials


def attach_stat_hooks(
    modules: Mapping[str, nn.Linear],
    context: CalibrationContext,
    *,
    hessian: bool,
    batch_dtype: torch.dtype,
) -> tuple[list[torch.utils.hooks.RemovableHandle], _PartialsCache]:
    """Create a stats accumulator per module in ``context`` and register the hooks that fill them.

    The caller must remove the returned handles (``finally``) and clear the cache.
    """
    cache = _PartialsCache(hessian, batch_dtype)
    handles = []
    for name, module in modules.items():
        stats = ActivationStats(module.in_features, hessian=hessian, name=name,
                                device=module.weight.device, batch_dtype=batch_dtype)
        context.add_layer_stats(name, stats)

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any,
                 stats: ActivationStats = stats) -> None:
            x = args[0] if args else kwargs["input"]
            tokens = stats._flatten(x)
            if tokens.shape[0]:
                stats.add_partial(*cache.get(x, tokens), source=x)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles, cache


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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
    """Run ``batches`` through ``model`` and collect input statistics of its Linear layers.

    Args:
        model: any torch module; it is put in eval mode for the run and restored afterwards.
        batches: token-id tensors ``[B, T]`` (passed positionally) or dicts of keyword arguments.
        layers: which ``nn.Linear`` to hook (see :func:`select_linear_layers`); default all.
        hessian: also accumulate ``XᵀX`` ``[in, in]`` per layer (for SparseGPT).
        dataset: name recorded in the context.
        progress: show a tqdm bar.
        batch_dtype: dtype of each batch's partial sums and ``XᵀX`` (added into float64 sums).
        context: an existing context to add the layers to (its stats for these layers are replaced).

    Returns:
        The context: per-layer :class:`ActivationStats` (insertion order = module order) and
        ``num_samples`` = number of sequences seen.
    """
    modules = select_linear_layers(model, layers)
    ctx = context if context is not None else CalibrationContext(dataset)
    device = model_device(model)
    was_training = model.training
    handles, cache = attach_stat_hooks(modules, ctx, hessian=hessian, batch_dtype=batch_dtype)
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                run_batch(model, batch, device)
                ctx.increment_samples(batch_size_of(batch))
                cache.clear()
    finally:
        for handle in handles:
            handle.remove()
        cache.clear()
        model.train(was_training)
    logger.info("calibration: %d layers, %d samples, %d shared-input reuses",
                len(modules), ctx.num_samples, cache.hits)
    return ctx


__all__ = [
    "Batch",
    "LayerFilter",
    "LayerSelection",
    "attach_stat_hooks",
    "batch_size_of",
    "collect_activation_stats",
    "model_device",
    "run_batch",
    "select_linear_layers",
]
