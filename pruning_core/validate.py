"""Boundary checks shared by every stage: finiteness, fractions, ranks, exact prune counts.

These run at module boundaries (inputs of scoring and mask selection, statistics on finalize,
artifacts on load), never inside inner loops.
"""

from __future__ import annotations

import math

import torch

from pruning_core.errors import InvalidSparsity, NumericalInstability, ShapeMismatch


def check_finite(tensor: torch.Tensor, *, method: str, what: str = "tensor", layer: str | None = None) -> None:
    """Raise :class:`NumericalInstability` if ``tensor`` holds NaN or ±Inf.

    The message names ``what`` (e.g. "weight", "activation"), the layer, the number of bad
    values and the first bad index (as a multi-index into ``tensor``).
    """
    if not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return
    flat = int(torch.nonzero(bad.reshape(-1), as_tuple=False)[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tensor.shape)) if tensor.dim() else ()
    value = float(tensor.reshape(-1)[flat])
    kind = "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    count = int(bad.sum())
    raise NumericalInstability(
        method,
        f"{kind} detected in {what} at index {list(index)} ({count} non-finite of {tensor.numel()})",
        layer=layer,
        index=index,
    )


def check_sparsity(value: float, *, name: str | None = None, allow_one: bool = True) -> float:
    """Return ``value`` as a float if it is a finite fraction in [0, 1] (or [0, 1) if not ``allow_one``)."""
    v = float(value)
    upper_ok = v <= 1.0 if allow_one else v < 1.0
    if not (math.isfinite(v) and v >= 0.0 and upper_ok):
        interval = "[0.0, 1.0]" if allow_one else "[0.0, 1.0)"
        raise InvalidSparsity(v, f"must be a finite fraction in {interval}", name=name)
    return v


def num_to_prune(n: int, sparsity: float) -> int:
    """Exact number of elements to prune from a group of ``n``: ``floor(n * sparsity)``.

    The product is rounded to 9 decimals first so that decimal sparsities behave as written
    (``100 * 0.29`` is 28.999999999999996 in binary floating point; this returns 29).
    """
    return min(n, max(0, math.floor(round(n * sparsity, 9))))


def check_rank(tensor: torch.Tensor, rank: int, *, name: str | None = None, what: str = "tensor") -> None:
    """Raise :class:`ShapeMismatch` unless ``tensor`` has exactly ``rank`` dimensions."""
    if tensor.dim() != rank:
        raise ShapeMismatch(
            f"a {rank}-D {what}", list(tensor.shape), name=name, reason=f"got a {tensor.dim()}-D {what}"
        )


__all__ = ["check_finite", "check_rank", "check_sparsity", "num_to_prune"]
