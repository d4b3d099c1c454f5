"""The seed's call forms of ``prune_module`` / ``prune_sequential`` (``pruning_core.compat`` only).

Before the tensor-level contract the whole-model passes took a pruner object and a loose
``sparsity, pattern, scope`` trio::

    prune_module(model, pruner, sparsity, pattern=None, context=None, *, scope=None, ...)
    prune_sequential(model, batches, pruner, sparsity, pattern=None, *, scope=None, ...)

``pruning_core.compat.prune_module`` / ``prune_sequential`` accept them (and a compat pruner in
the method slot): this decorator turns such a call into the new one (``method, spec[, stats]``);
a call that already passes a :class:`SparsitySpec` goes straight through. The library's own
functions take only the new form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from pruning_core.masks import SparsitySpec

F = TypeVar("F", bound=Callable[..., Any])
_LEGACY_KEYWORDS = ("pruner", "sparsity", "pattern", "scope", "context")


def accepts_legacy_call(spec_position: int, *, takes_stats: bool = True) -> Callable[[F], F]:
    """Let ``fn(..., method, spec[, stats], ...)`` also be called the pre-contract way.

    Args:
        spec_position: index of the ``spec`` positional argument (the method is just before it).
        takes_stats: the old form's third value (``context``) becomes the ``stats`` argument.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            spec = args[spec_position] if len(args) > spec_position else kwargs.get("spec")
            if isinstance(spec, SparsitySpec) and not any(k in kwargs for k in _LEGACY_KEYWORDS):
                return fn(*_unwrap_method(args, kwargs, spec_position - 1), **kwargs)
            return fn(*_translate(args, kwargs, spec_position, takes_stats), **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _unwrap_method(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int) -> tuple[Any, ...]:
    """A new-form call with a compat pruner (``MagnitudePruner()``) in the method slot: its method."""
    if len(args) > pos:
        return (*args[:pos], getattr(args[pos], "method", args[pos]), *args[pos + 1 :])
    if "method" in kwargs:
        kwargs["method"] = getattr(kwargs["method"], "method", kwargs["method"])
    return args


def _translate(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, takes_stats: bool) -> tuple[Any, ...]:
    """New positional arguments from an old-form call (pops the old keywords from ``kwargs``)."""
    head, rest = list(args[: pos - 1]), list(args[pos - 1 :])
    names = ["pruner", "sparsity", "pattern"] + (["context"] if takes_stats else [])
    old = dict(zip(names, rest, strict=False))
    for key in ("pruner", "sparsity", "pattern", "context", "method", "spec", "stats"):
        if key in kwargs:
            old[{"method": "pruner", "spec": "sparsity", "stats": "context"}.get(key, key)] = kwargs.pop(key)
    scope = kwargs.pop("scope", None)
    pruner = old.get("pruner")
    method = getattr(pruner, "method", pruner)  # a compat pruner wraps a registry method
    sparsity = old.get("sparsity")
    if isinstance(sparsity, SparsitySpec):
        spec = sparsity
    else:  # the pruner's default scope (a WandaPruner(scope=LAYER) keeps LAYER)
        spec = SparsitySpec.parse(sparsity, old.get("pattern"), scope, default_scope=pruner.default_scope)
    return (*head, method, spec, *([old.get("context")] if takes_stats else []))


__all__ = ["accepts_legacy_call"]
