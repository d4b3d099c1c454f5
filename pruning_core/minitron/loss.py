"""Calibration language-model loss, and a short logit distillation from the dense teacher.

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
    ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over tokens.

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
        ids = batches[step % len(batches)]
        with torch.no_grad():
            target = F.log_softmax(_logits(teacher, ids).float() / temperature, dim=-1)
        pred = F.log_softmax(_logits(student, ids).float() / temperature, dim=-1)
        loss = F.kl_div(pred.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
        loss = loss * temperature**2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        check_finite(loss.detach(), method="distill", what="KL loss")
    if losses:
        logger.info("distilled %d steps: KL %.4f -> %.4f", steps, losses[0], losses[-1])
    return losses


__all__ = ["distill_", "lm_loss"]
