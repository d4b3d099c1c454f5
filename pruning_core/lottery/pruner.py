"""``LotteryTicketPruner``: iterative magnitude pruning with training, rewinding and controls.

Stage: lottery. The search (Frankle & Carbin 2019, arXiv:1803.03635, Section 1 "Identifying
winning tickets"; rewinding: Frankle et al. 2019/2020; learning-rate rewinding: Renda et al. 2020):

    round 0: train the dense model from its initialisation, capturing the weights at the rewind
             iteration k                                                          (start)
    round r: prune p of the remaining weights by magnitude (globally or per layer), rewind the
             survivors (strategy), retrain; the masks stay applied throughout     (run_round)

Each round is one call that maps a :class:`WinningTicket` (the complete state after round r-1)
to the ticket after round r, so a search can be checkpointed and resumed between rounds
(:meth:`LotteryTicketPruner.find_ticket` with a ``store``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.errors import ConfigError
from pruning_core.lottery.config import LotteryTicketConfig
from pruning_core.lottery.controls import CONTROLS, ReinitFn, default_reinit_, run_control
from pruning_core.lottery.masking import (
    apply_masks_,
    check_masks,
    dense_masks,
    layer_density,
    magnitude_prune,
    overall_density,
    prunable_parameters,
)
from pruning_core.lottery.runs import State, load_weights_, masked_state, snapshot, train_run
from pruning_core.lottery.store import TicketStore
from pruning_core.lottery.ticket import RoundRecord, WinningTicket, apply_result
from pruning_core.lottery.training import TrainFn, TrainSpec, derive_seed
from pruning_core.pruning.result import PruningResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPlan:
    """Everything round ``round_index`` trains from (computed from the previous ticket alone).

    Attributes:
        round_index: the round, >= 1.
        masks: the round's boolean masks (a subset of the previous ones).
        base_weights: unmasked weights the round starts from (rewind or previous trained weights).
        start_weights: ``base_weights`` with the masks applied.
        spec: the training run (start iteration, end, data seed, learning-rate hold).
    """

    round_index: int
    masks: dict[str, torch.Tensor]
    base_weights: State
    start_weights: State
    spec: TrainSpec


class LotteryTicketPruner:
    """Finds winning tickets by IMP with real training (see the module docstring).

    Args:
        config: the search configuration (default: ``LotteryTicketConfig()``, s = 0.9 in 10 rounds).
        reinit_fn: how the ``random_reinit`` control re-initialises a model (default
            :func:`~pruning_core.lottery.controls.default_reinit_`).
    """

    def __init__(
        self, config: LotteryTicketConfig | None = None, *, reinit_fn: ReinitFn = default_reinit_
    ) -> None:
        self._config = config or LotteryTicketConfig()
        self.reinit_fn = reinit_fn

    @property
    def config(self) -> LotteryTicketConfig:
        return self._config

    @property
    def data_seed(self) -> int:
        """Seed of the data order, shared by every round and control of the search."""
        return derive_seed(self._config.seed, "data")

    # -- one round at a time --------------------------------------------------------------------
    def start(self, model: nn.Module, train_fn: TrainFn) -> WinningTicket:
        """Round 0: train the dense ``model`` from its current weights, capturing the rewind point.

        Returns:
            The ticket after round 0 (all-True masks).

        Raises:
            ConfigError: ``layers`` / ``layer_rates`` name parameters the model does not have, or
                ``train_fn`` never called ``spec.on_capture`` at the rewind iteration.
        """
        cfg = self._config
        params = prunable_parameters(model, cfg.layers)
        unknown = sorted(set(dict(cfg.layer_rates)) - set(params))
        if unknown:
            raise ConfigError("layer_rates", f"{unknown} are not pruned parameters; pruned: {list(params)}")
        masks, init = dense_masks(params), snapshot(model)
        k, captured = cfg.rewind_step, {}
        spec = TrainSpec(
            start_step=0,
            end_step=cfg.training_steps,
            seed=self.data_seed,
            capture_steps=(k,) if k else (),
            on_capture=lambda step, m: captured.setdefault("weights", snapshot(m)),
            round_index=0,
        )
        metrics = train_run(model, train_fn, masks, init, spec)
        rewind = init if k == 0 else captured.get("weights")
        if rewind is None:
            raise ConfigError(
                "train_fn",
                f"did not call spec.on_capture at the rewind iteration {k} ({cfg.rewind_strategy})",
            )
        record = RoundRecord(0, 1.0, layer_density(masks), metrics)
        logger.info("round 0 (dense): %s", _fmt(metrics))
        return WinningTicket(
            masks=masks,
            rewind_weights=rewind,
            trained_weights=snapshot(model),
            round=0,
            rewind_step=k,
            records=(record,),
            config=cfg.to_dict(include_defaults=True),
            config_hash=cfg.hashname(),
        )

    def plan_round(self, ticket: WinningTicket) -> RoundPlan:
        """Masks, start weights and training run of the round after ``ticket`` (pure; no training)."""
        self._check_ticket(ticket)
        cfg, strategy = self._config, self._config.rewind_strategy
        r = ticket.round + 1
        weights = {n: ticket.trained_weights[n] for n in ticket.masks}
        masks = magnitude_prune(cfg, weights, ticket.masks, r)
        base = ticket.rewind_weights if strategy.rewinds_weights else ticket.trained_weights
        spec = TrainSpec(
            start_step=strategy.rewind_step(cfg.training_steps),
            end_step=cfg.training_steps,
            seed=self.data_seed,
            lr_step=cfg.training_steps - 1 if strategy.holds_final_lr else None,
            round_index=r,
        )
        return RoundPlan(r, masks, base, masked_state(base, masks), spec)

    def run_round(
        self, model: nn.Module, train_fn: TrainFn, ticket: WinningTicket, *, controls: Sequence[str] = ()
    ) -> WinningTicket:
        """Prune, rewind and retrain once; optionally train the controls of this round too.

        Args:
            model: a model of the ticket's architecture (its current weights are overwritten).
            train_fn: the training function (see :mod:`pruning_core.lottery.training`).
            ticket: the state after the previous round.
            controls: any of ``"random_reinit"``, ``"random_mask"``.

        Returns:
            The state after this round; ``model`` holds this round's trained IMP weights.
        """
        self._check_runnable(ticket, controls)
        plan = self.plan_round(ticket)
        metrics = train_run(model, train_fn, plan.masks, plan.start_weights, plan.spec)
        trained = snapshot(model)
        results = {
            kind: run_control(
                kind,
                model,
                train_fn,
                plan,
                seed=derive_seed(self._config.seed, kind, plan.round_index),
                reinit_fn=self.reinit_fn,
            )
            for kind in controls
        }
        if results:
            load_weights_(model, trained)
        record = RoundRecord(
            plan.round_index, overall_density(plan.masks), layer_density(plan.masks), metrics, results
        )
        logger.info("round %d: density %.4f %s", plan.round_index, record.density, _fmt(metrics))
        return dataclasses.replace(
            ticket,
            masks=plan.masks,
            trained_weights=trained,
            round=plan.round_index,
            records=(*ticket.records, record),
        )

    def _check_runnable(self, ticket: WinningTicket, controls: Sequence[str]) -> None:
        unknown = [c for c in controls if c not in CONTROLS]
        if unknown:
            raise ConfigError("controls", f"unknown control(s) {unknown}; expected any of {list(CONTROLS)}")
        if ticket.round >= self._config.pruning_rounds:
            raise ConfigError(
                "pruning_rounds", f"the search is complete: round {ticket.round} of {self._config.pruning_rounds}"
            )

    def _check_ticket(self, ticket: WinningTicket) -> None:
        if ticket.config_hash != self._config.hashname():
            raise ConfigError(
                "config",
                f"the ticket was produced by a search with config hash {ticket.config_hash!r}, "
                f"this pruner's config hashes to {self._config.hashname()!r}",
            )

    def is_done(self, ticket: WinningTicket) -> bool:
        """True after ``pruning_rounds`` rounds, or (explicit rate) once ``target_sparsity`` is reached."""
        cfg = self._config
        if ticket.round >= cfg.pruning_rounds:
            return True
        return cfg.stops_at_target and ticket.round >= 1 and ticket.sparsity >= (cfg.target_sparsity or 0.0)

    # -- the whole search --------------------------------------------------------------------
    def find_ticket(
        self,
        model: nn.Module,
        train_fn: TrainFn,
        *,
        store: TicketStore | str | os.PathLike[str] | None = None,
        controls: Sequence[str] = (),
        on_round: Callable[[WinningTicket], None] | None = None,
        progress: bool = True,
    ) -> WinningTicket:
        """Run (or resume) the search and return the final ticket.

        With a ``store``, the state is saved after every round and a rerun resumes after the last
        completed round (no finished round is redone). For a fresh start the caller must pass a
        model with the same initial weights as the first attempt (e.g. the same seed).

        Returns:
            The ticket after the last round; ``model`` holds its trained weights.
        """
        st = TicketStore(store) if isinstance(store, (str, os.PathLike)) else store
        ticket = st.latest(config_hash=self._config.hashname()) if st is not None else None
        if ticket is None:
            ticket = self._finish_round(self.start(model, train_fn), st, on_round)
        else:
            logger.info("resuming %s after round %d", st.root if st else "", ticket.round)
        with tqdm(
            total=self._config.pruning_rounds, initial=ticket.round, disable=not progress, desc="IMP rounds"
        ) as bar:
            while not self.is_done(ticket):
                ticket = self._finish_round(
                    self.run_round(model, train_fn, ticket, controls=controls), st, on_round
                )
                bar.update(1)
        load_weights_(model, ticket.trained_weights)
        return ticket

    @staticmethod
    def _finish_round(
        ticket: WinningTicket, store: TicketStore | None, on_round: Callable[[WinningTicket], None] | None
    ) -> WinningTicket:
        if store is not None:
            store.save(ticket)
        if on_round is not None:
            on_round(ticket)
        return ticket

    def apply_ticket(
        self, model: nn.Module, ticket: WinningTicket, *, weights: str | None = None
    ) -> PruningResult:
        """Load a ticket into ``model`` (e.g. a freshly built one) and zero its pruned weights.

        Args:
            weights: ``"rewind"`` (the captured rewind weights), ``"trained"`` (the latest round's
                trained weights) or ``"current"`` (keep the model's weights, only mask them). Default:
                ``"rewind"`` for weight-rewinding strategies, else ``"current"``.

        Raises:
            ConfigError: unknown ``weights``.
            InvalidMask / ShapeMismatch: the ticket's names or shapes do not fit ``model``.
        """
        choice = weights or ("rewind" if self._config.rewind_strategy.rewinds_weights else "current")
        sources = {"rewind": ticket.rewind_weights, "trained": ticket.trained_weights, "current": None}
        if choice not in sources:
            raise ConfigError("weights", f"expected one of {list(sources)}, got {weights!r}")
        params = dict(model.named_parameters())
        missing = sorted(set(ticket.masks) - set(params))
        if missing:
            raise ConfigError("model", f"the ticket prunes {missing}, which the model does not have")
        check_masks({n: params[n] for n in ticket.masks}, ticket.masks)
        state = sources[choice]
        if state is not None:
            load_weights_(model, state, what=f"ticket {choice} weights")
        apply_masks_(model, ticket.masks)
        return apply_result(ticket.masks, params)


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


__all__ = ["LotteryTicketPruner", "RoundPlan"]
