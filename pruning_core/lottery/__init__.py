"""Lottery Ticket search: iterative magnitude pruning with training, rewinding and controls.

Stage: lottery. Masks are boolean tensors per parameter name, True = keep.

- :class:`LotteryTicketConfig`: the search, validated once.
- :class:`RewindStrategy` (``Init``, ``Early(k)``, ``Late(f)``, ``LearningRate(k)``, ``NoRewind``).
- :class:`LotteryTicketPruner`: ``start`` (round 0), ``run_round`` (one resumable round),
  ``find_ticket`` (the whole search, resumable through a :class:`TicketStore`), ``apply_ticket``.
- :class:`WinningTicket`: masks, rewind and trained weights, round records; safetensors + JSON.
- :class:`TrainFn` / :class:`TrainSpec`: the training hook; :class:`ClassifierTrainFn` is a fast
  built-in for in-memory classification data.
"""

from __future__ import annotations

from pruning_core.lottery.config import LotteryTicketConfig
from pruning_core.lottery.controls import CONTROLS, control_start, default_reinit_, run_control
from pruning_core.lottery.masking import (
    apply_masks_,
    check_masks,
    magnitude_prune,
    one_shot_mask,
    prunable_parameters,
    random_masks_like,
    survivors,
)
from pruning_core.lottery.pruner import LotteryTicketPruner, RoundPlan
from pruning_core.lottery.rewind import Early, Init, Late, LearningRate, NoRewind, RewindStrategy
from pruning_core.lottery.runs import load_weights_, snapshot, train_run
from pruning_core.lottery.store import TicketStore, load_ticket, save_ticket
from pruning_core.lottery.ticket import RoundRecord, WinningTicket
from pruning_core.lottery.training import (
    ClassifierTrainFn,
    TrainFn,
    TrainingConfig,
    TrainSpec,
    derive_seed,
    evaluate,
    masked_step,
)

__all__ = [
    "CONTROLS",
    "ClassifierTrainFn",
    "Early",
    "Init",
    "Late",
    "LearningRate",
    "LotteryTicketConfig",
    "LotteryTicketPruner",
    "NoRewind",
    "RewindStrategy",
    "RoundPlan",
    "RoundRecord",
    "TicketStore",
    "TrainFn",
    "TrainSpec",
    "TrainingConfig",
    "WinningTicket",
    "apply_masks_",
    "check_masks",
    "control_start",
    "default_reinit_",
    "derive_seed",
    "evaluate",
    "load_ticket",
    "load_weights_",
    "magnitude_prune",
    "masked_step",
    "one_shot_mask",
    "prunable_parameters",
    "random_masks_like",
    "run_control",
    "save_ticket",
    "snapshot",
    "survivors",
    "train_run",
]
