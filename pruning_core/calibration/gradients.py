"""Per-layer weight gradients accumulated over calibration batches (for Taylor importance).

Stage: calibration. For every targeted ``nn.Linear`` weight ``W`` and calibration batch ``b``
with loss ``L_b`` (a scalar, by default the mean next-token cross-entropy of the batch),
:func:`collect_gradients` accumulates

- ``grad_sum     = Σ_b ∂L_b/∂W``      (so ``grad_sum / num_batches`` is the gradient of the mean
  calibration loss), and
- ``abs_grad_sum = Σ_b |∂L_b/∂W|``    (element-wise),

both float32 ``[out, in]``, and ``num_batches``. Gradients are taken with ``torch.autograd.grad``
with respect to the targeted weights only: the model's ``.grad`` fields and ``requires_grad``
flags are left as they were, and the model runs in eval mode (no dropout).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.arch import eval_mode, model_device
from pruning_core.calibration.capture import Batch, LayerSelection, batch_size_of, select_linear_layers
from pruning_core.calibration.context import CalibrationContext
from pruning_core.errors import ConfigError, NumericalInstability, ShapeMismatch
from pruning_core.validate import check_finite

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Batch], torch.Tensor]
GRAD_DTYPE = torch.float32


class GradientStats:
    """Accumulated gradients of one weight ``[out, in]`` (see the module docstring)."""

    def __init__(self, shape: tuple[int, ...], *, name: str | None = None,
                 device: torch.device | str | None = None) -> None:
        self.name = name
        self.grad_sum = torch.zeros(shape, dtype=GRAD_DTYPE, device=device)
        self.abs_grad_sum = torch.zeros(shape, dtype=GRAD_DTYPE, device=device)
        self.num_batches = 0

    def update(self, grad: torch.Tensor) -> None:
        """Add one batch's gradient (same shape as the weight); NaN/Inf -> NumericalInstability."""
        if grad.shape != self.grad_sum.shape:
            raise ShapeMismatch(list(self.grad_sum.shape), list(grad.shape), name=self.name, reason="gradient")
        check_finite(grad, method="taylor", what="gradient", layer=self.name)
        g = grad.detach().to(self.grad_sum.device, GRAD_DTYPE)
        self.grad_sum += g
        self.abs_grad_sum += g.abs()
        self.num_batches += 1

    @property
    def mean_gradient(self) -> torch.Tensor:
        """``grad_sum / num_batches``: the gradient of the mean calibration loss."""
        return self.grad_sum / max(self.num_batches, 1)

    @property
    def mean_abs_gradient(self) -> torch.Tensor:
        """``abs_grad_sum / num_batches``."""
        return self.abs_grad_sum / max(self.num_batches, 1)

    def merge(self, other: GradientStats) -> GradientStats:
        """Exact sum of two accumulations."""
        if other.grad_sum.shape != self.grad_sum.shape:
            raise ShapeMismatch(list(self.grad_sum.shape), list(other.grad_sum.shape), name=self.name)
        out = self.copy()
        out.grad_sum += other.grad_sum.to(out.grad_sum.device)
        out.abs_grad_sum += other.abs_grad_sum.to(out.grad_sum.device)
        out.num_batches += other.num_batches
        return out

    def copy(self) -> GradientStats:
        out = GradientStats(tuple(self.grad_sum.shape), name=self.name, device=self.grad_sum.device)
        out.grad_sum.copy_(self.grad_sum)
        out.abs_grad_sum.copy_(self.abs_grad_sum)
        out.num_batches = self.num_batches
        return out

    def __repr__(self) -> str:
        return f"GradientStats(name={self.name!r}, shape={tuple(self.grad_sum.shape)}, batches={self.num_batches})"


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Default loss: a Hugging Face causal LM's own next-token loss with ``labels = input_ids``."""
    device = model_device(model)
    if isinstance(batch, torch.Tensor):
        ids = batch.to(device)
        kwargs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    else:
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        kwargs.setdefault("labels", kwargs.get("input_ids"))
    out = model(**kwargs)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ConfigError("loss_fn", "the model returned no .loss; pass loss_fn(model, batch) -> scalar")
    return loss


def collect_gradients(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn = causal_lm_loss,
    *,
    layers: LayerSelection = None,
    context: CalibrationContext | None = None,
    dataset: str = "",
    progress: bool = True,
) -> CalibrationContext:
    """Accumulate ``∂L_b/∂W`` and ``|∂L_b/∂W|`` over ``batches`` for every targeted Linear weight.

    Args:
        model: any torch module (eval mode during the run, restored afterwards).
        batches: token tensors or dicts of keyword arguments, as for ``collect_activation_stats``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default :func:`causal_lm_loss`.
        layers: which ``nn.Linear`` (names or ``filter_fn``); default all.
        context: context to add the gradient statistics to (a new one if None).

    Raises:
        NumericalInstability: a non-finite loss or gradient (names the layer and first bad index).
    """
    modules = select_linear_layers(model, layers)
    ctx = context if context is not None else CalibrationContext(dataset)
    weights = [m.weight for m in modules.values()]
    stats = {name: GradientStats(tuple(m.weight.shape), name=name, device=m.weight.device)
             for name, m in modules.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        with eval_mode(model):
            for p in model.parameters():
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
            for batch in tqdm(batches, desc="gradients", unit="batch", disable=not progress):
                _accumulate_batch(model, batch, loss_fn, weights, stats)
                ctx.increment_samples(batch_size_of(batch))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    for name, g in stats.items():
        ctx.add_gradient_stats(name, g)
    logger.info("gradients: %d layers over %d samples", len(stats), ctx.num_samples)
    return ctx


def _accumulate_batch(model: nn.Module, batch: Batch, loss_fn: LossFn, weights: list[torch.Tensor],
                      stats: dict[str, GradientStats]) -> None:
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        if loss.dim() != 0:
            raise ShapeMismatch([], list(loss.shape), name="loss", reason="loss_fn must return a scalar")
        if not bool(torch.isfinite(loss)):
            raise NumericalInstability("taylor", f"calibration loss is {float(loss.detach())}")
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    for (_name, g_stats), w, g in zip(stats.items(), weights, grads, strict=True):
        g_stats.update(torch.zeros_like(w) if g is None else g)


__all__ = ["GRAD_DTYPE", "GradientStats", "LossFn", "causal_lm_loss", "collect_gradients"]
