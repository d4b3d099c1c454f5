"""Node and edge value types of the channel dependency graph.

Stage: structured plans. A graph node is a layer or an operation that owns one or more
*channel spaces* (the last dimension of the tensors it reads or writes); an edge says that the
output channels of one node are the input channels of another. The node type decides how
channel spaces are shared inside a node (see :func:`spaces_of`):

- transform nodes (``LINEAR``, ``CONV``, ``EMBEDDING``, ``MLP``) have separate ``in`` and
  ``out`` spaces: pruning an output row does not touch the input columns;
- pass-through nodes (norms, activations, ``ADD``, ``MUL``, ``CONCAT``, ``SLICE``, ``POOLING``)
  have one space ``io``: input channel ``c`` is output channel ``c`` (for ``CONCAT``, inputs sit
  at the offsets carried by their edges; a ``SLICE`` is a window of its input, at the offset its
  incoming edge carries);
- ``ATTENTION`` has ``q``, ``k``, ``v`` and ``out`` spaces tied head by head
  (:mod:`pruning_core.graph.propagate`); each of q/k/v is a window of its producer's output
  (all of ``q_proj``'s output, or rows ``[Hq*d, (Hq+G)*d)`` of a fused ``qkv_proj`` for k);
- ``INPUT`` / ``OUTPUT`` are the model interface; ``OTHER`` is an operation the graph does not
  understand, and any pruning that reaches it is refused.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class NodeType(enum.Enum):
    """Kind of layer or operation a :class:`GraphNode` stands for (layer kinds, plus traced ops)."""

    LINEAR = "linear"
    CONV = "conv"
    LAYER_NORM = "layer_norm"  # LayerNorm and RMSNorm
    BATCH_NORM = "batch_norm"
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    MLP = "mlp"
    ACTIVATION = "activation"
    POOLING = "pooling"
    INPUT = "input"
    OUTPUT = "output"
    OTHER = "other"
    ADD = "add"  # elementwise add/sub of two channel-carrying tensors (residual joins)
    MUL = "mul"  # elementwise mul/div of two channel-carrying tensors (SwiGLU gate * up)
    CONCAT = "concat"  # concatenation along the channel (last) dimension
    SLICE = "slice"  # a contiguous window of the channel dimension (chunk/split/slice of a fused output)


class DependencyType(enum.Enum):
    """How the channels at the two ends of a :class:`GraphEdge` are coupled."""

    SEQUENTIAL = "sequential"  # from's output channels are to's input channels
    SKIP = "skip"  # residual input of an ADD: it bypasses the branch that joins it
    CONCAT = "concat"  # input of a CONCAT node at offset ``dim_index``
    SLICE = "slice"  # a SLICE node reads ``from_``'s channels ``[dim_index, dim_index + width)``
    ADD = "add"  # branch input of an ADD node (shared channel space)
    MUL = "mul"  # input of a MUL node (shared channel space)
    ATTENTION = "attention"  # q/k/v projection into an ATTENTION node (``role`` q, k or v), a
    # window of the projection's output starting at ``dim_index`` (0 unless the projection is fused)
    TIED = "tied"  # the two nodes share a parameter; ``role`` "<from space>:<to space>"


TRANSFORM_TYPES = frozenset({NodeType.LINEAR, NodeType.CONV, NodeType.EMBEDDING, NodeType.MLP})
PASS_THROUGH_TYPES = frozenset(
    {
        NodeType.LAYER_NORM,
        NodeType.BATCH_NORM,
        NodeType.ACTIVATION,
        NodeType.POOLING,
        NodeType.ADD,
        NodeType.MUL,
        NodeType.CONCAT,
        NodeType.SLICE,
    }
)
# Edges whose target reads a window of the source: channel c of the target is channel
# c + dim_index of the source (the window's width is the target space's size).
WINDOW_EDGES = frozenset({DependencyType.SLICE, DependencyType.ATTENTION})
ATTENTION_SPACES = ("q", "k", "v", "out")


def spaces_of(node_type: NodeType) -> tuple[str, ...]:
    """Names of the channel spaces a node of this type owns."""
    if node_type in TRANSFORM_TYPES:
        return ("in", "out")
    if node_type in PASS_THROUGH_TYPES:
        return ("io",)
    if node_type is NodeType.ATTENTION:
        return ATTENTION_SPACES
    if node_type is NodeType.INPUT:
        return ("out",)
    if node_type is NodeType.OUTPUT:
        return ("in",)
    return ("in", "out")  # OTHER: never propagated through


def out_space(node_type: NodeType) -> str:
    """The space an outgoing edge leaves from (``io`` for pass-through nodes)."""
    return "io" if node_type in PASS_THROUGH_TYPES else "out"


@dataclass(frozen=True, slots=True)
class GraphNode:
    """A layer or operation. ``input_dim``/``output_dim`` of 0 mean "unknown" (not checked).

    ``module`` is the qualified name of the torch module it stands for (``None`` for ops and
    hand-built graphs); ``attrs`` holds plain-data extras: ``params`` maps a space to the
    ``[param_name, dim]`` pairs that index it (how a plan slices weights), and attention nodes
    carry ``num_heads``, ``num_kv_heads`` and ``head_dim``.
    """

    id: str
    name: str
    node_type: NodeType
    input_dim: int = 0
    output_dim: int = 0
    prunable: bool = True
    module: str | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", dict(self.attrs))  # a private copy (picklable)

    @classmethod
    def new(cls, id: str, name: str, node_type: NodeType) -> GraphNode:
        """A node with unknown dims, prunable."""
        return cls(id=id, name=name, node_type=node_type)

    def with_dims(self, input_dim: int, output_dim: int) -> GraphNode:
        """Copy with dims set. Note the argument order: **(input, output)**."""
        return replace(self, input_dim=int(input_dim), output_dim=int(output_dim))

    def with_prunable(self, prunable: bool) -> GraphNode:
        return replace(self, prunable=bool(prunable))

    def space_dim(self, space: str) -> int:
        """Size of one channel space (0 when unknown)."""
        if self.node_type is NodeType.ATTENTION:
            heads = int(self.attrs.get("num_kv_heads" if space in ("k", "v") else "num_heads", 0))
            return heads * int(self.attrs.get("head_dim", 0))
        return self.input_dim if space == "in" else self.output_dim


@dataclass(frozen=True, slots=True)
class GraphEdge:
    """A data dependency ``from_ -> to``.

    ``dim_index`` is the channel offset of ``from_``'s output inside ``to``'s input for ``CONCAT``
    edges, the offset of ``to``'s window inside ``from_``'s output for ``SLICE`` and
    ``ATTENTION`` edges (:data:`WINDOW_EDGES`), 0 otherwise. ``role`` names the attention input
    (``q``, ``k``, ``v``) for ``ATTENTION`` edges and the coupled spaces for ``TIED`` edges
    (``"out:in"``).
    """

    from_: str
    to: str
    dep_type: DependencyType = DependencyType.SEQUENTIAL
    dim_index: int = 0
    role: str = ""

    @classmethod
    def new(cls, from_: str, to: str, dep_type: DependencyType) -> GraphEdge:
        return cls(from_=from_, to=to, dep_type=dep_type)

    def with_dim_index(self, index: int) -> GraphEdge:
        return replace(self, dim_index=int(index))

    def target_space(self, to_type: NodeType) -> str:
        """The space of ``to`` this edge feeds."""
        if self.dep_type is DependencyType.TIED:
            return self.role.split(":")[1]
        if to_type is NodeType.ATTENTION:
            return self.role
        return "io" if to_type in PASS_THROUGH_TYPES else "in"

    def source_space(self, from_type: NodeType) -> str:
        """The space of ``from_`` this edge leaves from."""
        if self.dep_type is DependencyType.TIED:
            return self.role.split(":")[0]
        return out_space(from_type)


__all__ = [
    "ATTENTION_SPACES",
    "DependencyType",
    "GraphEdge",
    "GraphNode",
    "NodeType",
    "PASS_THROUGH_TYPES",
    "TRANSFORM_TYPES",
    "WINDOW_EDGES",
    "out_space",
    "spaces_of",
]
