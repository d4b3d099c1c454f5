"""Seed-style builder of :class:`LotteryTicketPruner` (the seed's ``LotteryTicketPrunerBuilder``).

Stage: lottery. Every setter records a field; :meth:`LotteryTicketPrunerBuilder.build`
validates them all at once through :class:`LotteryTicketConfig` (the seed clamped silently).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pruning_core.lottery.config import LotteryTicketConfig
from pruning_core.lottery.pruner import LotteryTicketPruner
from pruning_core.lottery.rewind import RewindStrategy


class LotteryTicketPrunerBuilder:
    """Seed-style builder: ``LotteryTicketPruner.builder().target_sparsity(0.95).pruning_rounds(20).build()``.

    Values are validated by :meth:`build` (the seed clamped them silently).
    """

    def __init__(self) -> None:
        self._fields: dict[str, Any] = {}

    def _set(self, name: str, value: Any) -> LotteryTicketPrunerBuilder:
        self._fields[name] = value
        return self

    def target_sparsity(self, s: float | None) -> LotteryTicketPrunerBuilder:
        return self._set("target_sparsity", s)

    def pruning_rounds(self, r: int) -> LotteryTicketPrunerBuilder:
        return self._set("pruning_rounds", r)

    def rewind_strategy(self, strategy: RewindStrategy | str) -> LotteryTicketPrunerBuilder:
        return self._set("rewind_strategy", strategy)

    def global_pruning(self, flag: bool) -> LotteryTicketPrunerBuilder:
        return self._set("global_pruning", flag)

    def prune_rate_per_round(self, p: float) -> LotteryTicketPrunerBuilder:
        return self._set("prune_rate_per_round", p)

    def layer_rates(self, rates: Mapping[str, float]) -> LotteryTicketPrunerBuilder:
        return self._set("layer_rates", dict(rates))

    def layers(self, names: tuple[str, ...] | list[str]) -> LotteryTicketPrunerBuilder:
        return self._set("layers", tuple(names))

    def training_steps(self, steps: int) -> LotteryTicketPrunerBuilder:
        return self._set("training_steps", steps)

    def seed(self, seed: int) -> LotteryTicketPrunerBuilder:
        return self._set("seed", seed)

    def build_config(self) -> LotteryTicketConfig:
        return LotteryTicketConfig(**self._fields)

    def build(self) -> LotteryTicketPruner:
        return LotteryTicketPruner(self.build_config())


__all__ = ["LotteryTicketPrunerBuilder"]
