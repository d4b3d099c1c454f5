"""The seed's Lottery Ticket surface: the builder and the ``Pruner`` methods of the pruner.

Stage: compat (see :mod:`pruning_core.compat`). :class:`LotteryTicketPruner` here is the
library's :class:`pruning_core.lottery.LotteryTicketPruner` plus the seed's ``builder()``,
``with_config``, ``name`` and its ``Pruner`` methods (``generate_mask``, ``apply_mask``).
:class:`LotteryTicketPrunerBuilder` records every setter and validates all values at once through
:class:`LotteryTicketConfig` in :meth:`~LotteryTicketPrunerBuilder.build` (never clamps).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pruning_core.errors import ConfigError
from pruning_core.lottery import LotteryTicketConfig, RewindStrategy, apply_masks_, check_masks, one_shot_mask
from pruning_core.lottery import LotteryTicketPruner as _LotteryTicketPruner
from pruning_core.lottery.ticket import apply_result
from pruning_core.masks import SparsityMask, SparsityPattern
from pruning_core.pruning.result import PruningResult


class LotteryTicketPruner(_LotteryTicketPruner):
    """:class:`pruning_core.lottery.LotteryTicketPruner` with the seed's extra methods."""

    @staticmethod
    def builder() -> LotteryTicketPrunerBuilder:
        """``LotteryTicketPruner.builder().target_sparsity(0.95).pruning_rounds(20).build()``."""
        return LotteryTicketPrunerBuilder()

    def with_config(self, config: LotteryTicketConfig) -> LotteryTicketPruner:
        return LotteryTicketPruner(config, reinit_fn=self.reinit_fn)

    @property
    def name(self) -> str:
        """``"lottery_ticket_pruner"``."""
        return "lottery_ticket_pruner"

    def generate_mask(
        self, scores: torch.Tensor, target_sparsity: float, pattern: SparsityPattern | None = None
    ) -> SparsityMask:
        """One-shot magnitude mask, unstructured only: :func:`~pruning_core.lottery.one_shot_mask`."""
        return one_shot_mask(scores, target_sparsity, pattern)

    def apply_mask(self, module: nn.Module, mask: SparsityMask | torch.Tensor, *,
                   name: str = "weight") -> PruningResult:
        """Zero ``module.<name>`` where ``mask`` is False (in place) and report the sparsity."""
        params = dict(module.named_parameters())
        if name not in params:
            raise ConfigError("name", f"module has no parameter {name!r}; it has {list(params)}")
        keep = mask.tensor if isinstance(mask, SparsityMask) else mask
        check_masks({name: params[name]}, {name: keep})
        apply_masks_(module, {name: keep})
        return apply_result({name: keep}, params)


class LotteryTicketPrunerBuilder:
    """``LotteryTicketPrunerBuilder().target_sparsity(0.95).pruning_rounds(20).build()``.

    Values are validated by :meth:`build` (through :class:`LotteryTicketConfig`).
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


__all__ = ["LotteryTicketPruner", "LotteryTicketPrunerBuilder"]
