"""How a decoder layer is called: recorded arguments, replay, and forward stubs.

Stage: streaming (used by :mod:`pruning_core.lm.stream`). :class:`LayerCall` keeps what a model's
forward passed one decoder layer (positional and keyword arguments, the hidden states excluded)
so the layer can be called again alone; tensors passed to several layers (masks, rotary
embeddings) are stored once (:func:`capture` deduplicates by identity) and KV caches are dropped
(replaced by None: a required argument is never removed). :class:`OutputSpec` says whether a
layer returns a tensor or a tuple, so a stub standing in for the layer returns the same shape of
value. :func:`stubbed` swaps the layers' ``forward`` for such stubs while keeping the module
objects (the model still reads attributes such as ``attention_type`` from them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning_core.errors import ConfigError


class StopForward(BaseException):
    """Private signal that ends a recording forward pass at the last decoder layer (never an error)."""


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def capture(value: Any, memo: dict[int, tuple[Any, Any]], device: torch.device) -> Any:
    """``value`` with tensors moved to ``device`` once per object (``memo``) and caches dropped."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:  # the original stays referenced, so its id cannot be reused
            memo[id(value)] = (value, value.detach().to(device))
        return memo[id(value)][1]
    if _is_cache(value):
        return None
    if isinstance(value, tuple | list | dict):
        return _rebuild(value, lambda v: capture(v, memo, device))
    return value


def _rebuild(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``value`` (tuple, named tuple, list or dict) with ``fn`` applied to each item."""
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    items = [fn(v) for v in value]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*items)
    return type(value)(items)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list | dict):
        return _rebuild(value, lambda v: _to(v, device))
    return value


@dataclass
class LayerCall:
    """What the model passed one decoder layer for one batch, hidden states excluded."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_keyword: bool = False  # the hidden states came as ``hidden_states=``

    @classmethod
    def split(cls, args: tuple[Any, ...], kwargs: dict[str, Any], memo: dict[int, tuple[Any, Any]],
              device: torch.device) -> tuple[torch.Tensor, LayerCall]:
        """``(hidden states, the rest)`` of one layer call, captured (see :func:`capture`)."""
        if args:
            return args[0], cls(capture(args[1:], memo, device), capture(kwargs, memo, device))
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], cls((), capture(rest, memo, device), True)

    def __call__(self, block: nn.Module, hidden: torch.Tensor, device: torch.device) -> Any:
        args, kwargs = _to(self.args, device), _to(self.kwargs, device)
        if self.hidden_keyword:
            return block(*args, hidden_states=hidden, **kwargs)
        return block(hidden, *args, **kwargs)


@dataclass(frozen=True)
class OutputSpec:
    """What a decoder layer returns: a tensor (``arity`` None) or a tuple of ``arity`` items."""

    arity: int | None

    @classmethod
    def of(cls, output: Any) -> OutputSpec:
        if isinstance(output, torch.Tensor):
            return cls(None)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return cls(len(output))
        raise ConfigError("model", f"a decoder layer returned {type(output).__name__}; "
                                   "expected a tensor or a tuple that starts with the hidden states")

    def wrap(self, hidden: torch.Tensor) -> Any:
        return hidden if self.arity is None else (hidden,) + (None,) * (self.arity - 1)

    def unwrap(self, output: Any) -> torch.Tensor:
        return output if self.arity is None else output[0]


@contextlib.contextmanager
def stubbed(blocks: nn.ModuleList, stubs: list[Callable[..., Any]]) -> Iterator[None]:
    """Swap each block's ``forward`` for a stub (instance attribute), restoring it afterwards."""
    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        for block, stub in zip(blocks, stubs, strict=True):
            block.forward = stub
        yield
    finally:
        for block, old in zip(blocks, saved, strict=True):
            block.__dict__.pop("forward", None)
            if old is not None:
                block.forward = old


__all__ = ["LayerCall", "OutputSpec", "StopForward", "capture", "stubbed"]
