"""The prunable width axes of a decoder-only LM, read off its traced dependency graph.

Stage: plans. Nothing here is typed by hand per model: the residual stream is the channel
group of the token embedding; each layer's attention unit is an ATTENTION node with its q/k/v
producers (separate or one fused ``qkv_proj``), its per-head norms and the Linear that consumes
its output; each layer's MLP unit is a gated product ``act(gate) * up`` whose consumer is a
Linear (down) (:mod:`pruning_core.graph.roles`). Layer membership comes from module names under
the decoder list. Every weight of every decoder block must be one of these roles (or a norm on
the residual stream), or the model is refused: a weight nobody accounts for would be left at
its dense size, or silently dropped, in a pruned model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from pruning_core.arch import decoder_blocks
from pruning_core.errors import GraphError, UnsupportedArchitecture
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.propagate import coupled_spaces
from pruning_core.graph.roles import AttentionUnit, MlpUnit, attention_units, mlp_units, token_embedding
from pruning_core.graph.trace import build_dependency_graph
from pruning_core.graph.types import NodeType
from pruning_core.minitron.families import block_pattern, check_supported

U = TypeVar("U")


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
        UnsupportedArchitecture: not a supported family (:func:`check_supported`), no token
            embedding, a layer without exactly one attention and one gated MLP unit, or a block
            weight none of them accounts for (names the block and its module pattern).
    """
    check_supported(model)
    path, blocks = decoder_blocks(model)
    try:
        embedding = token_embedding(graph)
        residual = coupled_spaces(graph, embedding.id)
        units = attention_units(graph)
        mlps = mlp_units(graph)
    except GraphError as exc:
        raise UnsupportedArchitecture(type(model).__name__, f"the traced graph does not map: {exc}",
                                      block=f"{path}.0", pattern=block_pattern(blocks[0])) from exc
    norms = tuple(n.id for n in graph.nodes() if (n.id, "io") in residual and n.node_type is NodeType.LAYER_NORM)
    attention = _by_layer(model, path, units, lambda u: u.node, "attention")
    mlp = _by_layer(model, path, mlps, lambda u: u.mul, "gated MLP")
    structure = DecoderStructure(path, embedding.id, embedding.output_dim, norms, attention, mlp)
    _check_every_weight_has_a_role(model, structure)
    return structure


def trace_decoder(model: nn.Module, example_ids: torch.Tensor) -> tuple[DependencyGraph, DecoderStructure]:
    """Trace a HF decoder LM on ``example_ids`` (``[1, T]`` token ids; a few tokens suffice) and
    return its dependency graph and width structure (what every Minitron step needs).

    Raises:
        UnsupportedArchitecture: the model is not one Minitron can prune (checked before the
            trace, then on the traced structure).
    """
    check_supported(model)
    graph = build_dependency_graph(model, kwargs={"input_ids": example_ids, "use_cache": False})
    return graph, decoder_structure(model, graph)


def _by_layer(model: nn.Module, path: str, units: list[U], key: Callable[[U], str], kind: str) -> tuple[U, ...]:
    blocks = model.get_submodule(path)
    pattern = re.compile(re.escape(path) + r"\.(\d+)[.:]")
    slots: list[list[U]] = [[] for _ in blocks]
    for unit in units:
        match = pattern.match(key(unit))
        if match and int(match.group(1)) < len(blocks):
            slots[int(match.group(1))].append(unit)
    bad = [i for i, found in enumerate(slots) if len(found) != 1]
    if bad:
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        hint = f" (attention implementation {attn!r}; sdpa and eager are traceable)" if kind == "attention" else ""
        raise UnsupportedArchitecture(type(model).__name__, f"layers {bad} of '{path}' do not have exactly one "
                                      f"{kind} unit{hint}", block=f"{path}.{bad[0]}",
                                      pattern=block_pattern(blocks[bad[0]]))
    return tuple(found[0] for found in slots)


def _check_every_weight_has_a_role(model: nn.Module, structure: DecoderStructure) -> None:
    """Each decoder block's parameters belong to its attention unit, MLP unit or residual norms."""
    path = structure.layers_path
    known = set(structure.norms)
    for unit in structure.attention:
        known |= {unit.q, unit.k, unit.v, unit.o, *unit.inner}
    for mlp in structure.mlp:
        known |= {*mlp.producers, mlp.down}
    for i, block in enumerate(model.get_submodule(path)):
        for name, param in block.named_parameters():
            module = f"{path}.{i}.{name}".rpartition(".")[0]
            if module not in known:
                raise UnsupportedArchitecture(
                    type(model).__name__, f"weight '{name}' {list(param.shape)} is neither a projection of the "
                    "attention or gated MLP nor a norm on the residual stream", block=f"{path}.{i}",
                    pattern=f"{module.removeprefix(f'{path}.{i}.')}: {type(model.get_submodule(module)).__name__}")


__all__ = ["AttentionUnit", "DecoderStructure", "MlpUnit", "decoder_structure", "trace_decoder"]
