"""Attention regions of a traced model: which projection rows feed q, k and v, and the core op.

Stage: structured plans (a helper of :mod:`pruning_core.graph.trace`). An *attention region* is
a non-leaf module scope that computes attention: it calls ``scaled_dot_product_attention``, or
(eager attention, e.g. Gemma 2 with soft-capping) a ``softmax`` of a ``matmul`` that feeds a
second ``matmul``. Inside a region every value is tracked by its *origins*: the producer node
(a projection outside the region) and the window ``[start, stop)`` of the producer's output it
comes from. Windows narrow only through a slice/chunk of the channel dimension of a value that
still holds the producer's rows in order ("flat": before the per-head view), so

- ``q_proj(x).view(...)`` -> origin ``(q_proj, 0, Hq*d)``;
- Phi-3's ``qkv_proj(x)[..., Hq*d : (Hq+G)*d]`` -> ``(qkv_proj, Hq*d, (Hq+G)*d)`` for k;
- per-head norms applied inside the region (Qwen3/Gemma 3 ``q_norm``/``k_norm``, weights of
  size ``head_dim``) keep the origin: they are *inner modules* of the region, never producers.

The attention core's q, k, v arguments must each have exactly one origin; the tracer checks
the windows against the head counts read from the traced query shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import fx

from pruning_core.errors import GraphError
from pruning_core.graph.trace_ops import (
    SPLIT_OPS,
    channel_window,
    classify,
    op_name,
    split_pieces,
    tensor_args,
)

SDPA = "scaled_dot_product_attention"
MATMULS = frozenset({"matmul", "bmm"})
SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
_MAX_HOPS = 12  # a softmax is an attention softmax if a matmul is at most this many ops before it


class Origin(NamedTuple):
    """Rows ``[start, stop)`` of the output of graph node ``owner``."""

    owner: str
    start: int
    stop: int


def _last_dim(node: fx.Node) -> int:
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else 0


def _scope(node: fx.Node) -> str:
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return stack[-1][0] if stack else ""


def _softmax_of_matmul(node: fx.Node) -> bool:
    """Does a matmul reach this softmax within its module scope (the eager ``softmax(q @ k^T)``)?"""
    frontier, scope = [node], _scope(node)
    for _ in range(_MAX_HOPS):
        frontier = [a for n in frontier for a in tensor_args(n) if _scope(a) == scope]
        if any(op_name(a) in MATMULS for a in frontier):
            return True
    return False


def attention_scopes(graph: fx.Graph) -> set[str]:
    """Module scopes that compute attention (SDPA, or an eager softmax of a matmul)."""
    found = set()
    for node in graph.nodes:
        name = op_name(node)
        if name == SDPA or (name in SOFTMAX and _softmax_of_matmul(node)):
            found.add(_scope(node))
    return found - {""}


class Regions:
    """Origins of the values inside attention regions (see the module docstring)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.scopes = attention_scopes(graph)
        self.sources: dict[fx.Node, frozenset[Origin]] = {}
        self.flat: set[fx.Node] = set()  # values whose last dim is still their origin's rows, in order
        self.splits: dict[fx.Node, tuple[tuple[int, int], ...] | None] = {}
        self.scores: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # eager: values derived from q @ k^T
        self.inner: dict[str, set[str]] = {}  # region -> modules applied to its internal values

    def region_of(self, stack: list[str]) -> str | None:
        """The attention region of a node with module ``stack`` (innermost first), if any."""
        return next((p for p in stack if p in self.scopes), None)

    def is_internal(self, value: fx.Node) -> bool:
        return value in self.sources

    def track(self, node: fx.Node, owner: Mapping[fx.Node, str]) -> tuple[fx.Node, fx.Node, fx.Node] | None:
        """Record the origins of ``node``'s value; return its ``(q, k, v)`` if it is the core op."""
        args = [a for a in tensor_args(node) if a in self.sources or a in owner]
        if op_name(node) == "getitem" and args and args[0] in self.splits:
            self._piece(node, args[0], owner)
        elif len(args) == 1:
            self._single(node, args[0], owner)
        else:
            self.sources[node] = frozenset().union(*(self.origins(a, owner) for a in args))
        return self._core(node, args)

    def attention(
        self, path: str, core: tuple[fx.Node, fx.Node, fx.Node], owner: Mapping[fx.Node, str],
        is_linear: Callable[[str], bool],
    ) -> tuple[dict[str, Origin], dict[str, Any]]:
        """The q/k/v origins of region ``path``'s core op and its node attributes (head counts
        from the traced query ``(B, heads, T, head_dim)``, ``inner`` per-head norms).

        Raises:
            GraphError: q, k or v does not come from exactly one window of one Linear, or the
                windows do not match the head counts.
        """
        roles = {}
        for role, arg in zip("qkv", core, strict=True):
            found = self.origins(arg, owner)
            if len(found) != 1:
                raise GraphError(f"attention '{path}': {role} must come from exactly one projection, got {sorted(found)}")
            roles[role] = next(iter(found))
            if not is_linear(roles[role].owner):
                raise GraphError(f"attention '{path}': {role} comes from '{roles[role].owner}', not from a Linear projection")
        q_shape = tuple(core[0].meta["val"].shape)  # (B, heads, T, head_dim)
        heads, head_dim = int(q_shape[1]), int(q_shape[-1])
        widths = {role: o.stop - o.start for role, o in roles.items()}
        if widths["q"] != heads * head_dim or widths["k"] != widths["v"] or widths["k"] % head_dim:
            raise GraphError(f"attention '{path}': q/k/v windows {roles} do not match {heads} heads x {head_dim}")
        attrs: dict[str, Any] = {"num_heads": heads, "num_kv_heads": widths["k"] // head_dim, "head_dim": head_dim}
        if self.inner.get(path):
            attrs["inner"] = sorted(self.inner[path])
        return roles, attrs

    def origins(self, value: fx.Node, owner: Mapping[fx.Node, str]) -> frozenset[Origin]:
        """Where ``value`` comes from: its tracked origins, or all rows of an outside producer."""
        if value in self.sources:
            return self.sources[value]
        return frozenset({Origin(owner[value], 0, _last_dim(value))}) if value in owner else frozenset()

    def _is_flat(self, value: fx.Node) -> bool:
        return value in self.flat or value not in self.sources

    def _single(self, node: fx.Node, arg: fx.Node, owner: Mapping[fx.Node, str]) -> None:
        origins = self.origins(arg, owner)
        self.sources[node] = origins
        if not self._is_flat(arg):
            return
        window = channel_window(node)
        if op_name(node) in SPLIT_OPS:
            self.splits[node] = split_pieces(node, arg)
        elif window is not None and len(origins) == 1:
            self._narrow(node, next(iter(origins)), *window)
        elif classify(node, lambda a: a is arg).kind == "alias":
            self.flat.add(node)

    def _piece(self, node: fx.Node, split: fx.Node, owner: Mapping[fx.Node, str]) -> None:
        origins, pieces = self.origins(split, owner), self.splits[split]
        self.sources[node] = origins
        if pieces is None:
            self.flat.add(node)
        elif len(origins) == 1:
            start, stop = pieces[int(node.args[1])]
            self._narrow(node, next(iter(origins)), start, stop - start)

    def _narrow(self, node: fx.Node, origin: Origin, start: int, width: int) -> None:
        self.sources[node] = frozenset({Origin(origin.owner, origin.start + start, origin.start + start + width)})
        self.flat.add(node)

    def _core(self, node: fx.Node, args: list[fx.Node]) -> tuple[fx.Node, fx.Node, fx.Node] | None:
        name = op_name(node)
        if name == SDPA:
            q, k, v = node.args[:3]
            return q, k, v
        if name in MATMULS and len(args) == 2:
            if args[0] in self.scores:  # probabilities @ v
                q, k = self.scores[args[0]]
                return q, k, args[1]
            self.scores[node] = (args[0], args[1])  # q @ k^T
            return None
        derived = next((self.scores[a] for a in args if a in self.scores), None)
        if derived is not None:
            self.scores[node] = derived
        return None


__all__ = ["Origin", "Regions", "attention_scopes"]
