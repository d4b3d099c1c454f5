"""Masks for iterative magnitude pruning: selection (the pruning strategy), validation, application.

Stage: lottery. A ticket mask is a ``dict[str, Tensor]`` from parameter name to a boolean
tensor of the parameter's shape, True = keep. The strategy follows open_lth's contract
``prune(config, trained weights, current mask) -> new mask``: it prunes the smallest-magnitude
*surviving* weights, so every new mask is a subset of the current one.

Exact counts: after round r a group of n weights (one layer in layer-wise mode, all pruned
layers together in global mode) keeps ``max(1, round_half_up(n · (1 - p)^r))`` weights. Counting
from n rather than from the previous round keeps rounding errors from compounding (for
s = 0.9, R = 10 on 32,768 weights it gives sparsities .2057, .3690, ..., .9000).
Ties in magnitude keep the lower flat index (stable sort).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from pruning_core.errors import ConfigError, InvalidMask, InvalidPattern, NoParameters, ShapeMismatch
from pruning_core.lottery.config import LotteryTicketConfig
from pruning_core.masks import SparsityMask, generate_unstructured_mask
from pruning_core.masks.pattern import SparsityPattern, Unstructured
from pruning_core.masks.select import keep_largest
from pruning_core.validate import check_finite

Masks = dict[str, torch.Tensor]
_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(model: nn.Module, names: tuple[str, ...] | None = None) -> dict[str, nn.Parameter]:
    """The parameters IMP prunes, by name, in the model's order.

    Args:
        model: any module.
        names: explicit parameter names; None = the ``weight`` of every Linear/Conv module.

    Raises:
        ConfigError: a name is not a parameter of ``model`` (the message lists the candidates).
        NoParameters: nothing to prune.
    """
    params = dict(model.named_parameters())
    if names is None:
        chosen = [
            f"{m}.weight" if m else "weight" for m, mod in model.named_modules() if isinstance(mod, _PRUNABLE)
        ]
    else:
        missing = [n for n in names if n not in params]
        if missing:
            shown = ", ".join(list(params)[:8])
            raise ConfigError("layers", f"{missing} are not parameters of the model; it has: {shown}, ...")
        chosen = list(names)
    out = {n: params[n] for n in chosen if n in params and params[n].is_floating_point()}
    if not out:
        raise NoParameters(type(model).__name__)
    return out


def check_masks(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``masks`` has exactly the keys of ``params``, boolean dtype and matching shapes.

    Raises:
        InvalidMask: missing or extra names, or a non-boolean mask.
        ShapeMismatch: a mask's shape differs from its parameter's.
    """
    missing, extra = sorted(set(params) - set(masks)), sorted(set(masks) - set(params))
    if missing or extra:
        raise InvalidMask(
            f"mask names do not match the pruned parameters: missing {missing}, unexpected {extra}"
        )
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise InvalidMask(f"mask dtype must be torch.bool (True = keep), got {mask.dtype}", name=name)
        if mask.shape != params[name].shape:
            raise ShapeMismatch(
                list(params[name].shape), list(mask.shape), name=name, reason="mask vs parameter"
            )


def dense_masks(params: Mapping[str, torch.Tensor]) -> Masks:
    """All-True masks (round 0) for ``params``."""
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}


def survivors(n: int, rate: float, round_index: int) -> int:
    """Weights a group of ``n`` keeps after ``round_index`` rounds at ``rate``: max(1, round(n·(1-rate)^r))."""
    if n == 0:
        return 0
    return max(1, math.floor(round(n * (1.0 - rate) ** round_index, 9) + 0.5))


def _alive_scores(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|w| as float32 where the mask keeps, -1 where already pruned: below every |w|, so a pruned
    weight is never kept again while fewer survivors than alive weights are asked for."""
    scores = weight.detach().abs().to(torch.float32)
    return scores.masked_fill_(~mask, -1.0)


def magnitude_prune(
    config: LotteryTicketConfig,
    weights: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    round_index: int,
) -> Masks:
    """The IMP strategy: the masks of round ``round_index`` from the trained weights of the round before.

    Args:
        config: rates, scope (global or layer-wise) and per-layer overrides.
        weights: trained weights ``{name: [*shape]}`` of the pruned parameters.
        current: the previous round's boolean masks (same names and shapes).
        round_index: the round being planned, >= 1.

    Returns:
        New boolean masks, each a subset of ``current``, with exactly :func:`survivors` kept per group.

    Raises:
        NumericalInstability: a trained weight is NaN or infinite (training diverged).
    """
    check_masks(weights, current)
    for name, w in weights.items():
        check_finite(w, method="lottery_ticket", what="trained weight", layer=name)
    scores = {n: _alive_scores(w, current[n]) for n, w in weights.items()}
    if config.global_pruning:
        k = survivors(sum(s.numel() for s in scores.values()), config.rate, round_index)
        flat_keep = keep_largest(torch.cat([s.reshape(-1) for s in scores.values()]), k)
        parts = flat_keep.split([s.numel() for s in scores.values()])
        new = {n: part.reshape(s.shape) for (n, s), part in zip(scores.items(), parts, strict=True)}
    else:
        new = {
            n: keep_largest(s, survivors(s.numel(), config.layer_rate(n), round_index))
            for n, s in scores.items()
        }
    for n, mask in new.items():
        if bool((mask & ~current[n]).any()):  # pragma: no cover - would be a bug in keep_top_k
            raise AssertionError(f"new mask for {n} is not a subset of the current one")
    return new


def one_shot_mask(
    scores: torch.Tensor, target_sparsity: float, pattern: SparsityPattern | None = None
) -> SparsityMask:
    """Keep all but ``floor(n · s)`` of the largest ``scores`` (unstructured only).

    Args:
        scores: importance scores of any shape (or an object with a ``values`` tensor).
        target_sparsity: fraction to prune, in [0, 1].
        pattern: must be None or Unstructured.

    Returns:
        A validated :class:`SparsityMask` shaped like ``scores``; ties keep the lower flat index.

    Raises:
        InvalidPattern: a structured pattern (lottery tickets are unstructured).
        InvalidSparsity / NumericalInstability: bad sparsity or non-finite scores.
    """
    if pattern is not None and not isinstance(pattern, Unstructured):
        raise InvalidPattern(f"lottery ticket pruning supports only unstructured masks, got {pattern}")
    values = scores if isinstance(scores, torch.Tensor) else scores.values  # type: ignore[attr-defined]
    return generate_unstructured_mask(values, target_sparsity)


def random_masks_like(masks: Mapping[str, torch.Tensor], generator: torch.Generator) -> Masks:
    """Random masks with exactly the same number of kept weights per layer as ``masks``."""
    out: Masks = {}
    for name, mask in masks.items():
        keep = int(mask.sum())
        order = torch.randperm(mask.numel(), generator=generator)
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[order[:keep]] = True
        out[name] = flat.reshape(mask.shape).to(mask.device)
    return out


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights of ``model`` in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device))


def check_masks_hold(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`InvalidMask` if a pruned weight of ``model`` is not exactly zero."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        alive = params[name].detach()[~mask.to(params[name].device)]
        bad = int(torch.count_nonzero(alive))
        if bad:
            raise InvalidMask(
                f"{bad} of {alive.numel()} pruned weights are non-zero after training; "
                "the train function must keep the masks applied after every optimizer step",
                name=name,
            )


def layer_density(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of kept weights per layer."""
    return {n: float(m.sum()) / max(1, m.numel()) for n, m in masks.items()}


def overall_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of kept weights over all masked parameters."""
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values())) / max(1, total)


__all__ = [
    "Masks",
    "apply_masks_",
    "check_masks",
    "check_masks_hold",
    "dense_masks",
    "layer_density",
    "magnitude_prune",
    "one_shot_mask",
    "overall_density",
    "prunable_parameters",
    "random_masks_like",
    "survivors",
]
