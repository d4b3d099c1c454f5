"""The dependency graph of non-Llama layouts: projections found by role, not by name position.

Phi-3 fuses q|k|v into ``qkv_proj`` and gate|up into ``gate_up_proj``; Qwen3 and Gemma 3 apply
``q_norm``/``k_norm`` per head inside attention; Gemma 2 only runs eager attention (soft-capping)
and has pre/post feed-forward norms. Tiny random models of the real classes (tests/tiny_models.py).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from pruning_core.errors import GraphError
from pruning_core.graph import (
    AxisEdit,
    DependencyType,
    NodeType,
    StructuredPlan,
    apply_plan_,
    build_dependency_graph,
    channel_group,
    plan_from_groups,
)
from tests.tiny_models import VOCAB, make_tiny

IDS = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
ATT = "model.layers.0.self_attn"


@functools.cache
def traced(name: str):
    model = make_tiny(name)
    return model, build_dependency_graph(model, kwargs={"input_ids": IDS, "use_cache": False})


def test_fused_qkv_feeds_q_k_and_v_from_its_row_windows():
    """4 heads x 16 and 2 KV heads: q = rows [0, 64), k = [64, 96), v = [96, 128) of qkv_proj."""
    _, graph = traced("phi3")
    edges = {e.role: (e.from_, e.dim_index) for e in graph.edges_to(ATT) if e.dep_type is DependencyType.ATTENTION}
    assert edges == {"q": (ATT + ".qkv_proj", 0), "k": (ATT + ".qkv_proj", 64), "v": (ATT + ".qkv_proj", 96)}
    group = channel_group(graph, ATT, range(32, 48), space="q")  # query head 2 alone: its KV group stays
    assert group.channels(ATT + ".qkv_proj", "out") == tuple(range(32, 48))
    group = channel_group(graph, ATT, range(16, 32), space="k")  # KV group 1: query heads 2, 3 and its k, v rows
    assert group.channels(ATT + ".qkv_proj", "out") == (*range(32, 64), *range(80, 96), *range(112, 128))
    assert group.channels(ATT + ".o_proj", "in") == tuple(range(32, 64))


def test_chunked_gate_up_keeps_each_neuron_with_its_pair():
    """gate = rows [0, 128), up = rows [128, 256) of gate_up_proj: neuron n is rows n and 128 + n."""
    _, graph = traced("phi3")
    slices = sorted((e.dim_index, e.to) for e in graph.edges_from("model.layers.0.mlp.gate_up_proj")
                    if e.dep_type is DependencyType.SLICE)
    assert [offset for offset, _ in slices] == [0, 128]
    assert all(graph.node(n).node_type is NodeType.SLICE and graph.node(n).output_dim == 128 for _, n in slices)
    group = channel_group(graph, "model.layers.0.mlp.down_proj", [5, 70], space="in")
    assert group.channels("model.layers.0.mlp.gate_up_proj", "out") == (5, 70, 133, 198)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_q_and_k_norms_sit_inside_the_attention(name):
    _, graph = traced(name)
    node = graph.node(ATT)
    assert node.attrs["inner"] == [ATT + ".k_norm", ATT + ".q_norm"]
    assert {e.role: e.from_ for e in graph.edges_to(ATT)} == {r: f"{ATT}.{r}_proj" for r in "qkv"}
    assert graph.get_node(ATT + ".q_norm") is None and graph.get_node(ATT + ".k_norm") is None


def test_eager_attention_with_soft_capping_is_found():
    """Gemma 2 computes softmax(tanh(q k^T / c) c + mask) v by hand; its four norms are all on the
    residual stream, none is taken for a projection."""
    model, graph = traced("gemma2")
    assert model.config._attn_implementation == "eager"
    node = graph.node(ATT)
    assert (node.attrs["num_heads"], node.attrs["num_kv_heads"], node.attrs["head_dim"]) == (4, 2, 16)
    residual = channel_group(graph, "model.embed_tokens", [0]).node_ids()
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        assert f"model.layers.0.{norm}" in residual and graph.node(f"model.layers.0.{norm}").node_type is NodeType.LAYER_NORM


def test_plans_state_the_sizes_their_groups_imply():
    """plan_from_groups reads the new sizes off the roles: a hand-made Phi-3 plan reloads."""
    model, graph = traced("phi3")
    groups = [channel_group(graph, f"model.layers.{i}.self_attn", range(16), space="k") for i in range(2)]
    groups += [channel_group(graph, f"model.layers.{i}.mlp.down_proj", range(64), space="in") for i in range(2)]
    plan = plan_from_groups(graph, groups)
    assert plan.config == {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
    pruned = apply_plan_(copy.deepcopy(model), plan)
    assert pruned.model.layers[1].self_attn.num_key_value_heads == 1  # Phi-3 slices qkv with this attribute
    with torch.no_grad():
        assert pruned(IDS).logits.shape == (1, 8, VOCAB)
    with pytest.raises(GraphError, match="contradicts"):
        plan_from_groups(graph, groups, {"num_attention_heads": 4})


def test_a_fused_projection_sliced_inconsistently_is_refused():
    """Cutting only q rows out of qkv_proj leaves a weight no Phi-3 config describes."""
    model, _ = traced("phi3")
    edits = tuple(AxisEdit(f"model.layers.{i}.self_attn.qkv_proj.weight", 0, 128, tuple(range(16, 128)))
                  for i in range(2))
    with pytest.raises(GraphError, match="qkv_proj.weight: \\(112, 64\\) after the edit, \\(128, 64\\)"):
        apply_plan_(copy.deepcopy(model), StructuredPlan(edits))


class ChunkNet(nn.Module):
    def __init__(self, split: bool) -> None:
        super().__init__()
        self.a, self.b, self.split = nn.Linear(4, 8), nn.Linear(4, 3), split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        gate, up = h.split([4, 4], dim=-1) if self.split else h.chunk(2, dim=-1)
        return self.b(torch.relu(gate) * up)


def test_chunk_pieces_are_slices_and_fixed_splits_block():
    """chunk(2) follows the size (pieces stay equal: tied position by position); a split into
    given sizes would select other channels once pruned, so it blocks like any unknown op."""
    graph = build_dependency_graph(ChunkNet(split=False), (torch.randn(2, 4),))
    assert channel_group(graph, "b", [1], space="in").channels("a", "out") == (1, 5)
    graph = build_dependency_graph(ChunkNet(split=True), (torch.randn(2, 4),))
    with pytest.raises(GraphError, match="non-prunable"):
        channel_group(graph, "b", [1], space="in")
