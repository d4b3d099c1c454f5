"""Masked training: the ``TrainFn`` protocol and a fast built-in trainer for in-memory classifiers.

Stage: lottery. IMP calls a user-supplied train function for every training run:

    train_fn(model, masks, spec) -> Mapping[str, float]

The function trains ``model`` in place for iterations ``spec.start_step .. spec.end_step - 1``
of its schedule and data order and returns metrics (plain floats; the built-in trainer returns
``train_loss``, ``steps`` and, given test data, ``accuracy`` and ``loss``). Its contract:

1. pruned weights (``~masks[name]``) are exactly zero after every optimizer step: mask the
   gradients before the step and re-apply the masks after it (:func:`masked_step` does both);
   the library checks this after every run and raises :class:`InvalidMask` otherwise;
2. all randomness (data order, dropout) is derived from ``spec.seed``, and the schedule and data
   order of iteration t do not depend on where the run started, so a run from step k equals
   the tail of a run from step 0 and a resumed search equals an uninterrupted one;
3. ``spec.on_capture(step, model)`` is called when the iteration count equals a step in
   ``spec.capture_steps`` (before the first step for ``start_step``); IMP uses it to capture
   the rewind weights at iteration k of the dense run;
4. if ``spec.lr_step`` is set, the learning rate is held at its value for that iteration.

The optimizer is created inside each run and not kept, so a search's state is optimizer-free.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from pruning_core.arch import eval_mode
from pruning_core.errors import ConfigError, ShapeMismatch

logger = logging.getLogger(__name__)

CaptureFn = Callable[[int, nn.Module], None]


def derive_seed(base: int, *parts: object) -> int:
    """A 63-bit seed from ``base`` and labels (sha256), e.g. ``derive_seed(0, "random_mask", 3)``."""
    text = ":".join([str(base), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


@dataclass(frozen=True, slots=True)
class TrainSpec:
    """One training run of an IMP search (see the module docstring for the contract).

    Attributes:
        start_step: first iteration of the schedule and data order to run.
        end_step: the run stops when the iteration count reaches this (exclusive end).
        seed: seed of all randomness of the run.
        lr_step: if set, hold the learning rate at its value for this iteration.
        capture_steps: iterations at which ``on_capture(step, model)`` must be called.
        on_capture: the capture callback (or None).
        round_index: the IMP round (0 = dense run), for logging.
        run: ``"imp"``, ``"random_reinit"`` or ``"random_mask"``, for logging.
    """

    start_step: int
    end_step: int
    seed: int
    lr_step: int | None = None
    capture_steps: tuple[int, ...] = ()
    on_capture: CaptureFn | None = field(default=None, compare=False)
    round_index: int = 0
    run: str = "imp"

    def __post_init__(self) -> None:
        if not 0 <= self.start_step < self.end_step:
            raise ConfigError(
                "start_step", f"need 0 <= start_step < end_step, got {self.start_step}, {self.end_step}"
            )

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


class TrainFn(Protocol):
    """``train_fn(model, masks, spec) -> metrics``; see the module docstring."""

    def __call__(
        self, model: nn.Module, masks: Mapping[str, torch.Tensor], spec: TrainSpec
    ) -> Mapping[str, float]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingConfig:
    """Optimiser, batch and learning-rate schedule of :class:`ClassifierTrainFn`.

    The learning rate at iteration t is ``lr · gamma^(number of milestones <= t)``. The default is
    the LeNet protocol of Frankle & Carbin (2019): Adam, lr 1.2e-3, batch 60, constant rate.
    """

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1.2e-3
    batch_size: int = 60
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError("optimizer", f"expected 'adam' or 'sgd', got {self.optimizer!r}")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) or (name == "lr" and v == 0):
                raise ConfigError(
                    name,
                    f"must be a finite {'positive' if name == 'lr' else 'non-negative'} number, got {v!r}",
                )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError("batch_size", f"must be a positive integer, got {self.batch_size!r}")
        object.__setattr__(self, "milestones", tuple(sorted(int(m) for m in self.milestones)))

    def lr_at(self, step: int) -> float:
        return self.lr * self.gamma ** sum(1 for m in self.milestones if m <= step)

    def make_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam (fused kernel where torch has one for the device) or SGD over ``params``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        fused = all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params
        )
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused or None)


def masked_pairs(
    model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, float mask)`` pairs for :func:`masked_step`."""
    params = dict(model.named_parameters())
    return [(params[n], m.to(device=params[n].device, dtype=params[n].dtype)) for n, m in masks.items()]


def masked_step(optimizer: torch.optim.Optimizer, pairs: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Mask the gradients, step, and re-apply the masks, so pruned weights stay exactly zero.

    Masking the gradient keeps Adam's moment estimates of pruned weights at zero; re-applying the
    mask after the step also covers optimisers whose update is non-zero for a zero gradient.
    """
    for p, m in pairs:
        if p.grad is not None:
            p.grad.mul_(m)
    optimizer.step()
    with torch.no_grad():
        for p, m in pairs:
            p.mul_(m)


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 5000
) -> dict[str, float]:
    """Top-1 ``accuracy`` and mean cross-entropy ``loss`` of ``model`` on ``inputs [N, ...]``, ``targets [N]``."""
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    with eval_mode(model):
        for i in range(0, inputs.shape[0], batch_size):
            x, y = inputs[i : i + batch_size].to(device), targets[i : i + batch_size].to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    n = max(1, inputs.shape[0])
    return {"accuracy": correct / n, "loss": loss_sum / n}


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, current: float | None) -> float:
    """Set every parameter group's learning rate to ``lr`` if it differs from ``current``; returns ``lr``."""
    if lr != current:
        for group in optimizer.param_groups:
            group["lr"] = lr
    return lr


class ClassifierTrainFn:
    """A :class:`TrainFn` for classifiers on in-memory tensors (no DataLoader).

    Each epoch uses one permutation of the training set drawn from ``(spec.seed, epoch)``;
    iteration t trains on batch ``t mod steps_per_epoch`` of epoch ``t // steps_per_epoch``
    (the last partial batch of an epoch is dropped, so every batch has ``batch_size`` examples).

    Args:
        inputs: training inputs ``[N, ...]`` (kept on their device; batches move to the model's).
        targets: int64 class labels ``[N]``.
        config: optimiser, batch size and schedule.
        test: optional ``(inputs, targets)`` evaluated after each run (``accuracy``, ``loss``).
        eval_every: also evaluate every this many iterations and pass the result to ``on_eval``.
        on_eval: ``on_eval(spec, step, metrics)`` for learning curves (e.g. MLflow logging).
        progress: show a tqdm bar per run.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        config: TrainingConfig | None = None,
        *,
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
        eval_every: int | None = None,
        on_eval: Callable[[TrainSpec, int, dict[str, float]], None] | None = None,
        progress: bool = False,
    ) -> None:
        self.config = config or TrainingConfig()
        if inputs.shape[0] != targets.shape[0] or targets.dim() != 1:
            raise ShapeMismatch(
                [inputs.shape[0]], list(targets.shape), name="targets", reason="one label per input"
            )
        self.steps_per_epoch = inputs.shape[0] // self.config.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                "batch_size", f"{self.config.batch_size} exceeds the {inputs.shape[0]} training examples"
            )
        self.inputs, self.targets, self.test = inputs, targets, test
        self.eval_every, self.on_eval, self.progress = eval_every, on_eval, progress

    def _permutation(self, seed: int, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
        return torch.randperm(self.inputs.shape[0], generator=gen).to(self.inputs.device)

    def __call__(
        self, model: nn.Module, masks: Mapping[str, torch.Tensor], spec: TrainSpec
    ) -> dict[str, float]:
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = cfg.make_optimizer(params)
        pairs = masked_pairs(model, masks)
        device = params[0].device
        losses = torch.zeros(spec.steps, device=device)
        lr, epoch = None, {}  # current learning rate; the epoch's permutation, cached
        model.train()
        bar = tqdm(total=spec.steps, disable=not self.progress, desc=f"{spec.run} round {spec.round_index}")
        for step in range(spec.start_step, spec.end_step):
            if spec.on_capture is not None and step in spec.capture_steps:
                spec.on_capture(step, model)
            lr = _set_lr(optimizer, cfg.lr_at(step if spec.lr_step is None else spec.lr_step), lr)
            x, y = self._batch(step, spec.seed, device, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            masked_step(optimizer, pairs)
            losses[step - spec.start_step] = loss.detach()
            self._maybe_eval(model, spec, step + 1, bar)
        bar.close()
        if spec.on_capture is not None and spec.end_step in spec.capture_steps:
            spec.on_capture(spec.end_step, model)
        return self._metrics(model, spec, losses)

    def _batch(self, step: int, seed: int, device: torch.device,
               epoch: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Iteration ``step``'s batch: batch ``step mod steps_per_epoch`` of its epoch's permutation.

        ``epoch`` caches the current epoch's permutation (one entry) across calls.
        """
        index = step // self.steps_per_epoch
        if index not in epoch:
            epoch.clear()
            epoch[index] = self._permutation(seed, index)
        b = self.config.batch_size
        i = (step % self.steps_per_epoch) * b
        idx = epoch[index][i : i + b]
        x = self.inputs.index_select(0, idx).to(device, non_blocking=True)
        y = self.targets.index_select(0, idx).to(device, non_blocking=True)
        return x, y

    def _metrics(self, model: nn.Module, spec: TrainSpec, losses: torch.Tensor) -> dict[str, float]:
        """Mean training loss of the last (up to) 100 iterations, and the test metrics if any."""
        tail = losses[-min(100, spec.steps) :]
        metrics = {"train_loss": float(tail.mean()), "steps": float(spec.steps)}
        if self.test is not None:
            metrics.update(evaluate(model, *self.test))
        return metrics

    def _maybe_eval(self, model: nn.Module, spec: TrainSpec, done: int, bar: tqdm) -> None:
        if self.progress and done % 100 == 0:
            bar.update(100)
        if (
            self.eval_every
            and self.test is not None
            and done % self.eval_every == 0
            and self.on_eval is not None
        ):
            self.on_eval(spec, done, evaluate(model, *self.test))
            model.train()


__all__ = [
    "CaptureFn",
    "ClassifierTrainFn",
    "TrainFn",
    "TrainSpec",
    "TrainingConfig",
    "derive_seed",
    "evaluate",
    "masked_pairs",
    "masked_step",
]
