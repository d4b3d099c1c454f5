"""Fitness of a pruned model for the allocation search: KL divergence to the dense model, or LM loss.

Stage: allocation (scoring candidates). EvoPress's default fitness is the KL divergence of the
pruned model's next-token distribution from the dense model's on calibration windows
(IST-DASLab/EvoPress ``src/metrics.py`` ``compute_kl_div``); the dense log-probabilities are
computed once (``[n, T, vocab]`` float32: ``4·n·T·vocab`` bytes, 50 MB per 256-token window of a
49k vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruning_core.arch import eval_mode, model_device
from pruning_core.errors import ConfigError
from pruning_core.minitron.loss import lm_loss, logit_kl
from pruning_core.validate import check_finite, check_rank


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(model_device(model)), use_cache=False).logits  # [B, T, vocab]


def teacher_log_probs(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
    """Dense next-token log-probabilities ``[n, T, vocab]`` float32 of ``windows`` ``[n, T]``."""
    check_rank(windows, 2, name="windows", what="[n, T] token tensor")
    out = []
    with torch.no_grad(), eval_mode(model):
        for batch in windows.split(batch_size):
            out.append(torch.log_softmax(_logits(model, batch).float(), dim=-1).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class KLFitness:
    """Mean per-token ``KL(dense || pruned)`` over ``windows`` (lower is better).

    Attributes:
        windows: ``[n, T]`` token ids.
        teacher: ``[n, T, vocab]`` dense log-probabilities (:func:`teacher_log_probs`).
        batch_size: windows per forward pass.
    """

    windows: torch.Tensor
    teacher: torch.Tensor
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.teacher.shape[:2] != self.windows.shape or self.batch_size < 1:
            raise ConfigError("fitness", f"teacher {list(self.teacher.shape)} does not match windows "
                                         f"{list(self.windows.shape)} (batch size {self.batch_size})")

    @classmethod
    def from_model(cls, dense: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> KLFitness:
        return cls(windows, teacher_log_probs(dense, windows, batch_size=batch_size), batch_size)

    def first(self, n: int) -> KLFitness:
        """The same fitness on the first ``n`` windows (for cheaper early selection stages)."""
        if not 1 <= n <= self.windows.shape[0]:
            raise ConfigError("fitness.windows", f"need 1 <= n <= {self.windows.shape[0]}, got {n}")
        return KLFitness(self.windows[:n], self.teacher[:n], self.batch_size)

    def __call__(self, model: nn.Module) -> float:
        total, tokens = 0.0, 0
        with torch.no_grad(), eval_mode(model):
            for ids, target in zip(self.windows.split(self.batch_size), self.teacher.split(self.batch_size),
                                   strict=True):
                kl = logit_kl(_logits(model, ids), target.to(model_device(model)))  # mean over B·T tokens
                total += float(kl) * ids.numel()
                tokens += ids.numel()
        value = torch.tensor(total / tokens)
        check_finite(value, method="kl fitness", what="KL divergence")
        return float(value)


@dataclass(frozen=True)
class LossFitness:
    """Mean next-token cross-entropy (nats/token) on ``windows`` ``[n, T]`` (lower is better)."""

    windows: torch.Tensor
    batch_size: int = 4

    def first(self, n: int) -> LossFitness:
        return LossFitness(self.windows[:n], self.batch_size)

    def __call__(self, model: nn.Module) -> float:
        with eval_mode(model):
            return lm_loss(model, list(self.windows.split(self.batch_size)))


__all__ = ["KLFitness", "LossFitness", "teacher_log_probs"]
