"""One threshold across all layers' scores, holding one layer's scores at a time.

Stage: masks. :func:`plan_global_selection` gives exactly the masks of
:func:`pruning_core.masks.generate.generate_global_masks` (``floor(total * s)`` lowest scores
pruned overall; equal scores kept by (layer order, flat index)) without concatenating the scores:
a radix selection over the scores' order-preserving 64-bit keys (each score as float64, ``-0.0``
as ``+0.0``, its bits read as an int64 whose order is the float order). Each pass reads the
layers one at a time through ``load``:

1. counts every layer and histograms the top 16 bits of the keys: the bucket holding the
   ``k``-th smallest key, and how many keys lie below it;
2. while that bucket holds more than ``collect_limit`` keys, histograms its next 16 bits;
3. collects the bucket's keys (at most ``collect_limit``, tagged by layer; or, when all 64 bits
   are fixed, just counts them): the exact ``k``-th smallest key, and per layer how many scores
   exceed it and equal it, hence how many of its ties each layer keeps.

Memory: one layer's scores plus ``65536`` counts plus ``collect_limit`` collected keys; three
or four reads of every layer. :meth:`GlobalSelection.mask` then builds each layer's mask from
its scores alone, so a caller can write them one at a time (and resume: the plan is JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pruning_core.masks.select import prepare_scores
from pruning_core.validate import check_sparsity, num_to_prune

COLLECT_LIMIT = 1 << 22  # keys collected in memory for the exact selection (32 MiB of int64)
_DIGIT, _BINS = 16, 1 << 16


def order_keys(scores: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """``[numel]`` int64 keys ordered like the scores as float64 (``-0.0`` equal to ``+0.0``)."""
    x = prepare_scores(scores, name=name).reshape(-1).to(torch.float64) + 0.0  # -0.0 + 0.0 == +0.0
    bits = x.view(torch.int64)
    return bits ^ ((bits >> 63) & torch.iinfo(torch.int64).max)  # negatives: flip the magnitude bits


def _key_value(key: int) -> float:
    bits = key ^ ((key >> 63) & ((1 << 63) - 1))
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64)[0])


@dataclass(frozen=True)
class GlobalSelection:
    """Which scores survive a global selection: those above ``threshold``, and per layer its first
    ``ties[layer]`` scores equal to it (flat order). ``threshold`` None: keep ``keep_all`` or none."""

    threshold: float | None
    ties: dict[str, int] = field(default_factory=dict)
    keep_all: bool = True

    def mask(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """The keep-mask (bool, shaped like ``scores``) of layer ``name``."""
        if self.threshold is None:
            return torch.full(scores.shape, self.keep_all, dtype=torch.bool, device=scores.device)
        x = prepare_scores(scores, name=name).to(torch.float64).reshape(-1)
        keep = x > self.threshold
        tied = torch.nonzero(x == self.threshold).reshape(-1)[: self.ties.get(name, 0)]
        keep[tied] = True
        return keep.reshape(scores.shape)

    def to_dict(self) -> dict:
        value = None if self.threshold is None else self.threshold.hex()
        return {"threshold": value, "ties": dict(self.ties), "keep_all": self.keep_all}

    @classmethod
    def from_dict(cls, data: dict) -> GlobalSelection:
        value = data["threshold"]
        return cls(None if value is None else float.fromhex(value), dict(data["ties"]), bool(data["keep_all"]))


def _histogram(names: Sequence[str], load: Callable[[str], torch.Tensor], depth: int,
               prefix: int) -> tuple[torch.Tensor, int, dict[str, int]]:
    """Counts of the next 16-bit digit of the keys whose top ``16 * depth`` bits are ``prefix``
    (every key at depth 0), the digit's offset, and the number of scores per layer."""
    shift, counts, sizes = 64 - _DIGIT * (depth + 1), torch.zeros(_BINS, dtype=torch.int64), {}
    base = -(_BINS // 2) if depth == 0 else prefix << _DIGIT
    for name in names:
        keys = order_keys(load(name), name=name)
        sizes[name] = keys.numel()
        if depth:
            keys = keys[(keys >> (shift + _DIGIT)) == prefix]
        counts += torch.bincount((keys >> shift) - base, minlength=_BINS)
    return counts, base, sizes


def _narrow(names: Sequence[str], load: Callable[[str], torch.Tensor], counts: torch.Tensor, base: int,
            rank: int, collect_limit: int) -> tuple[int, int, int]:
    """``(depth, prefix, rank within the bucket)`` of the first bucket holding the ``rank``-th smallest
    key (0-based) with at most ``collect_limit`` keys, or of the key itself (depth 4: 64 bits fixed)."""
    depth = 0
    while True:
        cumulative = torch.cumsum(counts, 0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(rank), right=True))
        rank -= int(cumulative[bucket - 1]) if bucket else 0
        prefix, depth = base + bucket, depth + 1
        if int(counts[bucket]) <= collect_limit or depth == 64 // _DIGIT:
            return depth, prefix, rank
        counts, base, _ = _histogram(names, load, depth, prefix)


def _resolve(names: Sequence[str], load: Callable[[str], torch.Tensor], depth: int, prefix: int,
             rank: int) -> tuple[int, dict[str, int], torch.Tensor, torch.Tensor]:
    """The exact key, and per layer: scores below the bucket, in the bucket below the key, equal to it."""
    shift, below, keys_in, layer_in = 64 - _DIGIT * depth, {}, [], []
    exact = depth == 64 // _DIGIT  # the bucket is one key: count it, collect nothing
    for i, name in enumerate(names):
        keys = order_keys(load(name), name=name)
        high = keys >> shift
        below[name] = int((high < prefix).sum())
        inside = keys[high == prefix]
        keys_in.append(inside[:0] if exact else inside)
        layer_in.append(torch.full((inside.numel(),), i, dtype=torch.int64))
    layers = torch.cat(layer_in)
    if exact:
        return prefix, below, torch.zeros(len(names), dtype=torch.int64), torch.bincount(layers, minlength=len(names))
    keys = torch.cat(keys_in)
    key = int(torch.kthvalue(keys, rank + 1).values)
    less = torch.bincount(layers[keys < key], minlength=len(names))
    return key, below, less, torch.bincount(layers[keys == key], minlength=len(names))


def plan_global_selection(names: Sequence[str], load: Callable[[str], torch.Tensor], sparsity: float, *,
                          collect_limit: int = COLLECT_LIMIT) -> GlobalSelection:
    """The global selection of ``sparsity`` over the layers ``names`` (in this order), reading each
    layer's scores (any shape; higher = keep) with ``load(name)``, one layer at a time (see the
    module docstring). ``selection.mask(name, load(name))`` equals
    ``generate_global_masks({n: load(n) for n in names}, sparsity)[name]``.

    Raises:
        InvalidSparsity: ``sparsity`` outside [0, 1].
        NumericalInstability: a non-finite score (names the layer).
    """
    s = check_sparsity(sparsity)
    counts, base, sizes = _histogram(names, load, 0, 0)
    total = sum(sizes.values())
    k = num_to_prune(total, s)
    if k in (0, total):
        return GlobalSelection(None, keep_all=k == 0)
    depth, prefix, rank = _narrow(names, load, counts, base, k - 1, collect_limit)
    key, below, less, equal = _resolve(names, load, depth, prefix, rank)
    greater = sum(sizes[n] - below[n] - int(less[i]) - int(equal[i]) for i, n in enumerate(names))
    to_keep, ties = total - k - greater, {}
    for i, name in enumerate(names):  # ties are kept in (layer order, flat index) order
        ties[name] = min(int(equal[i]), to_keep)
        to_keep -= ties[name]
    return GlobalSelection(_key_value(key), ties)


__all__ = ["COLLECT_LIMIT", "GlobalSelection", "order_keys", "plan_global_selection"]
