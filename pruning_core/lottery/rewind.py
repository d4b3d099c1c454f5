"""Rewind strategies: where the surviving weights and the learning-rate schedule restart after pruning.

Stage: lottery. Each strategy answers three questions, and the answers differ between them:

| strategy | weights at the start of a retraining run | schedule / data resume at | source |
|---|---|---|---|
| ``Init()`` | the initial weights (iteration 0) | 0 | Frankle & Carbin 2019, arXiv:1803.03635 |
| ``Early(iteration=k)`` | the weights captured at iteration k of the dense run | k | Frankle et al. 2019/2020, arXiv:1903.01611, 1912.05671 |
| ``Late(fraction=f)`` | as ``Early`` with k = floor(f · training_steps) | k | the same ("late resetting") |
| ``LearningRate(iteration=k)`` | the trained weights of the previous round (not rewound) | k (the schedule is replayed) | Renda et al. 2020, arXiv:2003.02389 |
| ``NoRewind()`` | the trained weights of the previous round | 0, with the learning rate held at its final value (fine-tuning) | Renda et al.'s fine-tuning baseline |

With a constant learning rate ``LearningRate(0)`` and ``NoRewind()`` train identically; they
differ under a schedule (milestones, warm-up).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from pruning_core.errors import ConfigError

_FIELD = "rewind_strategy"


class RewindStrategy:
    """Base of the five strategies: ``RewindStrategy.Init()``, ``.Early(k)``, ``.Late(f)``,
    ``.LearningRate(k)``, ``.NoRewind()``. Parse strings with :meth:`parse`."""

    Init: type[Init]
    Early: type[Early]
    Late: type[Late]
    LearningRate: type[LearningRate]
    NoRewind: type[NoRewind]

    #: True if surviving weights are reset to the captured rewind point after pruning.
    rewinds_weights: ClassVar[bool] = True
    #: True if retraining holds the learning rate at its final value (fine-tuning).
    holds_final_lr: ClassVar[bool] = False

    def rewind_step(self, training_steps: int) -> int:
        """The iteration whose weights are captured in the dense run and where retraining resumes."""
        return 0

    def check(self, training_steps: int) -> None:
        """Raise :class:`ConfigError` if the strategy cannot be used with ``training_steps``."""
        step = self.rewind_step(training_steps)
        if not 0 <= step < training_steps:
            raise ConfigError(
                _FIELD,
                f"{self} rewinds to iteration {step}, beyond the training length "
                f"training_steps={training_steps} (need 0 <= iteration < training_steps)",
            )

    @staticmethod
    def parse(text: str | RewindStrategy) -> RewindStrategy:
        """Parse ``init``, ``early:K``, ``late:F``, ``lr`` / ``lr:K`` or ``none``.

        Raises:
            ConfigError: unknown strategy name or malformed argument.
        """
        if isinstance(text, RewindStrategy):
            return text
        if not isinstance(text, str):
            raise ConfigError(_FIELD, f"expected a RewindStrategy or a string, got {type(text).__name__}")
        t = text.strip().lower()
        if t == "init":
            return Init()
        if t in ("none", "no_rewind"):
            return NoRewind()
        if t in ("lr", "learning_rate"):
            return LearningRate()
        if m := re.fullmatch(r"(early|lr|learning_rate):(\d+)", t):
            k = int(m.group(2))
            return Early(k) if m.group(1) == "early" else LearningRate(k)
        if m := re.fullmatch(r"late:([0-9.eE+-]+)", t):
            try:
                return Late(float(m.group(1)))
            except ValueError as exc:
                raise ConfigError(_FIELD, f"cannot parse the fraction in {text!r}") from exc
        raise ConfigError(
            _FIELD,
            f"unknown rewind strategy {text!r}; expected one of: init, early:K, late:F, lr, lr:K, none",
        )


def _check_iteration(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(_FIELD, f"iteration must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class Init(RewindStrategy):
    """Rewind survivors to their initial values (Frankle & Carbin 2019)."""

    def __str__(self) -> str:
        return "init"


@dataclass(frozen=True)
class Early(RewindStrategy):
    """Rewind survivors to their values at ``iteration`` of the dense run (weight rewinding)."""

    iteration: int

    def __post_init__(self) -> None:
        _check_iteration(self.iteration)

    def rewind_step(self, training_steps: int) -> int:
        return self.iteration

    def __str__(self) -> str:
        return f"early:{self.iteration}"


@dataclass(frozen=True)
class Late(RewindStrategy):
    """Rewind to iteration ``floor(fraction · training_steps)`` ("late resetting")."""

    fraction: float

    def __post_init__(self) -> None:
        f = self.fraction
        if (
            isinstance(f, bool)
            or not isinstance(f, (int, float))
            or not (math.isfinite(f) and 0.0 <= f < 1.0)
        ):
            raise ConfigError(_FIELD, f"late fraction must be a finite number in [0, 1), got {f!r}")

    def rewind_step(self, training_steps: int) -> int:
        return math.floor(round(self.fraction * training_steps, 9))

    def __str__(self) -> str:
        return f"late:{self.fraction!r}"


@dataclass(frozen=True)
class LearningRate(RewindStrategy):
    """Learning-rate rewinding (Renda et al. 2020): keep the trained weights, replay the schedule from ``iteration``."""

    iteration: int = 0
    rewinds_weights: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_iteration(self.iteration)

    def rewind_step(self, training_steps: int) -> int:
        return self.iteration

    def __str__(self) -> str:
        return f"lr:{self.iteration}" if self.iteration else "lr"


@dataclass(frozen=True)
class NoRewind(RewindStrategy):
    """No rewinding: keep the trained weights and fine-tune at the final learning rate."""

    rewinds_weights: ClassVar[bool] = False
    holds_final_lr: ClassVar[bool] = True

    def __str__(self) -> str:
        return "none"


RewindStrategy.Init = Init
RewindStrategy.Early = Early
RewindStrategy.Late = Late
RewindStrategy.LearningRate = LearningRate
RewindStrategy.NoRewind = NoRewind

__all__ = ["Early", "Init", "Late", "LearningRate", "NoRewind", "RewindStrategy"]
