"""The shell's vocabulary-sized tensors kept in the stored dtype while the stream computes in float32.

Stage: streaming. On CPU the stream computes in float32, but a 7 B Llama's input embeddings and
untied head are 2 × 49,152 × 4,096 values: 1.6 GB as float32 for tables that, in a bfloat16
checkpoint, hold 0.8 GB of information. :func:`compute_in` keeps them as stored and upcasts only
what each call needs, with results equal to those of an upcast table:

- **input embeddings** (``nn.Embedding`` and subclasses such as Gemma's scaled embedding): each
  call runs the module's own forward on a temporary table of just the rows its tokens use
  (upcast), with the ids renumbered into it: gathering then upcasting equals upcasting then
  gathering, bit for bit, and the module's own scaling happens in float32 as before;
- **output head** (a plain ``nn.Linear``): computed in chunks of vocabulary rows, each upcast on
  the fly (``CHUNK_BYTES`` of float32 weight at a time);
- any other module handed in is upcast whole for the duration of its call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 64 << 20  # float32 bytes of head weight upcast per matmul


def _swap_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    old = module._parameters["weight"]
    module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    return old


def _gathering(module: nn.Embedding, dtype: torch.dtype) -> Callable[..., Any]:
    """``module.forward`` on the upcast rows its ids use (see the module docstring)."""
    forward = type(module).forward.__get__(module)

    def gather(ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        unique, inverse = torch.unique(ids, return_inverse=True)
        table, padding = _swap_weight(module, module.weight[unique].to(dtype)), module.padding_idx
        module.padding_idx = None  # only matters for gradients; its index means nothing in the small table
        try:
            return forward(inverse, *args, **kwargs)
        finally:
            module._parameters["weight"], module.padding_idx = table, padding

    return gather


def _chunked(module: nn.Linear, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module.forward`` (a plain Linear) over chunks of output rows, each weight chunk upcast."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        rows = max(1, CHUNK_BYTES // (weight.shape[1] * 4))
        x = x.to(dtype)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for lo in range(0, weight.shape[0], rows):
            b = None if bias is None else bias[lo : lo + rows].to(dtype)
            out[..., lo : lo + rows] = F.linear(x, weight[lo : lo + rows].to(dtype), b)
        return out

    return forward


def _whole(module: nn.Module, dtype: torch.dtype) -> None:
    """Hooks upcasting ``module.weight`` for each call, then restoring the stored one."""
    stored: list[torch.Tensor] = []

    def before(mod: nn.Module, _args: Any) -> None:
        stored.append(_swap_weight(mod, mod.weight.to(dtype)))

    def after(mod: nn.Module, _args: Any, _out: Any) -> None:
        mod._parameters["weight"] = stored.pop()

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def compute_in(module: nn.Module, dtype: torch.dtype, *, kind: str) -> None:
    """Make ``module`` (its weight kept in a narrower dtype) compute in ``dtype``, as described in the
    module docstring; ``kind`` is ``"input"`` (embeddings) or ``"output"`` (head)."""
    if kind == "input" and isinstance(module, nn.Embedding) and module.max_norm is None:
        module.forward = _gathering(module, dtype)
    elif kind == "output" and type(module) is nn.Linear:
        module.forward = _chunked(module, dtype)
    else:
        _whole(module, dtype)


__all__ = ["CHUNK_BYTES", "compute_in"]
