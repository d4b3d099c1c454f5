"""The channel dependency graph: nodes, edges, queries and structural validation.

Stage: structured plans. The graph is built by hand (``add_node``/``add_edge``,
``linear_chain``) or traced from a real model by :func:`pruning_core.graph.trace.build_dependency_graph`.
What pruning a channel implies is computed by :mod:`pruning_core.graph.propagate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from pruning_core.errors import GraphError, ShapeMismatch
from pruning_core.graph.types import (
    PASS_THROUGH_TYPES,
    WINDOW_EDGES,
    DependencyType,
    GraphEdge,
    GraphNode,
    NodeType,
)


class DependencyGraph:
    """Directed graph of layers/ops; edges carry how channels are coupled (see ``types``)."""

    def __init__(self) -> None:
        self._nodes: dict[str, GraphNode] = {}
        self._edges_out: dict[str, list[GraphEdge]] = {}
        self._edges_in: dict[str, list[GraphEdge]] = {}

    # ----------------------------------------------------------------- construction
    def add_node(self, node: GraphNode) -> None:
        """Add ``node``; a node with the same id is replaced and keeps its edges."""
        self._nodes[node.id] = node
        self._edges_out.setdefault(node.id, [])
        self._edges_in.setdefault(node.id, [])

    def add_edge(self, edge: GraphEdge) -> None:
        """Add ``edge``; both endpoints must exist (:class:`GraphError` otherwise)."""
        for end, what in ((edge.from_, "Source"), (edge.to, "Target")):
            if end not in self._nodes:
                raise GraphError(f"{what} node '{end}' not found (edge {edge.from_} -> {edge.to})")
        self._edges_out[edge.from_].append(edge)
        self._edges_in[edge.to].append(edge)

    def remove_edge(self, edge: GraphEdge) -> None:
        """Remove one occurrence of ``edge`` (:class:`GraphError` if absent)."""
        try:
            self._edges_out[edge.from_].remove(edge)
            self._edges_in[edge.to].remove(edge)
        except (KeyError, ValueError):
            raise GraphError(f"edge {edge.from_} -> {edge.to} ({edge.dep_type.value}) not in graph") from None

    @classmethod
    def linear_chain(cls, dims: Sequence[tuple[int, int]], names: Sequence[str] = ()) -> DependencyGraph:
        """Chain of ``LINEAR`` nodes ``layer_{i}`` with ``(in, out)`` dims and SEQUENTIAL edges i-1 -> i."""
        if names and len(names) != len(dims):
            raise GraphError(f"linear_chain: {len(dims)} dims but {len(names)} names")
        graph = cls()
        for i, (d_in, d_out) in enumerate(dims):
            name = names[i] if names else f"layer_{i}"
            graph.add_node(GraphNode.new(f"layer_{i}", name, NodeType.LINEAR).with_dims(d_in, d_out))
            if i:
                graph.add_edge(GraphEdge.new(f"layer_{i - 1}", f"layer_{i}", DependencyType.SEQUENTIAL))
        return graph

    # ----------------------------------------------------------------- queries
    def get_node(self, node_id: str) -> GraphNode | None:
        return self._nodes.get(node_id)

    def node(self, node_id: str) -> GraphNode:
        """Like :meth:`get_node` but raises :class:`GraphError` for an unknown id."""
        try:
            return self._nodes[node_id]
        except KeyError:
            raise GraphError(f"Node '{node_id}' not found in graph ({len(self._nodes)} nodes)") from None

    def nodes(self) -> Iterator[GraphNode]:
        """Nodes in insertion order (for a traced graph: execution order)."""
        return iter(list(self._nodes.values()))

    def edges(self) -> Iterator[GraphEdge]:
        return (e for edges in list(self._edges_out.values()) for e in edges)

    def edges_from(self, node_id: str) -> list[GraphEdge]:
        return list(self._edges_out.get(node_id, ()))

    def edges_to(self, node_id: str) -> list[GraphEdge]:
        return list(self._edges_in.get(node_id, ()))

    def num_nodes(self) -> int:
        return len(self._nodes)

    def num_edges(self) -> int:
        return sum(len(v) for v in self._edges_out.values())

    def prunable_nodes(self) -> list[GraphNode]:
        return [n for n in self._nodes.values() if n.prunable]

    def nodes_of_type(self, node_type: NodeType) -> list[GraphNode]:
        return [n for n in self._nodes.values() if n.node_type is node_type]

    def downstream_dependents(self, node_id: str) -> list[str]:
        """Every node reachable from ``node_id`` (all edge types but TIED), in DFS order.

        The start node is excluded unless a cycle leads back to it.
        """
        return self._reach(node_id, self._edges_out, lambda e: e.to)

    def upstream_dependents(self, node_id: str) -> list[str]:
        """Every node ``node_id`` is reachable from (all edge types but TIED)."""
        return self._reach(node_id, self._edges_in, lambda e: e.from_)

    def _reach(
        self, start: str, adjacency: dict[str, list[GraphEdge]], other: Callable[[GraphEdge], str]
    ) -> list[str]:
        self.node(start)
        seen: list[str] = []
        marked: set[str] = set()
        stack = [other(e) for e in reversed(adjacency[start]) if e.dep_type is not DependencyType.TIED]
        while stack:
            nid = stack.pop()
            if nid in marked:
                continue
            marked.add(nid)
            seen.append(nid)
            stack.extend(other(e) for e in reversed(adjacency[nid]) if e.dep_type is not DependencyType.TIED)
        return seen

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check dimensions on every edge, orphan nodes and cycles.

        Raises:
            ShapeMismatch: an edge joins spaces of different sizes (a window edge: a window
                that does not fit inside its source), a pass-through node has
                ``input_dim != output_dim``, or CONCAT inputs do not tile the concat exactly.
            GraphError: a node has no edge at all (in a graph of 2+ nodes), a data cycle
                exists (TIED edges excluded), or an attention node's heads are inconsistent.
        """
        for node in self._nodes.values():
            _check_node_dims(node)
        for edge in self.edges():
            self._check_edge_dims(edge)
        for node in self.nodes_of_type(NodeType.CONCAT):
            self._check_concat_tiling(node)
        if len(self._nodes) > 1:
            orphans = [n for n in self._nodes if not self._edges_in[n] and not self._edges_out[n]]
            if orphans:
                raise GraphError(f"orphan nodes without any edge: {orphans}")
        cycle = self._find_cycle()
        if cycle:
            raise GraphError(f"cycle in dependency graph: {' -> '.join(cycle)}")

    def _check_edge_dims(self, edge: GraphEdge) -> None:
        src, dst = self._nodes[edge.from_], self._nodes[edge.to]
        d_src = src.space_dim(edge.source_space(src.node_type))
        d_dst = dst.space_dim(edge.target_space(dst.node_type))
        if d_src == 0 or d_dst == 0:
            return
        if edge.dep_type is DependencyType.CONCAT:
            if edge.dim_index < 0 or edge.dim_index + d_src > d_dst:
                raise ShapeMismatch(
                    [d_dst], [edge.dim_index + d_src], name=edge.to,
                    reason=f"concat input '{edge.from_}' at offset {edge.dim_index} overruns the concat",
                )
        elif edge.dep_type in WINDOW_EDGES:
            if edge.dim_index < 0 or edge.dim_index + d_dst > d_src:
                raise ShapeMismatch(
                    [d_src], [edge.dim_index + d_dst], name=f"{edge.from_} -> {edge.to}",
                    reason=f"window [{edge.dim_index}, {edge.dim_index + d_dst}) overruns the source",
                )
        elif d_src != d_dst:
            raise ShapeMismatch([d_src], [d_dst], name=f"{edge.from_} -> {edge.to}", reason="edge dims differ")

    def _check_concat_tiling(self, node: GraphNode) -> None:
        spans = sorted(
            (e.dim_index, self._nodes[e.from_].space_dim(e.source_space(self._nodes[e.from_].node_type)))
            for e in self._edges_in[node.id]
            if e.dep_type is DependencyType.CONCAT
        )
        if not spans or node.input_dim == 0 or any(d == 0 for _, d in spans):
            return
        pos = 0
        for offset, dim in spans:
            if offset != pos:
                raise ShapeMismatch([pos], [offset], name=node.id, reason="concat inputs leave a gap or overlap")
            pos += dim
        if pos != node.input_dim:
            raise ShapeMismatch([node.input_dim], [pos], name=node.id, reason="concat inputs do not fill it")

    def _find_cycle(self) -> list[str]:
        """A data cycle as a node list (first node repeated at the end), or [] (iterative DFS)."""
        state: dict[str, int] = {}  # 1 = on stack, 2 = done
        for root in self._nodes:
            if root in state:
                continue
            path: list[str] = [root]
            iters = [iter(self._data_successors(root))]
            state[root] = 1
            while iters:
                nxt = next(iters[-1], None)
                if nxt is None:
                    state[path.pop()] = 2
                    iters.pop()
                elif state.get(nxt) == 1:
                    return path[path.index(nxt):] + [nxt]
                elif nxt not in state:
                    state[nxt] = 1
                    path.append(nxt)
                    iters.append(iter(self._data_successors(nxt)))
        return []

    def _data_successors(self, node_id: str) -> list[str]:
        return [e.to for e in self._edges_out[node_id] if e.dep_type is not DependencyType.TIED]

    def __repr__(self) -> str:
        return f"DependencyGraph({self.num_nodes()} nodes, {self.num_edges()} edges)"


def _check_node_dims(node: GraphNode) -> None:
    if node.node_type in PASS_THROUGH_TYPES and node.node_type is not NodeType.CONCAT:
        if node.input_dim and node.output_dim and node.input_dim != node.output_dim:
            raise ShapeMismatch([node.input_dim], [node.output_dim], name=node.id,
                                reason=f"{node.node_type.value} node must keep its channel count")
    if node.node_type is NodeType.ATTENTION:
        heads, kv = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("num_kv_heads", 0))
        if heads <= 0 or kv <= 0 or heads % kv:
            raise GraphError(f"attention node '{node.id}': num_heads={heads} must be a positive multiple "
                             f"of num_kv_heads={kv}")


__all__ = ["DependencyGraph"]
