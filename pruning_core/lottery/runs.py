"""One training run of a search: load start weights, apply masks, train, check the masks held.

Stage: lottery. Shared by IMP rounds and the controls, so both are trained the same way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn

from pruning_core.errors import PruningError, ShapeMismatch
from pruning_core.lottery.masking import apply_masks_, check_masks, check_masks_hold, prunable_parameters
from pruning_core.lottery.training import TrainFn, TrainSpec
from pruning_core.validate import check_finite

State = dict[str, torch.Tensor]


def snapshot(model: nn.Module) -> State:
    """A detached copy of ``model.state_dict()`` (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def masked_state(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> State:
    """``state`` with every masked tensor multiplied by its mask (other entries shared, not copied)."""
    out = dict(state)
    for name, mask in masks.items():
        out[name] = state[name] * mask.to(device=state[name].device, dtype=state[name].dtype)
    return out


def load_weights_(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str = "weights") -> None:
    """Copy ``state`` into ``model`` after checking that names and shapes match exactly.

    Raises:
        ShapeMismatch: a tensor is missing from ``state`` or from the model, or has another shape
            (the message names the tensor and both shapes).
    """
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ShapeMismatch(
            f"the model's tensor names ({len(own)})",
            [len(state)],
            name=what,
            reason=f"missing from {what}: {missing[:5]}, not in the model: {extra[:5]}",
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise ShapeMismatch(
                list(own[name].shape), list(tensor.shape), name=name, reason=f"{what} vs model"
            )
    model.load_state_dict(state, strict=True)


def train_run(
    model: nn.Module,
    train_fn: TrainFn,
    masks: Mapping[str, torch.Tensor],
    start_weights: Mapping[str, torch.Tensor],
    spec: TrainSpec,
) -> dict[str, float]:
    """Load ``start_weights``, apply ``masks``, run ``train_fn``, verify the masks held.

    Returns:
        The train function's metrics (as floats) plus ``seconds``, the wall time of the run.

    Raises:
        InvalidMask: pruned weights are non-zero after training (the train function broke the contract).
        NumericalInstability: a trained weight is NaN or infinite.
    """
    check_masks(prunable_parameters(model, tuple(masks)), masks)
    load_weights_(model, start_weights, what="start weights")
    apply_masks_(model, masks)
    t0 = time.perf_counter()
    raw = train_fn(model, masks, spec)
    seconds = time.perf_counter() - t0
    check_masks_hold(model, masks)
    for name, p in model.named_parameters():
        check_finite(p.detach(), method="lottery_ticket", what="trained weight", layer=name)
    try:
        metrics = {str(k): float(v) for k, v in dict(raw or {}).items()}
    except (TypeError, ValueError) as exc:
        raise PruningError(f"train_fn must return a mapping of metric names to numbers, got {raw!r}") from exc
    metrics["seconds"] = seconds
    return metrics


__all__ = ["State", "load_weights_", "masked_state", "snapshot", "train_run"]
