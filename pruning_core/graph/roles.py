"""Roles in a traced decoder LM: token embedding, attention units, gated (SwiGLU) MLP units.

Stage: structured plans. Roles are read off the data flow of the traced graph, never off module
names, so fused projections and extra norms are found by what they do:

- the **token embedding** is the EMBEDDING node fed by the model's token-id input (not a
  position embedding);
- an **attention unit** is an ATTENTION node: its q/k/v producers are the Linear nodes whose
  output windows feed the attention core (``q_proj``, or ``qkv_proj`` three times), its output
  projection the one Linear that consumes the attention output, its ``inner`` modules the
  per-head norms applied inside it (``q_norm``/``k_norm``);
- a **gated MLP unit** is a MUL node ``act(gate) * up`` whose two operands come from different
  producer rows (two Linears, or two SLICEs of one fused ``gate_up_proj``), one of them through
  an activation, and whose product feeds exactly one Linear (``down_proj``). GELU written as
  ``x * (1 + tanh(...))`` multiplies a value by itself and is not a gated MLP.

:func:`implied_config` turns channel groups into the Hugging Face config sizes they imply.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pruning_core.errors import GraphError
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.propagate import ChannelGroup, coupled_spaces
from pruning_core.graph.types import DependencyType, GraphNode, NodeType


@dataclass(frozen=True, slots=True)
class AttentionUnit:
    """One attention block: graph node ids of the core and of its projections (``q == k == v``
    for a fused ``qkv_proj``), head counts, and the per-head norms applied inside it."""

    node: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    inner: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MlpUnit:
    """One gated MLP: the product node, the Linears producing gate and up (one if fused), the
    down projection, and the intermediate size."""

    mul: str
    producers: tuple[str, ...]
    down: str
    size: int


def token_embedding(graph: DependencyGraph) -> GraphNode:
    """The EMBEDDING node fed by the token-id input.

    Raises:
        GraphError: there is not exactly one.
    """
    found = [n for n in graph.nodes_of_type(NodeType.EMBEDDING)
             if any(graph.node(e.from_).node_type is NodeType.INPUT for e in graph.edges_to(n.id))]
    if len(found) != 1:
        embeddings = [n.id for n in graph.nodes_of_type(NodeType.EMBEDDING)]
        raise GraphError(f"expected one token embedding (an embedding of the token-id input), found "
                         f"{[n.id for n in found]} among the embeddings {embeddings}")
    return found[0]


def attention_unit(graph: DependencyGraph, node_id: str) -> AttentionUnit:
    """The unit of ATTENTION node ``node_id``.

    Raises:
        GraphError: its q/k/v inputs or its single output Linear are missing.
    """
    node = graph.node(node_id)
    roles = {e.role: e.from_ for e in graph.edges_to(node_id) if e.dep_type is DependencyType.ATTENTION}
    consumers = [e.to for e in graph.edges_from(node_id) if graph.node(e.to).node_type is NodeType.LINEAR]
    if set(roles) != {"q", "k", "v"} or len(consumers) != 1:
        raise GraphError(f"attention '{node_id}': expected q/k/v inputs and one output Linear, got {roles}, {consumers}")
    return AttentionUnit(node_id, roles["q"], roles["k"], roles["v"], consumers[0], int(node.attrs["num_heads"]),
                         int(node.attrs["num_kv_heads"]), int(node.attrs["head_dim"]),
                         tuple(node.attrs.get("inner", ())))


def _producer_rows(graph: DependencyGraph, node_id: str) -> tuple[str, int, int] | None:
    """``(linear, start, stop)`` if ``node_id`` is a Linear's output or a SLICE of one, else None."""
    node = graph.node(node_id)
    if node.node_type is NodeType.LINEAR:
        return node_id, 0, node.output_dim
    ins = [e for e in graph.edges_to(node_id) if e.dep_type is DependencyType.SLICE]
    if node.node_type is NodeType.SLICE and len(ins) == 1 and graph.node(ins[0].from_).node_type is NodeType.LINEAR:
        return ins[0].from_, ins[0].dim_index, ins[0].dim_index + node.output_dim
    return None


def _gate_and_up(graph: DependencyGraph, mul_id: str) -> tuple[tuple[str, int, int], tuple[str, int, int]] | None:
    """The producer rows of ``act(gate)`` and ``up`` of a product node, or None if it is not gated."""
    ins = graph.edges_to(mul_id)
    if len(ins) != 2:
        return None
    acts = [e for e in ins if graph.node(e.from_).node_type is NodeType.ACTIVATION]
    if len(acts) != 1:
        return None
    act_in = graph.edges_to(acts[0].from_)
    other = ins[1] if ins[0] is acts[0] else ins[0]
    gate = _producer_rows(graph, act_in[0].from_) if len(act_in) == 1 else None
    up = _producer_rows(graph, other.from_)
    if gate is None or up is None:
        return None
    same_rows = gate[0] == up[0] and gate[1] < up[2] and up[1] < gate[2]
    return None if same_rows else (gate, up)


def _down(graph: DependencyGraph, mul_id: str) -> str | None:
    """The one Linear a gated product feeds, or None if ``mul_id`` is not a gated MLP product."""
    consumers = [e.to for e in graph.edges_from(mul_id) if graph.node(e.to).node_type is NodeType.LINEAR]
    return consumers[0] if len(consumers) == 1 and _gate_and_up(graph, mul_id) is not None else None


def mlp_unit(graph: DependencyGraph, mul_id: str) -> MlpUnit | None:
    """The gated MLP unit of product node ``mul_id``, or None if it is not one (see module doc)."""
    down = _down(graph, mul_id)
    if down is None:
        return None
    members = coupled_spaces(graph, mul_id, "io")
    producers = tuple(n for n, space in sorted(members) if space == "out" and graph.node(n).node_type is NodeType.LINEAR)
    return MlpUnit(mul_id, producers, down, graph.node(mul_id).output_dim)


def attention_units(graph: DependencyGraph) -> list[AttentionUnit]:
    return [attention_unit(graph, n.id) for n in graph.nodes_of_type(NodeType.ATTENTION)]


def mlp_units(graph: DependencyGraph) -> list[MlpUnit]:
    return [m for m in (mlp_unit(graph, n.id) for n in graph.nodes_of_type(NodeType.MUL)) if m is not None]


def implied_config(graph: DependencyGraph, groups: Iterable[ChannelGroup]) -> dict[str, int]:
    """The Hugging Face config sizes that removing ``groups`` implies, for the axes they touch.

    ``hidden_size`` from the token embedding's channels, ``num_attention_heads`` /
    ``num_key_value_heads`` from every attention unit's q/k heads, ``intermediate_size`` from
    every gated MLP unit. An axis is left out when no group touches it, or when the layers end
    up with different sizes (a single config value cannot express that; applying such a plan
    to a Hugging Face model is refused).
    """
    removed: dict[tuple[str, str], set[int]] = {}
    for group in groups:
        for member, channels in group.members.items():
            removed.setdefault(member, set()).update(channels)
    sizes: dict[str, tuple[set[int], bool]] = {}

    def add(key: str, dense: int, member: tuple[str, str], per: int = 1) -> None:
        values, touched = sizes.get(key, (set(), False))
        gone = removed.get(member, set())
        sizes[key] = (values | {dense - len(gone) // per}, touched or bool(gone))

    embeddings = [n for n in graph.nodes_of_type(NodeType.EMBEDDING)
                  if any(graph.node(e.from_).node_type is NodeType.INPUT for e in graph.edges_to(n.id))]
    if len(embeddings) == 1:
        add("hidden_size", embeddings[0].output_dim, (embeddings[0].id, "out"))
    for node in graph.nodes_of_type(NodeType.ATTENTION):
        heads, dim = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("head_dim", 0))
        if dim:
            add("num_attention_heads", heads, (node.id, "q"), dim)
            add("num_key_value_heads", int(node.attrs["num_kv_heads"]), (node.id, "k"), dim)
    for node in graph.nodes_of_type(NodeType.MUL):
        if _down(graph, node.id) is not None:
            add("intermediate_size", node.output_dim, (node.id, "io"))
    return {key: next(iter(values)) for key, (values, touched) in sizes.items() if touched and len(values) == 1}


__all__ = [
    "AttentionUnit",
    "MlpUnit",
    "attention_unit",
    "attention_units",
    "implied_config",
    "mlp_unit",
    "mlp_units",
    "token_embedding",
]
