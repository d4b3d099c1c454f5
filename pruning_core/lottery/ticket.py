"""``WinningTicket``: the complete, optimizer-free state of an IMP search after a round.

Stage: lottery. A ticket after round r holds the masks of round r, the rewind weights
captured in the dense run, the trained weights of round r (what the next round prunes and
what learning-rate rewinding starts from), and one :class:`RoundRecord` per completed round.
That is everything needed to run round r + 1, so saving a ticket after each round makes a
search resumable (:mod:`pruning_core.lottery.store`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pruning_core.lottery.masking import layer_density, overall_density
from pruning_core.masks import SparsityMask
from pruning_core.pruning.result import PruningResult


@dataclass(frozen=True)
class RoundRecord:
    """What one round produced: density reached, metrics of the IMP run and of the controls.

    Attributes:
        round: 0 for the dense run, r >= 1 for the r-th prune-rewind-retrain round.
        density: fraction of the pruned parameters kept.
        layer_density: ``{parameter name: fraction kept}``.
        metrics: the train function's metrics plus ``seconds`` (wall time of the training run).
        controls: ``{"random_reinit" | "random_mask": metrics}`` for the controls run in this round.
    """

    round: int
    density: float
    layer_density: dict[str, float]
    metrics: dict[str, float]
    controls: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "density": self.density,
            "sparsity": self.sparsity,
            "layer_density": dict(self.layer_density),
            "metrics": dict(self.metrics),
            "controls": {k: dict(v) for k, v in self.controls.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        return cls(
            round=int(d["round"]),
            density=float(d["density"]),
            layer_density={str(k): float(v) for k, v in d["layer_density"].items()},
            metrics={str(k): float(v) for k, v in d["metrics"].items()},
            controls={
                str(k): {str(a): float(b) for a, b in v.items()} for k, v in d.get("controls", {}).items()
            },
        )


@dataclass(frozen=True)
class WinningTicket:
    """The sparse subnetwork found by IMP and the state to continue the search.

    Attributes:
        masks: ``{parameter name: bool [*shape]}``, True = keep.
        rewind_weights: the model's ``state_dict`` at the rewind iteration of the dense run (unmasked).
        trained_weights: the model's ``state_dict`` after the latest round's training (masked).
        round: the last completed round (0 = dense run only).
        rewind_step: the iteration at which ``rewind_weights`` were captured.
        records: one :class:`RoundRecord` per completed round, round 0 first.
        config: the search's ``LotteryTicketConfig.to_dict(include_defaults=True)``.
        config_hash: ``LotteryTicketConfig.hashname()`` of the search.
    """

    masks: dict[str, torch.Tensor]
    rewind_weights: dict[str, torch.Tensor]
    trained_weights: dict[str, torch.Tensor]
    round: int
    rewind_step: int
    records: tuple[RoundRecord, ...]
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""

    # -- summary -----------------------------------------------------------------------------
    @property
    def total_parameters(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def remaining_parameters(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def density(self) -> float:
        return overall_density(self.masks)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def compression_ratio(self) -> float:
        """total / remaining pruned-parameter count (``inf`` when nothing remains)."""
        remaining = self.remaining_parameters
        return math.inf if remaining == 0 else self.total_parameters / remaining

    @property
    def layer_density(self) -> dict[str, float]:
        return layer_density(self.masks)

    @property
    def sparsity_history(self) -> list[float]:
        """Sparsity after each pruning round 1..round (the dense round is left out)."""
        return [r.sparsity for r in self.records if r.round >= 1]

    @property
    def metrics(self) -> list[dict[str, float]]:
        """Metrics of every completed round, round 0 first."""
        return [dict(r.metrics) for r in self.records]

    @property
    def initial_weights(self) -> dict[str, torch.Tensor]:
        """Alias of :attr:`rewind_weights` (see :mod:`pruning_core.compat`)."""
        return self.rewind_weights

    # -- persistence (safetensors + JSON, atomic) ---------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``ticket.safetensors`` and ``ticket.json`` into ``directory`` atomically."""
        from pruning_core.lottery.store import save_ticket

        save_ticket(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> WinningTicket:
        """Read a ticket written by :meth:`save` (checksum verified)."""
        from pruning_core.lottery.store import load_ticket

        return load_ticket(directory)


def apply_result(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> PruningResult:
    """The :class:`PruningResult` of applying ``masks`` to the (already masked) ``params``."""
    return PruningResult.merge([
        PruningResult.for_layer(name, params[name].detach(), SparsityMask(mask, name=name))
        for name, mask in masks.items()
    ])


__all__ = ["RoundRecord", "WinningTicket", "apply_result"]
