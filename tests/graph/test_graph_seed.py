"""Graph, propagation and PruningPlan on hand-built graphs: the seed's pinned cases and its fixed bugs."""

from __future__ import annotations

import pytest

from pruning_core.errors import GraphError, InvalidSparsity, ShapeMismatch
from pruning_core.graph import (
    DependencyGraph,
    DependencyType,
    GraphEdge,
    GraphNode,
    NodeType,
    PruningPlan,
    channel_group,
    propagate_channel_pruning,
)


def _node(nid: str, kind: NodeType = NodeType.LINEAR, d_in: int = 0, d_out: int = 0, **kw) -> GraphNode:
    return GraphNode(id=nid, name=nid, node_type=kind, input_dim=d_in, output_dim=d_out, **kw)


def _graph(nodes: list[GraphNode], edges: list[tuple]) -> DependencyGraph:
    g = DependencyGraph()
    for n in nodes:
        g.add_node(n)
    for e in edges:
        g.add_edge(GraphEdge(*e))
    return g


def _abc() -> DependencyGraph:
    g = _graph([_node("a"), _node("b"), _node("c").with_prunable(False)],
               [("a", "b", DependencyType.SEQUENTIAL), ("b", "c", DependencyType.SEQUENTIAL)])
    return g


# ----------------------------------------------------------------------------- seed pinned cases
@pytest.mark.parametrize("edge", [("x", "a"), ("a", "x")])
def test_edge_with_unknown_endpoint_is_an_error(edge):
    g = _graph([_node("a")], [])
    with pytest.raises(GraphError, match="'x' not found"):
        g.add_edge(GraphEdge(edge[0], edge[1]))


def test_linear_chain_shape():
    g = DependencyGraph.linear_chain([(768, 512), (512, 256), (256, 128)])
    assert (g.num_nodes(), g.num_edges()) == (3, 2)
    n0 = g.get_node("layer_0")
    assert (n0.input_dim, n0.output_dim) == (768, 512)
    g.validate()


def test_downstream_upstream_and_prunable():
    g = _abc()
    down = g.downstream_dependents("a")
    assert {"b", "c"} <= set(down) and "a" not in down
    assert {"a", "b"} <= set(g.upstream_dependents("c"))
    assert len(g.prunable_nodes()) == 2


def test_validate_dims():
    bad = _graph([_node("p", d_in=10, d_out=20), _node("q", d_in=30, d_out=40)], [("p", "q")])
    with pytest.raises(ShapeMismatch):
        bad.validate()
    _graph([_node("p", d_in=10, d_out=20), _node("q", d_in=20, d_out=40)], [("p", "q")]).validate()


def test_plan_totals_and_validation():
    plan = PruningPlan().remove_channels("layer0", [0, 5, 10]).remove_channels("layer1", [1, 2])
    plan.remove_layer("l3").remove_layer("l4")
    assert plan.total_channels_removed() == 5 and plan.total_layers_removed() == 2
    g = _graph([_node("a", d_in=100, d_out=50)], [])
    ok = PruningPlan().remove_channels("a", [0, 10, 20])
    ok.validate(g)
    assert ok.is_validated()
    with pytest.raises(GraphError, match="not found"):
        PruningPlan().remove_channels("zz", [0]).validate(g)
    with pytest.raises(InvalidSparsity, match="Channel 100 >= output_dim 50"):
        PruningPlan().remove_channels("a", [100]).validate(g)


def test_propagate_one_hop_seed_case():
    g = _graph([_node("a"), _node("b")], [("a", "b", DependencyType.SEQUENTIAL)])
    assert propagate_channel_pruning(g, "a", [5, 10, 15]) == {"b": [5, 10, 15]}


# ----------------------------------------------------------------------------- fixed seed bugs
def test_validate_finds_orphans_and_cycles():
    orphan = _graph([_node("a"), _node("b"), _node("lonely")], [("a", "b")])
    with pytest.raises(GraphError, match="orphan.*lonely"):
        orphan.validate()
    cyc = _graph([_node("a"), _node("b"), _node("c")], [("a", "b"), ("b", "c"), ("c", "a")])
    with pytest.raises(GraphError, match="cycle"):
        cyc.validate()


def test_remove_layer_twice_counts_once():
    """The seed appended duplicates; a layer cannot be removed twice."""
    assert PruningPlan().remove_layer("x").remove_layer("x").total_layers_removed() == 1


def test_propagation_is_transitive_through_pass_through_nodes():
    """a -> norm -> act -> b: the seed stopped after one hop (at the norm)."""
    g = _graph(
        [_node("a", d_in=4, d_out=8), _node("n", NodeType.LAYER_NORM, 8, 8),
         _node("act", NodeType.ACTIVATION, 8, 8), _node("b", d_in=8, d_out=2)],
        [("a", "n"), ("n", "act"), ("act", "b")],
    )
    assert propagate_channel_pruning(g, "a", [3]) == {"n": [3], "act": [3], "b": [3]}


def test_add_couples_both_branches_and_the_consumer():
    """Pruning one input of an Add prunes the same channels of the other input (shared space)."""
    g = _graph(
        [_node("a", d_in=4, d_out=6), _node("b", d_in=4, d_out=6), _node("add", NodeType.ADD, 6, 6),
         _node("c", d_in=6, d_out=3)],
        [("a", "add", DependencyType.SKIP), ("b", "add", DependencyType.ADD), ("add", "c")],
    )
    group = channel_group(g, "b", [0, 4])
    assert dict(group.members) == {("b", "out"): (0, 4), ("add", "io"): (0, 4), ("a", "out"): (0, 4), ("c", "in"): (0, 4)}


def test_concat_uses_offsets_both_ways():
    g = _graph(
        [_node("a", d_in=2, d_out=6), _node("b", d_in=2, d_out=4), _node("cat", NodeType.CONCAT, 10, 10),
         _node("c", d_in=10, d_out=1)],
        [("a", "cat", DependencyType.CONCAT, 0), ("b", "cat", DependencyType.CONCAT, 6), ("cat", "c")],
    )
    g.validate()
    assert propagate_channel_pruning(g, "b", [1]) == {"cat": [7], "c": [7]}
    back = channel_group(g, "c", [2, 8], space="in")
    assert back.channels("a", "out") == (2,) and back.channels("b", "out") == (2,)


def test_concat_tiling_is_validated():
    g = _graph(
        [_node("a", d_in=2, d_out=6), _node("b", d_in=2, d_out=4), _node("cat", NodeType.CONCAT, 10, 10)],
        [("a", "cat", DependencyType.CONCAT, 0), ("b", "cat", DependencyType.CONCAT, 5)],
    )
    with pytest.raises(ShapeMismatch):
        g.validate()


def _attention_graph(heads: int = 4, kv: int = 2, dim: int = 2) -> DependencyGraph:
    att = GraphNode(id="att", name="att", node_type=NodeType.ATTENTION,
                    attrs={"num_heads": heads, "num_kv_heads": kv, "head_dim": dim})
    return _graph(
        [_node("q", d_in=8, d_out=heads * dim), _node("k", d_in=8, d_out=kv * dim), _node("v", d_in=8, d_out=kv * dim),
         att, _node("o", d_in=heads * dim, d_out=8)],
        [("q", "att", DependencyType.ATTENTION, 0, "q"), ("k", "att", DependencyType.ATTENTION, 0, "k"),
         ("v", "att", DependencyType.ATTENTION, 0, "v"), ("att", "o")],
    )


def test_attention_query_channel_prunes_its_whole_head_only():
    g = _attention_graph()
    g.validate()
    group = channel_group(g, "q", [3])  # head 1 (channels 2, 3); its KV group 0 still has head 0
    assert group.channels("q", "out") == (2, 3) and group.channels("o", "in") == (2, 3)
    assert ("k", "out") not in group and ("v", "out") not in group


def test_attention_gqa_group_goes_with_all_its_query_heads():
    g = _attention_graph()
    whole_group = channel_group(g, "q", [0, 2])  # heads 0 and 1 = all of KV group 0
    assert whole_group.channels("k", "out") == (0, 1) and whole_group.channels("v", "out") == (0, 1)
    from_kv = channel_group(g, "v", [3])  # KV head 1 -> query heads 2, 3
    assert from_kv.channels("q", "out") == (4, 5, 6, 7) and from_kv.channels("o", "in") == (4, 5, 6, 7)
    assert from_kv.channels("k", "out") == (2, 3)


def test_non_prunable_node_blocks_propagation():
    g = _abc()
    with pytest.raises(GraphError, match="non-prunable node 'c'"):
        channel_group(g, "b", [0])


def test_plan_consistency_detects_contradicting_entries():
    g = _graph(
        [_node("gate", d_in=4, d_out=6), _node("up", d_in=4, d_out=6), _node("mul", NodeType.MUL, 6, 6),
         _node("down", d_in=6, d_out=4)],
        [("gate", "mul", DependencyType.MUL), ("up", "mul", DependencyType.MUL), ("mul", "down")],
    )
    PruningPlan().remove_channels("gate", [1, 2]).remove_channels("up", [1, 2]).validate(g)
    with pytest.raises(GraphError, match="contradict"):
        PruningPlan().remove_channels("gate", [1, 2]).remove_channels("up", [3]).validate(g)


def test_removing_every_channel_is_refused():
    g = _graph([_node("a", d_in=2, d_out=3)], [])
    with pytest.raises(InvalidSparsity, match="all 3 channels"):
        PruningPlan().remove_channels("a", [0, 1, 2]).validate(g)


def test_channel_out_of_range_in_propagate():
    g = _graph([_node("a", d_in=2, d_out=3), _node("b", d_in=3, d_out=1)], [("a", "b")])
    with pytest.raises(InvalidSparsity):
        propagate_channel_pruning(g, "a", [3])
