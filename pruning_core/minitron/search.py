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
from typing import Literal

import torch
from torch import nn

from pruning_core.errors import ConfigError
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.structured import StructuredPlan, apply_plan_
from pruning_core.minitron.config import Architecture, MinitronTarget
from pruning_core.minitron.depth_scores import depth_plan, select_block, select_one_shot
from pruning_core.minitron.families import ModelShape
from pruning_core.minitron.loss import distill_, lm_loss
from pruning_core.minitron.precision import cast_parameters_
from pruning_core.minitron.scores import MinitronScores
from pruning_core.minitron.structure import DecoderStructure
from pruning_core.minitron.width_plan import width_plan

logger = logging.getLogger(__name__)
DepthCriterion = Literal["bi", "bi_iterative", "loss", "loss_block", "loss_iterative"]
DEPTH_CRITERIA: tuple[str, ...] = ("bi", "bi_iterative", "loss", "loss_block", "loss_iterative")
ITERATIVE_CRITERIA = ("bi_iterative", "loss_iterative")


@dataclass(frozen=True, slots=True)
class CandidateResult:
    architecture: Architecture
    num_parameters: int
    loss: float
    distill_losses: tuple[float, ...] = ()


def enumerate_candidates(dense: Architecture, shape: ModelShape, target: MinitronTarget) -> list[Architecture]:
    """Architectures allowed by ``target``, sorted by parameter count (descending), then depth.

    Skipped: head counts that do not divide the hidden size or regroup query heads, and shapes
    the family's config would refuse (``shape.hidden_per_head``).

    Raises:
        ConfigError: an explicit value is above the dense model's (e.g. more layers than
            exist), or no architecture satisfies the target.
    """
    choices = _axis_choices(dense, target)
    found = []
    for layers, hidden, ffn, heads, kv in itertools.product(*choices):
        if heads % kv or hidden % heads or heads // kv > dense.num_attention_heads // dense.num_key_value_heads:
            continue
        if shape.hidden_per_head is not None and hidden != heads * shape.hidden_per_head:
            continue  # e.g. Phi-3 with LongRoPE: its config would refuse the pruned model
        arch = Architecture(num_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                            num_attention_heads=heads, num_key_value_heads=kv)
        params = shape.num_parameters(arch)
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
    removal_order: Sequence[int] | None = None,
) -> StructuredPlan:
    """Width plan (top-scored channels/neurons/heads) merged with a depth plan.

    ``depth_criterion`` chooses the ``k = L - arch.num_layers`` layers removed:

    - ``bi``: the ``k`` lowest Block-Importance layers;
    - ``loss``: the ``k`` layers whose single removal raises the LM loss least (needs
      ``scores.layer_loss``);
    - ``loss_block``: the contiguous block of ``k`` layers whose removal raises the LM loss
      least (needs ``scores.block_loss[k]``);
    - ``bi_iterative`` / ``loss_iterative``: the first ``k`` entries of ``removal_order``, the
      greedy order of :func:`~pruning_core.minitron.depth_scores.bi_iterative` /
      :func:`~pruning_core.minitron.depth_scores.loss_iterative` (computed once for the most
      layers any candidate removes).

    Raises:
        ConfigError: an unknown criterion, or the scores / order it needs are missing.
    """
    k = structure.num_layers - arch.num_layers
    return width_plan(graph, structure, scores.width, arch).merged(
        depth_plan(dense_model, _removed_layers(scores, k, depth_criterion, removal_order)))


def _removed_layers(scores: MinitronScores, k: int, criterion: str, order: Sequence[int] | None) -> list[int]:
    if criterion not in DEPTH_CRITERIA:
        raise ConfigError("depth_criterion", f"must be one of {DEPTH_CRITERIA}, got {criterion!r}")
    if k == 0:
        return []
    if criterion == "bi":
        return select_one_shot(scores.block_importance, k)
    if criterion == "loss":
        if scores.layer_loss is None:
            raise ConfigError("depth_criterion", "'loss' needs scores computed with loss_batches")
        return select_one_shot(scores.layer_loss, k)
    if criterion == "loss_block":
        if k not in scores.block_loss:
            raise ConfigError("depth_criterion", f"'loss_block' needs block losses for block size {k} "
                              f"(compute_scores(block_sizes=...)); have {sorted(scores.block_loss)}")
        return select_block(scores.block_loss[k], k)
    if order is None or len(order) < k:
        raise ConfigError("depth_criterion", f"{criterion!r} needs the greedy removal order of at least {k} "
                          f"layers (removal_order), got {None if order is None else len(order)}")
    return sorted(int(i) for i in order[:k])


def build_candidate(dense_model: nn.Module, plan: StructuredPlan, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A pruned deep copy of ``dense_model`` (the dense model is not changed).

    Args:
        dtype: cast the candidate's parameters to this dtype (e.g. the checkpoint's stored
            dtype, from :func:`~pruning_core.minitron.precision.to_compute_dtype_`, before
            saving); None keeps the dense model's.
    """
    model = apply_plan_(copy.deepcopy(dense_model), plan)
    return model if dtype is None else cast_parameters_(model, dtype)


def evaluate_candidate(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    teacher: nn.Module | None = None,
    distill_steps: int = 0,
    distill_lr: float = 1e-4,
    distill_batches: Sequence[torch.Tensor] | None = None,
) -> tuple[float, list[float]]:
    """LM loss of ``model`` on ``batches``, after ``distill_steps`` of logit distillation on
    ``distill_batches`` if > 0.

    The two must be different windows: a candidate trained on the windows it is then scored on
    is scored in-sample (its loss says how well it memorised them). Windows that share tokens
    cannot be told apart here; the flow draws distillation windows that share no token position
    with the scoring windows (``flows.minitron_tasks``). This checks that no window appears in
    both.

    Returns:
        ``(loss, distillation losses per step)``.

    Raises:
        ConfigError: distillation without a teacher or without ``distill_batches``, or a
            scoring window among the distillation windows.
    """
    history: list[float] = []
    if distill_steps:
        if teacher is None:
            raise ConfigError("teacher", "distillation needs the dense teacher model")
        if not distill_batches:
            raise ConfigError("distill_batches", "distillation needs its own windows, disjoint from the scoring windows")
        _check_disjoint(batches, distill_batches)
        history = distill_(model, teacher, distill_batches, steps=distill_steps, lr=distill_lr)
    return lm_loss(model, batches), history


def _check_disjoint(batches: Sequence[torch.Tensor], distill_batches: Sequence[torch.Tensor]) -> None:
    scoring = {tuple(row.tolist()) for ids in batches for row in ids}
    shared = sum(tuple(row.tolist()) in scoring for ids in distill_batches for row in ids)
    if shared:
        raise ConfigError("distill_batches", f"{shared} distillation window(s) are also scoring windows; "
                          "distilling on them would score candidates in-sample")


def search(
    dense_model: nn.Module,
    graph: DependencyGraph,
    structure: DecoderStructure,
    scores: MinitronScores,
    candidates: Sequence[Architecture],
    batches: Sequence[torch.Tensor],
    *,
    depth_criterion: DepthCriterion = "bi",
    removal_order: Sequence[int] | None = None,
    distill_steps: int = 0,
    distill_batches: Sequence[torch.Tensor] | None = None,
) -> list[CandidateResult]:
    """Build and score every candidate on ``batches``; results sorted by loss (best first).

    With ``distill_steps``, each candidate is first distilled on ``distill_batches``, which must
    be other windows than ``batches`` (see :func:`evaluate_candidate`).
    """
    results = []
    for arch in candidates:
        plan = candidate_plan(dense_model, graph, structure, scores, arch, depth_criterion=depth_criterion,
                              removal_order=removal_order)
        model = build_candidate(dense_model, plan)
        loss, history = evaluate_candidate(model, batches, teacher=dense_model, distill_steps=distill_steps,
                                           distill_batches=distill_batches)
        results.append(CandidateResult(arch, sum(p.numel() for p in model.parameters()), loss, tuple(history)))
        logger.info("candidate %s: %d params, loss %.4f", arch.to_dict(), results[-1].num_parameters, loss)
    return sorted(results, key=lambda r: r.loss)


__all__ = [
    "DEPTH_CRITERIA",
    "CandidateResult",
    "ModelShape",
    "build_candidate",
    "candidate_plan",
    "enumerate_candidates",
    "evaluate_candidate",
    "search",
]
