"""Leaf-module handlers: what a parameterised module means to the channel graph.

Stage: structured plans. The tracer collapses every op inside a handled leaf module into one
graph node. A handler says which node type it is, its ``(input_dim, output_dim)``, and which
parameter axes index each of its channel spaces (how a plan slices it). Handlers are keyed by
module type (Torch-Pruning's ``PrunerBox`` idea) and passed explicitly: no global registry.
Custom layers are added with :func:`with_handler`.

A leaf module that is not registered but has only 1-D parameters of one size (``weight`` and
optionally ``bias``), e.g. ``LlamaRMSNorm``, is treated as an elementwise-affine norm; the
tracer checks that it keeps the channel count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from pruning_core.graph.types import NodeType

ParamAxes = dict[str, list[tuple[str, int]]]  # space -> [(local parameter name, dim)]


@dataclass(frozen=True, slots=True)
class LeafHandler:
    """How one module type maps to a graph node.

    Attributes:
        node_type: the node's type (its channel semantics, see ``types``).
        dims: ``module -> (input_dim, output_dim)``.
        params: ``module -> {space: [(local param name, dim), ...]}``.
    """

    node_type: NodeType
    dims: Callable[[nn.Module], tuple[int, int]]
    params: Callable[[nn.Module], ParamAxes]


def _linear_params(m: nn.Module) -> ParamAxes:
    out = [("weight", 0)] + ([("bias", 0)] if getattr(m, "bias", None) is not None else [])
    return {"in": [("weight", 1)], "out": out}


def _norm_params(m: nn.Module) -> ParamAxes:
    return {"io": [(name, 0) for name, p in m.named_parameters(recurse=False) if p is not None]}


def _norm_dims(m: nn.Module) -> tuple[int, int]:
    size = int(next(m.parameters(recurse=False)).shape[0])
    return size, size


LINEAR = LeafHandler(NodeType.LINEAR, lambda m: (m.in_features, m.out_features), _linear_params)
EMBEDDING = LeafHandler(
    NodeType.EMBEDDING,
    lambda m: (m.num_embeddings, m.embedding_dim),
    lambda m: {"in": [("weight", 0)], "out": [("weight", 1)]},
)
NORM = LeafHandler(NodeType.LAYER_NORM, _norm_dims, _norm_params)

DEFAULT_HANDLERS: Mapping[type[nn.Module], LeafHandler] = {
    nn.Linear: LINEAR,
    nn.Embedding: EMBEDDING,
    nn.LayerNorm: NORM,
    nn.RMSNorm: NORM,
}


def with_handler(
    handlers: Mapping[type[nn.Module], LeafHandler], module_type: type[nn.Module], handler: LeafHandler
) -> dict[type[nn.Module], LeafHandler]:
    """A new handler table with ``module_type`` mapped to ``handler`` (the input is not changed)."""
    table = dict(handlers)
    table[module_type] = handler
    return table


def handler_for(module: nn.Module, handlers: Mapping[type[nn.Module], LeafHandler]) -> LeafHandler | None:
    """The handler for ``module``: exact type, then base classes, then the norm-like rule."""
    if type(module) in handlers:
        return handlers[type(module)]
    for cls, handler in handlers.items():
        if isinstance(module, cls):
            return handler
    return NORM if _is_norm_like(module) else None


def _is_norm_like(module: nn.Module) -> bool:
    if any(True for _ in module.children()):
        return False
    params = dict(module.named_parameters(recurse=False))
    if not params or set(params) - {"weight", "bias"}:
        return False
    shapes = {tuple(p.shape) for p in params.values()}
    return len(shapes) == 1 and len(next(iter(shapes))) == 1


__all__ = ["DEFAULT_HANDLERS", "EMBEDDING", "LINEAR", "NORM", "LeafHandler", "handler_for", "with_handler"]
