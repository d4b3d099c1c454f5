"""Fixed sparsity masks during recovery training: capture, enforce, verify.

Stage: recovery. A mask is a bool tensor shaped like its layer's weight, ``True`` = keep (as in
``pruning_core.masks``). Masks are keyed by the layer's module name
(``"model.layers.0.mlp.up_proj"``). Holding every pruned weight at exactly zero also preserves
any structure the mask has (N:M, rows, blocks): the set of zeros can only grow if training
drives a kept weight to exactly 0, never shrink.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from pruning_core.errors import InvalidMask, ShapeMismatch
from pruning_core.pruning.model import target_layers

LayerFilter = Callable[[str, nn.Module], bool]


def capture_masks(model: nn.Module, *, filter_fn: LayerFilter | None = None) -> dict[str, torch.Tensor]:
    """Keep masks (``weight != 0``) of the layers ``prune_module`` would prune (default: every
    ``nn.Linear`` but the output head), by module name."""
    return {name: module.weight.detach() != 0 for name, module in target_layers(model, filter_fn).items()}


def _weight(model: nn.Module, name: str, mask: torch.Tensor) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    if weight.shape != mask.shape:
        raise ShapeMismatch(list(weight.shape), list(mask.shape), name=name, reason="mask must match the weight")
    return weight


def enforce_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every pruned weight of ``model`` in place (``weight *= mask``)."""
    with torch.no_grad():
        for name, mask in masks.items():
            weight = _weight(model, name, mask)
            weight.mul_(mask.to(weight.device, weight.dtype))


def verify_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Check that every pruned weight is exactly zero; returns the number of pruned weights.

    Raises:
        InvalidMask: a pruned weight is non-zero (names the layer, the count and the first index).
    """
    pruned = 0
    for name, mask in masks.items():
        weight = _weight(model, name, mask).detach()
        bad = (weight != 0) & ~mask.to(weight.device)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise InvalidMask(f"{int(bad.sum())} pruned weights are non-zero (first at {first})", name=name)
        pruned += int((~mask).sum())
    return pruned


__all__ = ["capture_masks", "enforce_masks_", "verify_masks"]
