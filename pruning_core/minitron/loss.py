"""Calibration language-model loss, and logit distillation from the dense teacher.

Stage: scoring candidates. ``batches`` are token-id tensors ``[batch, seq]`` (full windows, no
padding); every position but the last predicts the next token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from pruning_core.errors import CalibrationRequired, ConfigError
from pruning_core.validate import check_finite

logger = logging.getLogger(__name__)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits  # [B, T, vocab]


def lm_loss(model: nn.Module, batches: Sequence[torch.Tensor], *, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``batches``.

    Args:
        model: a causal LM returning ``.logits`` (HF style).
        batches: token ids, each ``[B, T]`` with ``T >= 2``.

    Returns:
        ``sum of token NLLs / number of predicted tokens``; ``exp`` of it is the perplexity.
    """
    if not batches:
        raise CalibrationRequired("lm_loss")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in tqdm(batches, desc="lm loss", disable=not progress, leave=False):
            logits = _logits(model, ids)[:, :-1].float()
            target = ids[:, 1:].to(logits.device)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            total += float(nll)
            count += target.numel()
    loss = torch.tensor(total / count)
    check_finite(loss, method="lm_loss", what="loss")
    return float(loss)


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(t/T) || softmax(s/T))`` averaged over tokens (Hinton et al. 2015).

    Args:
        student_logits, teacher_logits: ``[..., vocab]`` logits (teacher log-probabilities work too
            at ``T = 1``: ``log_softmax`` of log-probabilities is the identity).
        temperature: ``T > 0``.

    Returns:
        A float32 scalar (differentiable in ``student_logits``).
    """
    target = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1).flatten(0, -2)
    pred = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(pred, target, log_target=True, reduction="batchmean") * temperature**2


def distillation_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, *, temperature: float = 1.0,
                      lm_weight: float = 0.0) -> torch.Tensor:
    """Logit-distillation loss of ``student`` on one batch ``ids`` ``[B, T]`` (differentiable).

    ``logit_kl`` over all ``B·T`` positions, plus ``lm_weight`` times the student's next-token
    cross-entropy (positions ``0..T-2``) when ``lm_weight > 0``. The teacher runs under
    ``torch.no_grad``.
    """
    with torch.no_grad():
        teacher_logits = _logits(teacher, ids)
    logits = _logits(student, ids)  # [B, T, vocab]
    loss = logit_kl(logits, teacher_logits, temperature=temperature)
    if lm_weight:
        pred = logits[:, :-1].float()
        target = ids[:, 1:].to(pred.device)
        loss = loss + lm_weight * F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))
    return loss


def distill_(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-4,
    temperature: float = 1.0,
) -> list[float]:
    """Train ``student`` in place for ``steps`` steps on KL(teacher || student) of the logits.

    Minitron retrains pruned candidates by logit distillation from the dense model (Sec. 3).
    Here: AdamW, one batch per step (cycling through ``batches``), loss
    ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over tokens (:func:`distillation_loss`).
    Recovery training with fixed masks, checkpoints and schedules is ``pruning_core.recovery``.

    Returns:
        The loss of every step.
    """
    if steps < 0 or lr <= 0 or temperature <= 0:
        raise ConfigError("distill", f"need steps >= 0, lr > 0, temperature > 0; got {steps}, {lr}, {temperature}")
    if steps and not batches:
        raise CalibrationRequired("distill_")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    for step in tqdm(range(steps), desc="distill", leave=False, disable=steps < 2):
        loss = distillation_loss(student, teacher, batches[step % len(batches)], temperature=temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        check_finite(loss.detach(), method="distill", what="KL loss")
    if losses:
        logger.info("distilled %d steps: KL %.4f -> %.4f", steps, losses[0], losses[-1])
    return losses


__all__ = ["distill_", "distillation_loss", "lm_loss", "logit_kl"]
