"""The prunable width axes of a decoder-only LM, read off its traced dependency graph.

Stage: plans. Nothing here is typed by hand per model: the residual stream is the channel
group of the (single) embedding; each layer's attention unit is an ATTENTION node with its
q/k/v producers and the Linear that consumes its output; each layer's MLP unit is a MUL node
(the SwiGLU product) whose consumer is a Linear (down) and whose producers are the Linears
coupled to it (gate, up). Layer membership comes from module names under the decoder list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from pruning_core.errors import GraphError
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.hf import decoder_layers_path
from pruning_core.graph.propagate import coupled_spaces
from pruning_core.graph.trace import build_dependency_graph
from pruning_core.graph.types import DependencyType, NodeType

U = TypeVar("U")


@dataclass(frozen=True, slots=True)
class AttentionUnit:
    node: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class MlpUnit:
    mul: str
    producers: tuple[str, ...]  # gate (through the activation) and up
    down: str
    size: int


@dataclass(frozen=True, slots=True)
class DecoderStructure:
    """Width axes of a decoder LM: residual (embedding + norms), per-layer attention and MLP."""

    layers_path: str
    embedding: str
    hidden_size: int
    norms: tuple[str, ...]
    attention: tuple[AttentionUnit, ...]
    mlp: tuple[MlpUnit, ...]

    @property
    def num_layers(self) -> int:
        return len(self.attention)


def decoder_structure(model: nn.Module, graph: DependencyGraph) -> DecoderStructure:
    """Find the residual stream, attention and MLP units of every layer in ``graph``.

    Raises:
        GraphError: not exactly one embedding, or a layer without exactly one attention
            and one MLP unit.
    """
    path = decoder_layers_path(model)
    num_layers = len(model.get_submodule(path))
    embeddings = graph.nodes_of_type(NodeType.EMBEDDING)
    if len(embeddings) != 1:
        raise GraphError(f"expected one embedding in the graph, found {[n.id for n in embeddings]}")
    embedding = embeddings[0]
    residual = coupled_spaces(graph, embedding.id)
    norms = tuple(n.id for n in graph.nodes() if (n.id, "io") in residual and n.node_type is NodeType.LAYER_NORM)
    units = [_attention_unit(graph, n.id) for n in graph.nodes_of_type(NodeType.ATTENTION)]
    attention = _by_layer(path, num_layers, units, lambda u: u.node, "attention")
    mlps = [m for m in (_mlp_unit(graph, n.id) for n in graph.nodes_of_type(NodeType.MUL)) if m is not None]
    mlp = _by_layer(path, num_layers, mlps, lambda u: u.mul, "MLP")
    return DecoderStructure(path, embedding.id, embedding.output_dim, norms, attention, mlp)


def trace_decoder(model: nn.Module, example_ids: torch.Tensor) -> tuple[DependencyGraph, DecoderStructure]:
    """Trace a HF decoder LM on ``example_ids`` (``[1, T]`` token ids; a few tokens suffice) and
    return its dependency graph and width structure (what every Minitron step needs)."""
    graph = build_dependency_graph(model, kwargs={"input_ids": example_ids, "use_cache": False})
    return graph, decoder_structure(model, graph)


def _attention_unit(graph: DependencyGraph, node_id: str) -> AttentionUnit:
    node = graph.node(node_id)
    roles = {e.role: e.from_ for e in graph.edges_to(node_id) if e.dep_type is DependencyType.ATTENTION}
    consumers = [e.to for e in graph.edges_from(node_id) if graph.node(e.to).node_type is NodeType.LINEAR]
    if set(roles) != {"q", "k", "v"} or len(consumers) != 1:
        raise GraphError(f"attention '{node_id}': expected q/k/v inputs and one output Linear, got {roles}, {consumers}")
    return AttentionUnit(node_id, roles["q"], roles["k"], roles["v"], consumers[0], int(node.attrs["num_heads"]),
                         int(node.attrs["num_kv_heads"]), int(node.attrs["head_dim"]))


def _mlp_unit(graph: DependencyGraph, mul_id: str) -> MlpUnit | None:
    consumers = [e.to for e in graph.edges_from(mul_id) if graph.node(e.to).node_type is NodeType.LINEAR]
    if len(consumers) != 1:
        return None
    members = coupled_spaces(graph, mul_id, "io")
    producers = tuple(n for n, space in sorted(members) if space == "out" and graph.node(n).node_type is NodeType.LINEAR)
    return MlpUnit(mul_id, producers, consumers[0], graph.node(mul_id).output_dim)


def _by_layer(path: str, num_layers: int, units: list[U], key: Callable[[U], str], kind: str) -> tuple[U, ...]:
    pattern = re.compile(re.escape(path) + r"\.(\d+)[.:]")
    slots: list[list[U]] = [[] for _ in range(num_layers)]
    for unit in units:
        match = pattern.match(key(unit))
        if match and int(match.group(1)) < num_layers:
            slots[int(match.group(1))].append(unit)
    bad = [i for i, found in enumerate(slots) if len(found) != 1]
    if bad:
        raise GraphError(f"layers {bad} of '{path}' do not have exactly one {kind} unit")
    return tuple(found[0] for found in slots)


__all__ = ["AttentionUnit", "DecoderStructure", "MlpUnit", "decoder_structure", "trace_decoder"]
