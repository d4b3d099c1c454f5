"""Minitron architecture search: enumerate candidates, build each from cached scores, score it.

Stage: plan -> apply -> evaluate. The flow calls these one by one (one task per candidate);
:func:`search` is the same loop for library users:

1. :func:`enumerate_candidates` — every architecture within the target and the divisibility
   constraints, largest first;
2. :func:`candidate_plan` — the structural plan of one candidate from the dense model's
   cached :class:`~pruning_core.minitron.scores.MinitronScores` (width plan + depth plan);
3. :func:`build_candidate` — a pruned copy of the dense model;
4. :func:`evaluate_candidate` — calibration LM loss, optionally after a short logit
   distillation from the dense teacher (off by default).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pruning_core.errors import ConfigError
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.structured import StructuredPlan, apply_plan_
from pruning_core.minitron.config import Architecture, MinitronTarget
from pruning_core.minitron.depth_scores import depth_plan, select_one_shot
from pruning_core.minitron.loss import distill_, lm_loss
from pruning_core.minitron.scores import MinitronScores
from pruning_core.minitron.structure import DecoderStructure
from pruning_core.minitron.width_plan import width_plan

logger = logging.getLogger(__name__)
DepthCriterion = Literal["bi", "loss"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the parameter count needs besides the architecture (from the dense model)."""

    vocab_size: int
    head_dim: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // int(config.num_attention_heads)
        return cls(int(config.vocab_size), int(head_dim), bool(getattr(config, "tie_word_embeddings", False)))


@dataclass(frozen=True, slots=True)
class CandidateResult:
    architecture: Architecture
    num_parameters: int
    loss: float
    distill_losses: tuple[float, ...] = ()


def enumerate_candidates(dense: Architecture, shape: ModelShape, target: MinitronTarget) -> list[Architecture]:
    """Architectures allowed by ``target``, sorted by parameter count (descending), then depth.

    Raises:
        ConfigError: an explicit value is above the dense model's (e.g. more layers than
            exist), or no architecture satisfies the target.
    """
    choices = _axis_choices(dense, target)
    found = []
    for layers, hidden, ffn, heads, kv in itertools.product(*choices):
        if heads % kv or hidden % heads or heads // kv > dense.num_attention_heads // dense.num_key_value_heads:
            continue
        arch = Architecture(num_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                            num_attention_heads=heads, num_key_value_heads=kv)
        params = arch.num_parameters(vocab_size=shape.vocab_size, head_dim=shape.head_dim,
                                     tied_embeddings=shape.tied_embeddings)
        if target.param_budget is None or (1 - target.budget_tolerance) * target.param_budget <= params <= target.param_budget:
            found.append((params, arch))
    if not found:
        raise ConfigError("target", f"no architecture satisfies {target} within {dense}")
    found.sort(key=lambda item: (-item[0], -item[1].num_layers, -item[1].hidden_size))
    return [arch for _, arch in found][: target.max_candidates]


def _axis_choices(dense: Architecture, target: MinitronTarget) -> list[list[int]]:
    def axis(name: str, limit: int, lowest: int, step: int) -> list[int]:
        explicit = getattr(target, name)
        if explicit is not None:
            above = [v for v in explicit if v > limit]
            if above:
                raise ConfigError(name, f"values {above} are above the original {limit}")
            return sorted(set(explicit), reverse=True)
        return sorted({limit, *range(step, limit + 1, step)} - set(range(lowest)), reverse=True)

    return [
        axis("num_layers", dense.num_layers, target.min_layers, 1),
        axis("hidden_size", dense.hidden_size, 1, target.hidden_divisor),
        axis("intermediate_size", dense.intermediate_size, 1, target.ffn_divisor),
        axis("num_attention_heads", dense.num_attention_heads, 1, 1),
        axis("num_key_value_heads", dense.num_key_value_heads, 1, 1),
    ]


def candidate_plan(
    dense_model: nn.Module,
    graph: DependencyGraph,
    structure: DecoderStructure,
    scores: MinitronScores,
    arch: Architecture,
    *,
    depth_criterion: DepthCriterion = "bi",
) -> StructuredPlan:
    """Width plan (top-scored channels/neurons/heads) merged with a one-shot depth plan.

    ``depth_criterion``: ``bi`` removes the lowest Block-Importance layers, ``loss`` the layers
    whose removal raises the LM loss least (needs ``scores.layer_loss``).
    """
    num_remove = structure.num_layers - arch.num_layers
    if depth_criterion == "loss":
        if scores.layer_loss is None:
            raise ConfigError("depth_criterion", "'loss' needs scores computed with loss_batches")
        layer_scores = scores.layer_loss
    elif depth_criterion == "bi":
        layer_scores = scores.block_importance
    else:
        raise ConfigError("depth_criterion", f"must be 'bi' or 'loss', got {depth_criterion!r}")
    removed = select_one_shot(layer_scores, num_remove) if num_remove else []
    return width_plan(graph, structure, scores.width, arch).merged(depth_plan(dense_model, removed))


def build_candidate(dense_model: nn.Module, plan: StructuredPlan) -> nn.Module:
    """A pruned deep copy of ``dense_model`` (the dense model is not changed)."""
    return apply_plan_(copy.deepcopy(dense_model), plan)


def evaluate_candidate(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    teacher: nn.Module | None = None,
    distill_steps: int = 0,
    distill_lr: float = 1e-4,
) -> tuple[float, list[float]]:
    """Calibration LM loss of ``model``, after ``distill_steps`` of logit distillation if > 0.

    Returns:
        ``(loss, distillation losses per step)``.
    """
    history: list[float] = []
    if distill_steps:
        if teacher is None:
            raise ConfigError("teacher", "distillation needs the dense teacher model")
        history = distill_(model, teacher, batches, steps=distill_steps, lr=distill_lr)
    return lm_loss(model, batches), history


def search(
    dense_model: nn.Module,
    graph: DependencyGraph,
    structure: DecoderStructure,
    scores: MinitronScores,
    candidates: Sequence[Architecture],
    batches: Sequence[torch.Tensor],
    *,
    depth_criterion: DepthCriterion = "bi",
    distill_steps: int = 0,
) -> list[CandidateResult]:
    """Build and score every candidate; results sorted by loss (best first)."""
    results = []
    for arch in candidates:
        plan = candidate_plan(dense_model, graph, structure, scores, arch, depth_criterion=depth_criterion)
        model = build_candidate(dense_model, plan)
        loss, history = evaluate_candidate(model, batches, teacher=dense_model, distill_steps=distill_steps)
        results.append(CandidateResult(arch, sum(p.numel() for p in model.parameters()), loss, tuple(history)))
        logger.info("candidate %s: %d params, loss %.4f", arch.to_dict(), results[-1].num_parameters, loss)
    return sorted(results, key=lambda r: r.loss)


__all__ = [
    "CandidateResult",
    "ModelShape",
    "build_candidate",
    "candidate_plan",
    "enumerate_candidates",
    "evaluate_candidate",
    "search",
]
