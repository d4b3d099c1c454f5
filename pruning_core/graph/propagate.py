"""What pruning a set of channels implies: the transitive channel group.

Stage: structured plans. Starting from channels of one node's space, a worklist fixpoint
follows every coupling until nothing new is reached:

- along an edge ``A -> B``: A's output channel ``c`` is B's input channel ``c + offset``
  (offset = ``dim_index`` for CONCAT edges, ``-dim_index`` for window edges: a SLICE of a fused
  output or the q/k/v part of a fused ``qkv_proj``, else 0), and back; channels that fall
  outside the other end's span do not cross (a slice sees only its window);
- inside a pass-through node (norm, activation, ADD, MUL, CONCAT): one shared space ``io``,
  so channels flow from any input to every other input and to all consumers — this is how a
  residual stream couples every layer's hidden size (Add/Skip) and how gate and up are tied
  through the SwiGLU product (Mul);
- inside an ATTENTION node: a channel prunes its whole head (``head_dim`` rows). Query heads
  and the output columns are the same heads; a KV head goes when all query heads of its group
  are gone, and pruning a KV head (k or v) prunes its whole query group (GQA);
- TIED edges identify two nodes' spaces that index the same shared parameter.

Transform nodes (Linear, Embedding) stop the flow: their ``in`` and ``out`` spaces are
independent. Reaching a node that may not lose channels (``prunable=False``: the model's
inputs/outputs, ops the tracer does not understand) raises :class:`GraphError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from pruning_core.errors import GraphError, InvalidSparsity
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.types import (
    WINDOW_EDGES,
    DependencyType,
    GraphEdge,
    GraphNode,
    NodeType,
    out_space,
    spaces_of,
)

Member = tuple[str, str]  # (node id, space)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together: ``members[(node_id, space)] -> sorted channels``."""

    members: Mapping[Member, tuple[int, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", dict(self.members))  # a private copy (picklable)

    def node_ids(self) -> set[str]:
        return {nid for nid, _ in self.members}

    def channels(self, node_id: str, space: str) -> tuple[int, ...]:
        return self.members.get((node_id, space), ())

    def __contains__(self, member: object) -> bool:
        return member in self.members


def channel_group(
    graph: DependencyGraph, source: str, channels: Iterable[int], *, space: str | None = None
) -> ChannelGroup:
    """The transitive closure of pruning ``channels`` of ``source``'s ``space``.

    Args:
        graph: the dependency graph.
        source: node id.
        channels: channel indices in ``space`` (default: the node's output space).
        space: one of :func:`~pruning_core.graph.types.spaces_of` for the node.

    Returns:
        The group; it contains the source member too (possibly widened, e.g. to whole heads).

    Raises:
        GraphError: unknown node/space, or the group reaches a non-prunable node.
        InvalidSparsity: a channel is negative or not below the space's size.
    """
    node = graph.node(source)
    space = space or out_space(node.node_type)
    if space not in spaces_of(node.node_type):
        raise GraphError(f"node '{source}' ({node.node_type.value}) has no space '{space}'")
    start = _checked_channels(node, space, channels)
    members: dict[Member, set[int]] = {}
    pending: deque[tuple[str, str, set[int]]] = deque([(source, space, start)])
    while pending:
        nid, sp, chans = pending.popleft()
        have = members.setdefault((nid, sp), set())
        new = chans - have
        if not new:
            continue
        have |= new
        current = graph.node(nid)
        if not current.prunable:
            raise GraphError(
                f"pruning channels of '{source}' reaches non-prunable node '{nid}' "
                f"({current.node_type.value}, space '{sp}'); {len(new)} channels would be removed there"
            )
        pending.extend(_neighbours(graph, current, sp, new, have))
    return ChannelGroup({k: tuple(sorted(v)) for k, v in members.items() if v})


def propagate_channel_pruning(graph: DependencyGraph, source: str, channels: Iterable[int]) -> dict[str, list[int]]:
    """A per-node view of :func:`channel_group` for ``source``'s output channels.

    Returns ``{node_id: channels}`` for every other affected node, in the space where it is
    affected (input columns for a consumer Linear, output rows for a producer coupled
    through an ADD, the query/output head channels for an attention node). A node affected
    in two separate spaces appears twice, as ``"id:space"``. The source itself appears only
    if the coupling widened its channel set (e.g. to whole attention heads).
    """
    chans = sorted(set(int(c) for c in channels))
    group = channel_group(graph, source, chans)
    src_space = out_space(graph.node(source).node_type)
    by_node: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for (nid, sp), ch in group.members.items():
        if nid == source and sp == src_space and list(ch) == chans:
            continue
        if graph.node(nid).node_type is NodeType.ATTENTION and sp not in ("q",):
            if (nid, "q") in group.members:
                continue
        by_node.setdefault(nid, []).append((sp, ch))
    out: dict[str, list[int]] = {}
    for nid, entries in by_node.items():
        if len(entries) == 1:
            out[nid] = list(entries[0][1])
        else:
            out.update({f"{nid}:{sp}": list(ch) for sp, ch in entries})
    return out


def coupled_spaces(graph: DependencyGraph, node_id: str, space: str | None = None) -> set[Member]:
    """Every ``(node, space)`` that must change size together with ``node_id``'s ``space``.

    Computed by propagating *all* channels of the space (its size must be known).
    """
    node = graph.node(node_id)
    space = space or out_space(node.node_type)
    dim = node.space_dim(space)
    if dim <= 0:
        raise GraphError(f"node '{node_id}' space '{space}' has unknown size; cannot compute its coupling")
    return set(channel_group(graph, node_id, range(dim), space=space).members)


def _checked_channels(node: GraphNode, space: str, channels: Iterable[int]) -> set[int]:
    dim = node.space_dim(space)
    out: set[int] = set()
    for c in channels:
        c = int(c)
        if c < 0 or (dim and c >= dim):
            raise InvalidSparsity(float(c), f"Channel {c} outside [0, {dim}) for layer {node.id} ({space})")
        out.add(c)
    return out


def _neighbours(
    graph: DependencyGraph, node: GraphNode, space: str, new: set[int], have: set[int]
) -> Iterator[tuple[str, str, set[int]]]:
    """Members reached in one step from ``new`` channels of ``(node, space)``."""
    if node.node_type is NodeType.ATTENTION:
        yield from _attention_rule(node, space, have)
    for edge in graph.edges_from(node.id):
        if edge.source_space(node.node_type) == space:
            dst = graph.node(edge.to)
            dst_space = edge.target_space(dst.node_type)
            ahead = _shift(edge, new, dst.space_dim(dst_space), forward=True)
            if ahead:
                yield edge.to, dst_space, ahead
    for edge in graph.edges_to(node.id):
        if edge.target_space(node.node_type) == space:
            src = graph.node(edge.from_)
            src_space = edge.source_space(src.node_type)
            back = _shift(edge, new, src.space_dim(src_space), forward=False)
            if back:
                yield edge.from_, src_space, back


def _shift(edge: GraphEdge, channels: set[int], far_size: int, *, forward: bool) -> set[int]:
    """``channels`` at one end of ``edge`` as channels at the other end (``far_size``: that end's
    size, 0 if unknown). A CONCAT input sits at ``dim_index`` inside the concat; a window edge's
    target (:data:`WINDOW_EDGES`) is the source's channels from ``dim_index`` on; channels
    outside the far end's span do not cross."""
    if edge.dep_type is DependencyType.CONCAT:
        off = edge.dim_index if forward else -edge.dim_index
    elif edge.dep_type in WINDOW_EDGES:
        off = -edge.dim_index if forward else edge.dim_index
    else:
        return set(channels)
    return {c + off for c in channels if c + off >= 0 and (far_size == 0 or c + off < far_size)}


def _attention_rule(node: GraphNode, space: str, have: set[int]) -> Iterator[tuple[str, str, set[int]]]:
    """Head couplings of one attention node (GQA: query head h belongs to KV group h // r)."""
    heads, kv, dim = int(node.attrs["num_heads"]), int(node.attrs["num_kv_heads"]), int(node.attrs["head_dim"])
    rep = heads // kv
    if space in ("q", "out"):
        q_heads = {c // dim for c in have}
        groups = {g for g in range(kv) if all(h in q_heads for h in range(g * rep, (g + 1) * rep))}
    else:
        groups = {c // dim for c in have}
        q_heads = {h for g in groups for h in range(g * rep, (g + 1) * rep)}
    q_chans = {h * dim + i for h in q_heads for i in range(dim)}
    kv_chans = {g * dim + i for g in groups for i in range(dim)}
    for sp, chans in (("q", q_chans), ("out", q_chans), ("k", kv_chans), ("v", kv_chans)):
        if chans:
            yield node.id, sp, chans


__all__ = ["ChannelGroup", "channel_group", "coupled_spaces", "propagate_channel_pruning"]
