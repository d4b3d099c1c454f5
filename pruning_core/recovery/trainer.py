"""Recovery distillation with fixed masks: train a pruned model against its dense teacher.

Stage: recovery (after pruning). The student learns the teacher's next-token distribution
(``minitron.loss.distillation_loss``: ``T²·KL`` of the logits at temperature ``T``, optionally
``+ lm_weight·`` cross-entropy) on calibration windows that must not overlap the evaluation text.
Every pruned weight stays exactly zero: gradients at pruned positions are zeroed before the
optimizer step (so AdamW's moments stay zero there) and the masks are applied again after every
step; :meth:`RecoveryTrainer.verify` checks it at the end.

Precision: float32 parameters are trained directly. bfloat16/float16 parameters get float32
master copies: the optimizer (AdamW, float32 state) updates the masters and the model's
parameters are rounded from them after every step (forward and backward run in the model's
dtype). Exact zeros stay exact zeros in either dtype.

Resuming: a step's batch is a pure function of ``(seed, step)`` (a fresh permutation of the
windows per epoch), the learning rate a pure function of the step, and the student runs in eval
mode (no dropout), so :meth:`RecoveryTrainer.state_dict` (trainable weights, optimizer state,
step, losses) is everything a resumed run needs: checkpoint every ``k`` steps, load into a new
trainer built on the same pruned model, and the rest of the run is bit-identical to an
uninterrupted one on the same machine.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.errors import ConfigError
from pruning_core.minitron.loss import distillation_loss
from pruning_core.recovery.masks import capture_masks, enforce_masks_, verify_masks
from pruning_core.validate import check_finite, check_rank

logger = logging.getLogger(__name__)

Schedule = Literal["constant", "linear", "cosine"]
StepCallback = Callable[[int, float, "RecoveryTrainer"], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryConfig:
    """Hyper-parameters of recovery training.

    Attributes:
        steps: total optimizer steps.
        lr: peak learning rate (AdamW).
        batch_size: windows per step.
        warmup_steps: linear warm-up from ``lr / warmup_steps``.
        schedule: decay after warm-up: ``constant``, ``linear`` or ``cosine`` (to ``min_lr_ratio·lr``).
        temperature: distillation temperature (1 = plain KL of the distributions).
        lm_weight: weight of the next-token cross-entropy added to the KL (0 = pure distillation).
        weight_decay, betas: AdamW's.
        grad_clip: max global gradient norm (None: no clipping).
        trainable: ``masked`` (only the masked layers' weights) or ``all`` parameters.
        seed: seeds the window order.
    """

    steps: int
    lr: float = 1e-4
    batch_size: int = 4
    warmup_steps: int = 0
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.1
    temperature: float = 1.0
    lm_weight: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    trainable: Literal["masked", "all"] = "masked"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"steps": self.steps >= 0, "lr": math.isfinite(self.lr) and self.lr > 0,
                  "batch_size": self.batch_size >= 1, "warmup_steps": 0 <= self.warmup_steps <= max(self.steps, 0),
                  "schedule": self.schedule in ("constant", "linear", "cosine"),
                  "min_lr_ratio": 0 <= self.min_lr_ratio <= 1, "temperature": self.temperature > 0,
                  "lm_weight": self.lm_weight >= 0, "weight_decay": self.weight_decay >= 0,
                  "grad_clip": self.grad_clip is None or self.grad_clip > 0,
                  "trainable": self.trainable in ("masked", "all")}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"recovery.{name}", f"invalid value {getattr(self, name)!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        floor = self.min_lr_ratio
        decay = {"constant": 1.0, "linear": 1.0 - t, "cosine": 0.5 * (1.0 + math.cos(math.pi * t))}[self.schedule]
        return self.lr * (floor + (1.0 - floor) * decay) if self.schedule != "constant" else self.lr


def _config_dict(config: RecoveryConfig) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as a checkpoint stores it."""
    data: dict[str, Any] = json.loads(json.dumps(asdict(config)))
    return data


def batch_indices(num_windows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Window indices of ``step``: consecutive slices of one seeded permutation per epoch."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_windows)
        perm = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return torch.tensor(out, dtype=torch.long)


class RecoveryTrainer:
    """Distil ``teacher`` into the pruned ``student`` in place with the student's masks fixed.

    Args:
        student: the pruned model (trained in place, in eval mode).
        teacher: the dense model (frozen).
        windows: ``[n, T]`` training token windows, disjoint from the evaluation text.
        config: :class:`RecoveryConfig`.
        masks: ``{layer: keep mask}``; default the student's current zeros
            (:func:`~pruning_core.recovery.masks.capture_masks`).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: RecoveryConfig, *,
                 masks: Mapping[str, torch.Tensor] | None = None) -> None:
        check_rank(windows, 2, name="windows", what="[n, T] token tensor")
        if windows.shape[0] < 1 or windows.shape[1] < 2:
            raise ConfigError("recovery.windows", f"need >= 1 window of >= 2 tokens, got {list(windows.shape)}")
        self.student, self.teacher, self.windows, self.config = student.eval(), teacher.eval(), windows, config
        self.masks = dict(masks) if masks is not None else capture_masks(student)
        self.params = self._trainable()
        self.master = {n: p if p.dtype == torch.float32 else p.detach().float().clone() for n, p in self.params.items()}
        teacher.requires_grad_(False)
        for name, p in student.named_parameters():
            p.requires_grad_(name in self.params)
        self.optimizer = torch.optim.AdamW(list(self.master.values()), lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.step = 0
        self.losses: list[float] = []
        self._apply_masks()

    def _trainable(self) -> dict[str, nn.Parameter]:
        named = dict(self.student.named_parameters())
        missing = [n for n in self.masks if f"{n}.weight" not in named]
        if missing:
            raise ConfigError("recovery.masks", f"masks for layers without a weight: {missing[:3]}")
        if self.config.trainable == "all":
            return named
        return {f"{n}.weight": named[f"{n}.weight"] for n in self.masks}

    def _mask_of(self, param_name: str) -> torch.Tensor | None:
        return self.masks.get(param_name.removesuffix(".weight")) if param_name.endswith(".weight") else None

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for name, master in self.master.items():
                mask = self._mask_of(name)
                if mask is not None:
                    master.mul_(mask.to(master.device, master.dtype))
                if master is not self.params[name]:
                    self.params[name].copy_(master)
        enforce_masks_(self.student, self.masks)

    def _gradients(self) -> None:
        """Zero the gradients at pruned positions; hand low-precision gradients to the masters."""
        for name, param in self.params.items():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            mask = self._mask_of(name)
            if mask is not None:
                grad = grad * mask.to(grad.device, grad.dtype)
            master = self.master[name]
            master.grad = grad.float() if master is not param else grad
            if master is not param:
                param.grad = None

    def train_step(self) -> float:
        """One optimizer step; returns its loss."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        ids = self.windows[batch_indices(self.windows.shape[0], cfg.batch_size, self.step, cfg.seed)]
        loss = distillation_loss(self.student, self.teacher, ids, temperature=cfg.temperature,
                                 lm_weight=cfg.lm_weight)
        check_finite(loss.detach(), method="recovery", what=f"loss at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.params.values():
            param.grad = None
        loss.backward()
        self._gradients()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.master.values()), cfg.grad_clip)
        self.optimizer.step()
        self._apply_masks()
        self.step += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def train(self, until: int | None = None, *, callback: StepCallback | None = None,
              progress: bool = False) -> list[float]:
        """Run steps ``self.step .. until - 1`` (default: to ``config.steps``); returns their losses.

        ``callback(step, loss, trainer)`` runs after every step (``step`` = steps done), e.g. to
        evaluate every ``n`` steps or to checkpoint every ``k``.
        """
        end = self.config.steps if until is None else min(until, self.config.steps)
        losses = []
        for _ in tqdm(range(self.step, end), desc="recovery", unit="step", disable=not progress):
            losses.append(self.train_step())
            if callback is not None:
                callback(self.step, losses[-1], self)
        if losses:
            logger.info("recovery: steps %d..%d, loss %.4f -> %.4f", self.step - len(losses), self.step,
                        losses[0], losses[-1])
        return losses

    def verify(self) -> int:
        """Raise InvalidMask if a pruned weight is non-zero; returns the number of pruned weights."""
        return verify_masks(self.student, self.masks)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors are copies)."""
        return {"step": self.step, "losses": list(self.losses), "config": _config_dict(self.config),
                "params": {n: m.detach().clone() for n, m in self.master.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (same model, windows and config).

        Raises:
            ConfigError: the state belongs to another config or another set of parameters.
        """
        if state["config"] != _config_dict(self.config) or set(state["params"]) != set(self.master):
            raise ConfigError("recovery.state", "the checkpoint was made with another config or parameter set")
        with torch.no_grad():
            for name, value in state["params"].items():
                self.master[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses = int(state["step"]), list(state["losses"])
        self._apply_masks()


__all__ = ["RecoveryConfig", "RecoveryTrainer", "batch_indices"]
