"""Controls that tell a winning ticket from luck (Frankle & Carbin 2019, Section 2 / Figure 4).

Stage: lottery. Both controls are trained exactly like the ticket's round (same start
iteration, schedule, data order and number of steps):

- ``random_reinit``: the ticket's mask with freshly, randomly re-initialised weights;
- ``random_mask``: a random mask with the same number of kept weights in every layer, starting
  from the same weights as the ticket (the rewind weights, or the previous round's trained
  weights for learning-rate rewinding), so only the choice of surviving weights differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from pruning_core.errors import ConfigError
from pruning_core.lottery.masking import random_masks_like
from pruning_core.lottery.runs import masked_state, snapshot, train_run
from pruning_core.lottery.training import TrainFn

if TYPE_CHECKING:
    from pruning_core.lottery.pruner import RoundPlan

CONTROLS = ("random_reinit", "random_mask")
ReinitFn = Callable[[nn.Module, torch.Generator], None]


def default_reinit_(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise ``model`` in place from ``generator``.

    Uses ``model.init_weights_(generator)`` when the model has it (the vision models do);
    otherwise every submodule's ``reset_parameters()`` under a forked global RNG seeded from
    ``generator`` (the global RNG state is restored afterwards).
    """
    init = getattr(model, "init_weights_", None)
    if callable(init):
        init(generator)
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def control_start(
    kind: str, model: nn.Module, plan: RoundPlan, *, seed: int, reinit_fn: ReinitFn = default_reinit_
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(masks, start weights)`` of control ``kind`` for the round described by ``plan``.

    Raises:
        ConfigError: unknown control name.
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "random_reinit":
        reinit_fn(model, gen)
        return plan.masks, masked_state(snapshot(model), plan.masks)
    if kind == "random_mask":
        masks = random_masks_like(plan.masks, gen)
        return masks, masked_state(plan.base_weights, masks)
    raise ConfigError("controls", f"unknown control {kind!r}; expected one of {list(CONTROLS)}")


def run_control(
    kind: str,
    model: nn.Module,
    train_fn: TrainFn,
    plan: RoundPlan,
    *,
    seed: int,
    reinit_fn: ReinitFn = default_reinit_,
) -> dict[str, float]:
    """Train control ``kind`` for the round of ``plan`` and return its metrics (plus ``density``)."""
    masks, start = control_start(kind, model, plan, seed=seed, reinit_fn=reinit_fn)
    spec = plan.spec
    control_spec = type(spec)(
        start_step=spec.start_step,
        end_step=spec.end_step,
        seed=spec.seed,
        lr_step=spec.lr_step,
        round_index=spec.round_index,
        run=kind,
    )
    metrics = train_run(model, train_fn, masks, start, control_spec)
    kept = sum(int(m.sum()) for m in masks.values())
    metrics["density"] = kept / max(1, sum(m.numel() for m in masks.values()))
    return metrics


__all__ = ["CONTROLS", "ReinitFn", "control_start", "default_reinit_", "run_control"]
