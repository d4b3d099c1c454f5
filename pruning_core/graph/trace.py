"""Build the channel dependency graph of a real model by tracing one forward pass.

Stage: structured plans. The model is exported with ``torch.export`` (non-strict), which runs
the real forward on example inputs and records every ATen op with its tensor shapes and the
module stack it ran in. From that op graph:

1. every op inside a *handled leaf module* (Linear, Embedding, LayerNorm/RMSNorm, custom
   handlers) becomes one node, typed by its handler, with the parameter axes of its spaces;
2. every non-leaf module scope that computes attention (``scaled_dot_product_attention``, or an
   eager ``softmax(q @ k^T) @ v``) is an *attention region*
   (:mod:`pruning_core.graph.trace_regions`): its ops collapse into one ATTENTION node whose
   q/k/v inputs are the projection windows found by following the data flow into the core op
   (a whole ``q_proj`` output, or the q/k/v rows of a fused ``qkv_proj``), and whose head counts
   come from the traced shapes (``num_heads`` from the query, ``head_dim`` from its last dim,
   ``num_kv_heads`` from the key window's width). Norms applied per head inside the region
   (``q_norm``/``k_norm``) are recorded as the node's ``inner`` modules, never as projections;
3. the remaining ops are classified by :func:`pruning_core.graph.trace_ops.classify`
   (ADD/MUL/CONCAT/SLICE/ACTIVATION nodes, transparent aliases, or blocking OTHER nodes; the
   items of a ``chunk``/``split`` of the channel dim become SLICE nodes);
4. modules that share a parameter (tied embeddings and output head) get TIED edges between
   the spaces that index the same parameter axis; an ADD input that is an ancestor of the
   other input is relabelled SKIP (the residual path).

The result is validated (dims on every edge, no cycles) before it is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from pruning_core.errors import GraphError
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.handlers import DEFAULT_HANDLERS, LeafHandler, handler_for
from pruning_core.graph.trace_ops import OpClass, classify, op_name, tensor_args
from pruning_core.graph.trace_regions import Regions
from pruning_core.graph.types import DependencyType, GraphEdge, GraphNode, NodeType

logger = logging.getLogger(__name__)
NOOP_CASTS = frozenset({"to", "_to_copy", "alias", "contiguous", "detach", "clone", "type_as"})


def build_dependency_graph(
    model: nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    handlers: Mapping[type[nn.Module], LeafHandler] = DEFAULT_HANDLERS,
) -> DependencyGraph:
    """Trace ``model(*args, **kwargs)`` and return its channel dependency graph.

    Node ids are module qualified names (``model.layers.0.mlp.up_proj``) for leaf modules and
    attention modules, ``"<scope>:<op>"`` for free ops, ``"input:<name>"``/``"output:<i>"`` for
    the interface. For a Hugging Face causal LM pass ``kwargs={"input_ids": ids, "use_cache": False}``.

    Raises:
        GraphError: the model cannot be exported, or its structure is inconsistent
            (e.g. an attention whose query does not come from a single projection).
    """
    try:
        exported = torch.export.export(model, tuple(args), dict(kwargs or {}), strict=False)
    except Exception as exc:  # export failures come in many types; report them as one
        raise GraphError(f"could not trace {type(model).__name__} with torch.export: {exc}") from exc
    graph = _Builder(model, exported, handlers).build()
    graph.validate()
    logger.info("traced %s: %d nodes, %d edges", type(model).__name__, graph.num_nodes(), graph.num_edges())
    return graph


class _Builder:
    def __init__(self, model: nn.Module, exported: Any, handlers: Mapping[type[nn.Module], LeafHandler]) -> None:
        self.model = model
        self.fx_graph: fx.Graph = exported.graph
        self.user_inputs = set(exported.graph_signature.user_inputs)
        self.handlers = handlers
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.canonical = {id(p): name for name, p in model.named_parameters()}
        self.graph = DependencyGraph()
        self.owner: dict[fx.Node, str] = {}  # value -> id of the node whose output it is
        self.regions = Regions(self.fx_graph)  # attention-region values -> projection windows
        self.splits: dict[fx.Node, tuple[fx.Node, tuple[tuple[int, int], ...] | None]] = {}
        self.pieces: dict[fx.Node, str] = {}  # chunk -> its first SLICE node (the pieces are tied to it)
        self.edges: set[tuple[str, str, DependencyType, int, str]] = set()
        self._leaf_cache: dict[str, str | None] = {}

    # ------------------------------------------------------------------ main loop
    def build(self) -> DependencyGraph:
        for node in self.fx_graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                self._outputs(node)
        self._add_tied_edges()
        self._mark_skips()
        return self.graph

    def _call(self, node: fx.Node) -> None:
        leaf = self._leaf_scope(node)
        region = self.regions.region_of(self._stack(node))
        if leaf is not None and region is not None and self._is_inner_norm(leaf, region):
            args = tensor_args(node)
            if any(self.regions.is_internal(a) for a in args):  # e.g. q_norm on the per-head view of q
                self._inner_op(node, leaf, region)
                return
            if not any(a in self.owner for a in args):  # its weight alone (Gemma's 1 + w)
                return
        if leaf is not None:
            self._leaf_op(node, leaf)
        elif region is not None:
            self._region_op(node, region)
        elif op_name(node) == "getitem" and node.args and node.args[0] in self.splits:
            self._split_item(node)
        else:
            self._op(node, classify(node, lambda a: a in self.owner))

    def _op(self, node: fx.Node, cls: OpClass) -> None:
        if cls.kind == "alias":
            self.owner[node] = self.owner[cls.alias_of]
        elif cls.kind == "split":
            self.splits[node] = (cls.alias_of, cls.pieces)
        elif cls.kind == "node":
            scope = self._innermost(node)
            nid = f"{scope}:{node.name}" if scope else node.name
            dim = self._last_dim(node)
            in_dim = 0 if cls.node_type is NodeType.OTHER else dim  # an unknown op's inputs may differ in width
            self.graph.add_node(GraphNode(
                id=nid, name=op_name(node), node_type=cls.node_type, input_dim=in_dim, output_dim=dim,
                prunable=cls.node_type is not NodeType.OTHER, attrs={"op": str(node.target)},
            ))
            for src, offset in cls.inputs:
                self._edge(self.owner[src], nid, cls.dep_type, offset)
            self.owner[node] = nid

    def _split_item(self, node: fx.Node) -> None:
        """Item ``i`` of a chunk/split: a SLICE of the split input (an alias if it split another dim)."""
        source, pieces = self.splits[node.args[0]]
        if pieces is None:
            self.owner[node] = self.owner[source]
            return
        start, stop = pieces[int(node.args[1])]
        if (start, stop) == (0, self._last_dim(source)):
            self.owner[node] = self.owner[source]
            return
        self._op(node, OpClass("node", node_type=NodeType.SLICE, dep_type=DependencyType.SLICE,
                               inputs=((source, start),)))
        first = self.pieces.setdefault(node.args[0], self.owner[node])
        self._edge(first, self.owner[node], DependencyType.TIED, role="io:io")  # chunk pieces stay equal

    # ------------------------------------------------------------------ node kinds
    def _placeholder(self, node: fx.Node) -> None:
        val = node.meta.get("val")
        if node.name not in self.user_inputs or not isinstance(val, torch.Tensor):
            return
        dim = int(val.shape[-1]) if val.is_floating_point() and val.dim() else 0
        nid = f"input:{node.name}"
        self.graph.add_node(GraphNode(id=nid, name=node.name, node_type=NodeType.INPUT, output_dim=dim, prunable=False))
        self.owner[node] = nid

    def _outputs(self, node: fx.Node) -> None:
        for i, value in enumerate(a for a in tensor_args(node) if a in self.owner):
            nid = f"output:{i}"
            dim = self._last_dim(value)
            self.graph.add_node(GraphNode(id=nid, name=value.name, node_type=NodeType.OUTPUT, input_dim=dim, prunable=False))
            self._edge(self.owner[value], nid, DependencyType.SEQUENTIAL)

    def _leaf_op(self, node: fx.Node, path: str) -> None:
        if self._noop_cast_of(node) is not None:
            # ``x.to(x.dtype)`` returns x itself; export then attributes later uses of x (the
            # residual) to this op, so the value keeps its producer.
            self.owner[node] = self.owner[self._noop_cast_of(node)]
            return
        if self.graph.get_node(path) is None:
            self._add_leaf_node(path)
        for arg in tensor_args(node):
            if arg in self.owner and self.owner[arg] != path:
                self._edge(self.owner[arg], path, DependencyType.SEQUENTIAL)
        self.owner[node] = path
        val = node.meta.get("val")
        gnode = self.graph.node(path)
        if isinstance(val, torch.Tensor) and val.dim() and gnode.node_type is NodeType.LAYER_NORM:
            if int(val.shape[-1]) not in (gnode.output_dim, 1):
                raise GraphError(f"'{path}' was treated as a norm but produced width {int(val.shape[-1])}, "
                                 f"not {gnode.output_dim}; register a LeafHandler for {type(self.modules[path]).__name__}")

    def _add_leaf_node(self, path: str) -> None:
        module = self.modules[path]
        handler = handler_for(module, self.handlers)
        assert handler is not None  # _leaf_scope only returns handled modules
        params = {
            space: [[self.canonical[id(getattr(module, local))], dim] for local, dim in axes]
            for space, axes in handler.params(module).items()
        }
        d_in, d_out = handler.dims(module)
        self.graph.add_node(GraphNode(
            id=path, name=path, node_type=handler.node_type, input_dim=int(d_in), output_dim=int(d_out),
            module=path, attrs={"params": params, "module_type": type(module).__name__},
        ))

    def _is_inner_norm(self, leaf: str, region: str) -> bool:
        handler = handler_for(self.modules[leaf], self.handlers)
        return leaf.startswith(region + ".") and handler is not None and handler.node_type is NodeType.LAYER_NORM

    def _inner_op(self, node: fx.Node, leaf: str, region: str) -> None:
        """An op of a norm applied to attention-internal values (a per-head norm): part of the region."""
        inner = self.regions.inner.setdefault(region, set())
        if leaf not in inner:  # first op: the norm's input must be per head (its width = the norm's size)
            width = self._last_dim(next(a for a in tensor_args(node) if self.regions.is_internal(a)))
            size = handler_for(self.modules[leaf], self.handlers).dims(self.modules[leaf])[0]  # type: ignore[union-attr]
            if size != width:
                raise GraphError(f"attention '{region}': norm '{leaf}' of size {size} is applied to attention-internal "
                                 f"values of width {width}; only per-head norms (size head_dim) are understood there")
            inner.add(leaf)
        self._region_op(node, region)

    def _region_op(self, node: fx.Node, path: str) -> None:
        cast_of = self._noop_cast_of(node)
        if cast_of is not None and not self.regions.is_internal(cast_of):
            self.owner[node] = self.owner[cast_of]
            return
        core = self.regions.track(node, self.owner)
        self.owner[node] = path
        if core is not None:
            self._attention_node(path, core)
        elif self.graph.get_node(path) is None:
            self.graph.add_node(GraphNode(id=path, name=path, node_type=NodeType.ATTENTION, module=path,
                                          attrs={"num_heads": 1, "num_kv_heads": 1, "head_dim": 0}))

    def _attention_node(self, path: str, core: tuple[fx.Node, fx.Node, fx.Node]) -> None:
        roles, attrs = self.regions.attention(path, core, self.owner,
                                              lambda nid: self.graph.node(nid).node_type is NodeType.LINEAR)
        self.graph.add_node(GraphNode(id=path, name=path, node_type=NodeType.ATTENTION, module=path, attrs=attrs))
        for role, origin in roles.items():
            self._edge(origin.owner, path, DependencyType.ATTENTION, offset=origin.start, role=role)

    # ------------------------------------------------------------------ post passes
    def _add_tied_edges(self) -> None:
        users: dict[str, list[tuple[str, str, int]]] = {}  # canonical param -> [(node, space, dim)]
        for gnode in self.graph.nodes():
            for space, axes in gnode.attrs.get("params", {}).items():
                for name, dim in axes:
                    users.setdefault(name, []).append((gnode.id, space, dim))
        for entries in users.values():
            for i, (node_a, space_a, dim_a) in enumerate(entries):
                for node_b, space_b, dim_b in entries[i + 1:]:
                    if node_a != node_b and dim_a == dim_b:
                        self._edge(node_a, node_b, DependencyType.TIED, role=f"{space_a}:{space_b}")

    def _mark_skips(self) -> None:
        """Relabel the residual input of each ADD (an ancestor of its other input) as SKIP."""
        for add in self.graph.nodes_of_type(NodeType.ADD):
            ins = self.graph.edges_to(add.id)
            if len(ins) != 2:
                continue
            for edge, other in ((ins[0], ins[1]), (ins[1], ins[0])):
                if edge.from_ in self.graph.upstream_dependents(other.from_):
                    self.graph.remove_edge(edge)
                    self.graph.add_edge(GraphEdge(edge.from_, add.id, DependencyType.SKIP))
                    break

    # ------------------------------------------------------------------ helpers
    def _edge(self, src: str, dst: str, dep: DependencyType, offset: int = 0, role: str = "") -> None:
        key = (src, dst, dep, offset, role)
        if src != dst and key not in self.edges:
            self.edges.add(key)
            self.graph.add_edge(GraphEdge(src, dst, dep, offset, role))

    def _stack(self, node: fx.Node) -> list[str]:
        """Module paths of ``node``'s module stack, innermost first."""
        return [path for path, _ in reversed(list(node.meta.get("nn_module_stack", {}).values()))]

    def _innermost(self, node: fx.Node) -> str:
        stack = self._stack(node)
        return stack[0] if stack else ""

    def _leaf_scope(self, node: fx.Node) -> str | None:
        for path in self._stack(node):
            if path not in self._leaf_cache:
                module = self.modules.get(path)
                handled = module is not None and handler_for(module, self.handlers) is not None
                self._leaf_cache[path] = path if handled else None
            if self._leaf_cache[path] is not None:
                return path
        return None

    def _noop_cast_of(self, node: fx.Node) -> fx.Node | None:
        """The tracked input of a cast/alias op that returns its input unchanged, else None."""
        if op_name(node) not in NOOP_CASTS or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src, out, inp = node.args[0], node.meta.get("val"), node.args[0].meta.get("val")
        if src not in self.owner or not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
            return None
        return src if (out.dtype, tuple(out.shape)) == (inp.dtype, tuple(inp.shape)) else None

    @staticmethod
    def _last_dim(node: fx.Node) -> int:
        val = node.meta.get("val")
        return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else 0


__all__ = ["build_dependency_graph"]
