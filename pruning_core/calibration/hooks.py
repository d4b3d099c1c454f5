"""Forward hooks that fill one :class:`ActivationStats` per prunable unit, keyed by unit name.

Stage: calibration. Units come from :mod:`pruning_core.arch.units`; every unit's statistics are
over the inputs of its math weight ``W [out, in]``:

- ``nn.Linear`` and GPT-2 ``Conv1D``: the module's input ``[..., in]`` (a Conv1D's storage is
  ``[in, out]``, its input dimension is the math input dimension);
- fused MoE experts (transformers 5.x ``experts(hidden_states, top_k_index, top_k_weights)``):
  a hook on the experts module's forward gives every expert exactly the tokens routed to it
  (``top_k_index == e``, once per token). ``gate_up_proj.e`` sees those hidden states;
  ``down_proj.e`` sees ``act(gate) * up`` of them, recomputed with the module's own weights and
  gating (``_apply_gate``, else ``act_fn(gate) * up``), in the model's dtype as its forward does.
  Routing weights multiply the expert's *output*, so they are not part of its input statistics.

**Experts that receive no calibration tokens** keep statistics with ``count == 0`` (visible to
callers, e.g. :meth:`CalibrationContext.empty_layers`, and in the stats files); the collectors
log a WARNING naming them and an INFO table of tokens per expert. The rule for pruning them is:
*an expert with no calibration tokens is pruned by weight magnitude at the same sparsity and
pattern* (so the target sparsity still holds); statistics-based methods raise
``CalibrationRequired`` on zero-token statistics rather than silently skipping them.

Shared inputs: in a Llama block q/k/v (and gate/up) receive the very same tensor. The Linear /
Conv1D hooks keep the last input they saw and its partial sums (:class:`PartialsCache`), so those
are computed once and added into each unit's own accumulator (the cache holds a strong reference
to the tensor, so its memory cannot be reused while cached; the version counter catches in-place
changes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.arch.units import PrunableUnit
from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats, batch_partials
from pruning_core.errors import ConfigError

logger = logging.getLogger(__name__)

Hook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]


class PartialsCache:
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


def hook_argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, names: Sequence[str]) -> Any:
    """Argument ``position`` of a hooked forward call, passed positionally or by one of ``names``."""
    if len(args) > position:
        return args[position]
    value = next((kwargs[n] for n in names if n in kwargs), None)
    if value is None:
        raise ConfigError("layers", f"a hooked module was called without argument {position} "
                          f"(looked for {list(names)}; got keywords {sorted(kwargs)})")
    return value


def _input_hook(stats: ActivationStats, cache: PartialsCache) -> Hook:
    """Hook of a Linear / Conv1D: add its input ``[..., in]`` to ``stats``."""

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        x = hook_argument(args, kwargs, 0, ("input", "x", "hidden_states"))
        tokens = stats._flatten(x)
        if tokens.shape[0]:
            stats.add_partial(*cache.get(x, tokens), source=x)

    return hook


def gated_input(experts: nn.Module, tokens: torch.Tensor, expert: int) -> torch.Tensor:
    """Input of ``down_proj[expert]`` for ``tokens [n, hidden]``: ``act(gate) * up``, ``[n, ffn]``.

    Computed as the experts module's forward does (its weights, dtype and gating function).
    """
    gate_up = F.linear(tokens, experts.gate_up_proj[expert])  # (n, 2·ffn)
    apply_gate = getattr(experts, "_apply_gate", None)
    if callable(apply_gate):
        return apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def experts_hook(stats: dict[tuple[int, str], Any]) -> Hook:
    """Hook of a fused experts module: per-expert statistics of the routed tokens (``stats`` values:
    anything with ``update(tokens)``, e.g. :class:`ActivationStats` or an input sample)."""
    experts = sorted({e for e, _ in stats})

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        hidden = hook_argument(args, kwargs, 0, ("hidden_states",))
        x = hidden.reshape(-1, hidden.shape[-1])  # (tokens, hidden)
        routed = hook_argument(args, kwargs, 1, ("top_k_index",)).reshape(x.shape[0], -1)  # (tokens, k)
        for e in experts:
            rows = (routed == e).any(dim=-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            tokens = x[rows]  # (n_e, hidden)
            if (e, "gate_up_proj") in stats:
                stats[(e, "gate_up_proj")].update(tokens)
            if (e, "down_proj") in stats:
                stats[(e, "down_proj")].update(gated_input(mod, tokens, e))

    return hook


def attach_unit_hooks(
    root: nn.Module,
    units: Sequence[PrunableUnit],
    context: CalibrationContext,
    *,
    hessian: bool,
    batch_dtype: torch.dtype,
    prefix: str = "",
) -> tuple[list[torch.utils.hooks.RemovableHandle], PartialsCache]:
    """Create one stats accumulator per unit in ``context`` (key ``prefix + unit.name``, in unit
    order) and register the hooks that fill them on the units' modules under ``root``.

    The caller must remove the returned handles (``finally``) and clear the cache after each batch.
    """
    cache = PartialsCache(hessian, batch_dtype)
    groups: dict[str, list[PrunableUnit]] = {}
    for unit in units:
        groups.setdefault(unit.module, []).append(unit)
    handles = []
    for path, group in groups.items():
        module = root.get_submodule(path) if path else root
        stats = {}
        for unit in group:
            s = ActivationStats(unit.in_features, hessian=hessian, name=prefix + unit.name,
                                device=unit.read(root).device, batch_dtype=batch_dtype)
            context.add_layer_stats(prefix + unit.name, s)
            stats[(unit.expert, unit.param)] = s
        if group[0].expert is None:
            hook = _input_hook(stats[(None, group[0].param)], cache)
        else:
            hook = experts_hook({(e, p): s for (e, p), s in stats.items() if e is not None})
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles, cache


def expert_token_table(context: CalibrationContext, units: Sequence[PrunableUnit],
                       prefix: str = "") -> dict[str, list[int]]:
    """Tokens routed to each expert, per experts module: ``{"model.layers.0.mlp.experts": [n_0, ...]}``.

    Read from the statistics of each module's first collected expert parameter.
    """
    table: dict[str, dict[int, int]] = {}
    first_param: dict[str, str] = {}
    for unit in units:
        name = prefix + unit.name
        if unit.expert is None or not context.has_stats(name):
            continue
        module = name.rsplit(".", 2)[0]
        if first_param.setdefault(module, unit.param) == unit.param:
            table.setdefault(module, {})[unit.expert] = context.require_stats(name).count
    return {m: [counts[e] for e in sorted(counts)] for m, counts in table.items()}


def report_unrouted(context: CalibrationContext, units: Sequence[PrunableUnit], prefix: str = "") -> list[str]:
    """Log the tokens per expert (INFO) and a WARNING naming every expert unit with no tokens.

    Returns:
        The names of the expert units with zero calibration tokens.
    """
    for module, counts in expert_token_table(context, units, prefix).items():
        logger.info("calibration tokens per expert of %s: %s", module, counts)
    empty = [prefix + u.name for u in units if u.expert is not None and context.has_stats(prefix + u.name)
             and context.require_stats(prefix + u.name).count == 0]
    if empty:
        logger.warning("%d expert weights received no calibration tokens (%s); rule: they are pruned by "
                       "weight magnitude at the same sparsity and pattern", len(empty), ", ".join(empty))
    return empty


__all__ = ["PartialsCache", "attach_unit_hooks", "expert_token_table", "gated_input", "report_unrouted"]
