"""From width scores and a target architecture to the structural plan (physical slicing).

Stage: plan. Minitron keeps the top-scored elements of each width axis, with the same count
in every layer (so the result is again a uniform Llama config):

- hidden: top ``hidden_size`` embedding channels, removed from the whole residual group;
- MLP: per layer, top ``intermediate_size`` neurons (gate/up rows and down columns; for a fused
  ``gate_up_proj`` rows ``n`` and ``I + n`` together);
- heads (GQA-consistent, :func:`select_heads`): per layer, keep ``num_key_value_heads`` KV
  groups and ``num_attention_heads / num_key_value_heads`` query heads inside each kept group
  (for a fused ``qkv_proj``: the q rows of the kept heads and the k and v rows of the kept
  groups; per-head q/k norms are shared by all heads and stay whole).

Every removal is expanded through the dependency graph (:func:`channel_group`) before it
becomes parameter slices, so coupled weights are always cut together.
"""

from __future__ import annotations

import torch

from pruning_core.errors import ConfigError, GraphError
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.propagate import ChannelGroup, channel_group
from pruning_core.graph.structured import StructuredPlan, plan_from_groups
from pruning_core.minitron.config import Architecture
from pruning_core.minitron.structure import AttentionUnit, DecoderStructure
from pruning_core.minitron.width_scores import WidthScores
from pruning_core.validate import check_finite


def top_k_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores (ties: lower index wins), returned ascending."""
    if k < 0:
        raise ConfigError("k", f"must be >= 0, got {k}")
    check_finite(scores, method="top_k_indices", what="scores")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return sorted(int(i) for i in order[:k])


def select_heads(head_scores: torch.Tensor, num_kv_heads: int, num_heads: int, target_kv: int) -> list[int]:
    """Query heads to keep in one layer, GQA-consistent.

    Query head ``h`` belongs to KV group ``h // r`` (``r = H / G``). A KV group scores the sum
    of its best ``r' = num_heads / target_kv`` query heads; the best ``target_kv`` groups stay,
    each with its best ``r'`` query heads, so every kept group has the same size.

    Args:
        head_scores: ``[H]`` query-head importance.
        num_kv_heads: G of the dense layer.
        num_heads: target query heads (a multiple of ``target_kv``).
        target_kv: target KV groups (``<= G``).

    Returns:
        Kept query heads, ascending (grouped by KV group, in group order).
    """
    total = head_scores.numel()
    if num_kv_heads < 1 or total % num_kv_heads:
        raise ConfigError("num_key_value_heads", f"{total} heads are not divisible into {num_kv_heads} KV groups")
    if target_kv < 1 or num_heads < 1 or num_heads % target_kv or target_kv > num_kv_heads:
        raise ConfigError("num_attention_heads", f"target {num_heads} heads / {target_kv} KV groups is not "
                          f"a whole number of heads per group within {num_kv_heads} groups")
    per_group, dense_per_group = num_heads // target_kv, total // num_kv_heads
    if per_group > dense_per_group:
        raise ConfigError("num_attention_heads", f"{per_group} heads per group > {dense_per_group} in the model")
    check_finite(head_scores, method="select_heads", what="head scores")
    grouped = head_scores.double().reshape(num_kv_heads, dense_per_group)  # [G, r]
    order = torch.sort(grouped, dim=1, descending=True, stable=True).indices[:, :per_group]  # [G, r']
    group_scores = torch.gather(grouped, 1, order).sum(dim=1)  # [G]
    kept_groups = top_k_indices(group_scores, target_kv)
    return sorted(g * dense_per_group + int(i) for g in kept_groups for i in order[g])


def width_plan(
    graph: DependencyGraph, structure: DecoderStructure, scores: WidthScores, target: Architecture
) -> StructuredPlan:
    """The plan that slices the dense model to ``target``'s widths (depth is left alone).

    Raises:
        ConfigError: a target width above the dense one, or inconsistent head targets.
    """
    dense = _dense_widths(structure)
    target_widths = Architecture(num_layers=structure.num_layers, hidden_size=target.hidden_size,
                                 intermediate_size=target.intermediate_size,
                                 num_attention_heads=target.num_attention_heads,
                                 num_key_value_heads=target.num_key_value_heads)
    target_widths.check_within(dense)
    groups: list[ChannelGroup] = []
    if target.hidden_size < dense.hidden_size:
        removed = _complement(top_k_indices(scores.hidden, target.hidden_size), dense.hidden_size)
        groups.append(channel_group(graph, structure.embedding, removed))
    for i, unit in enumerate(structure.mlp):
        if target.intermediate_size < unit.size:
            removed = _complement(top_k_indices(scores.neurons[i], target.intermediate_size), unit.size)
            groups.append(channel_group(graph, unit.down, removed, space="in"))
    for i, unit in enumerate(structure.attention):
        if (target.num_attention_heads, target.num_key_value_heads) != (unit.num_heads, unit.num_kv_heads):
            groups.append(_head_group(graph, unit, scores.heads[i], target))
    config = {"hidden_size": target.hidden_size, "intermediate_size": target.intermediate_size,
              "num_attention_heads": target.num_attention_heads, "num_key_value_heads": target.num_key_value_heads}
    return plan_from_groups(graph, groups, config)


def _head_group(graph: DependencyGraph, unit: AttentionUnit, scores: torch.Tensor, target: Architecture) -> ChannelGroup:
    kept = select_heads(scores, unit.num_kv_heads, target.num_attention_heads, target.num_key_value_heads)
    removed_heads = _complement(kept, unit.num_heads)
    channels = [h * unit.head_dim + j for h in removed_heads for j in range(unit.head_dim)]
    group = channel_group(graph, unit.node, channels, space="q")  # q rows wherever they sit (fused qkv_proj)
    kv_left = unit.num_kv_heads - len(group.channels(unit.node, "k")) // unit.head_dim
    if kv_left != target.num_key_value_heads:  # the graph's GQA rule must agree with the selection
        raise GraphError(f"'{unit.node}': head selection keeps {kv_left} KV groups, target {target.num_key_value_heads}")
    return group


def _complement(kept: list[int], size: int) -> list[int]:
    keep = set(kept)
    return [i for i in range(size) if i not in keep]


def _dense_widths(structure: DecoderStructure) -> Architecture:
    unit, mlp = structure.attention[0], structure.mlp[0]
    return Architecture(num_layers=structure.num_layers, hidden_size=structure.hidden_size, intermediate_size=mlp.size,
                        num_attention_heads=unit.num_heads, num_key_value_heads=unit.num_kv_heads)


__all__ = ["select_heads", "top_k_indices", "width_plan"]
