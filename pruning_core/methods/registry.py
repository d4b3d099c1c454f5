"""The registry of one-shot methods: name -> method class, one line per method.

Stage: methods. Adding a method is one file in :mod:`pruning_core.methods` (a
:class:`~pruning_core.methods.base.BaseMethod` subclass with a ``score``) plus one line here.
"""

from __future__ import annotations

import dataclasses

from pruning_core.errors import ConfigError
from pruning_core.methods.base import Method
from pruning_core.methods.magnitude import Magnitude
from pruning_core.methods.sparsegpt import SparseGPT
from pruning_core.methods.wanda import Wanda

METHODS: dict[str, type[Method]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
}


def method_options(name: str) -> list[str]:
    """The option names ``get_method(name, ...)`` accepts (the method's dataclass fields)."""
    cls = _method_class(name)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def get_method(name: str, **options: object) -> Method:
    """The method registered as ``name``, built with ``options`` (validated by the method).

    Example: ``get_method("sparsegpt", blocksize=64)``.

    Raises:
        ConfigError: an unknown name (lists the registered ones), an unknown option (lists the
            method's options), or an option value the method rejects.
    """
    cls = _method_class(name)
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) if allowed else "none"
        raise ConfigError(unknown[0], f"method {name!r} has no option(s) {unknown}; its options: {listed}")
    return cls(**options)


def _method_class(name: str) -> type[Method]:
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError("method", f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return cls


__all__ = ["METHODS", "get_method", "method_options"]
