"""Channel semantics of single ATen ops, for the tracer (:mod:`pruning_core.graph.trace`).

Stage: structured plans. The channel dimension is the **last** dimension (Linear/Embedding/
norm convention). Each op outside handled leaf modules and attention regions is classified:

- ``ignore``: it reads no channel-carrying ("tracked") tensor (masks, positions, RoPE tables);
- ``alias``: its output carries its tracked input's channels unchanged (casts, elementwise
  unary math, reshapes that keep the last dim, reductions over other dims, ops with a constant
  that broadcasts over channels);
- a node: ``ADD`` (add/sub of two tracked tensors), ``MUL`` (mul/div of two), ``ACTIVATION``,
  ``CONCAT`` (cat along the last dim, with channel offsets), or ``OTHER`` for anything else
  that touches channels (never pruned through). A slice of the channel dim with constant bounds
  (``x[..., :3]``) is OTHER: after pruning, the same constants would select other channels;
- ``split``: ``chunk`` of the channel dim into equal pieces (Phi-3's
  ``gate_up_proj(x).chunk(2, -1)``: the bounds follow the size), or any split of another dim;
  ``pieces`` gives each item's window of the last dim (``None``: every item carries all
  channels). The tracer turns ``getitem`` of a piece into a SLICE node and ties the pieces
  position by position, so they stay equal. Splits of the channel dim into given sizes are OTHER.

Inside attention regions (:mod:`pruning_core.graph.trace_regions`) slices and splits of a
projection's output select its q/k/v rows; there the bounds come from the config (checked on
apply).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from pruning_core.graph.types import DependencyType, NodeType

ALIAS_UNARY = frozenset({
    "to", "_to_copy", "clone", "contiguous", "alias", "dropout", "native_dropout", "detach",
    "lift_fresh_copy", "type_as", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square", "pow",
    "reciprocal", "sin", "cos", "clamp", "clamp_min", "clamp_max", "nan_to_num",
})
ACTIVATIONS = frozenset({
    "silu", "gelu", "relu", "relu6", "sigmoid", "tanh", "softplus", "mish", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "selu", "hardtanh", "gelu_",
})
ADD_OPS = frozenset({"add", "sub", "rsub", "maximum", "minimum"})
MUL_OPS = frozenset({"mul", "div"})
RESHAPE_OPS = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten", "expand", "squeeze",
                         "unsqueeze"})
DIM_OPS = frozenset({"slice", "select", "narrow", "index_select", "softmax", "_softmax", "log_softmax"})
SPLIT_OPS = frozenset({"split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_split_with_sizes"})
REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "var", "std", "prod", "logsumexp"})
NO_OUTPUT = frozenset({"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel"})


@dataclass(frozen=True)
class OpClass:
    """Result of :func:`classify`: ``kind`` is ``ignore``, ``alias`` or ``node``."""

    kind: str
    alias_of: fx.Node | None = None
    node_type: NodeType = NodeType.OTHER
    dep_type: DependencyType = DependencyType.SEQUENTIAL
    inputs: tuple[tuple[fx.Node, int], ...] = ()  # (tracked input, channel offset)
    pieces: tuple[tuple[int, int], ...] | None = None  # kind "split": [start, stop) of each item


IGNORE = OpClass("ignore")


def op_name(node: fx.Node) -> str:
    target = node.target
    return str(getattr(target, "_opname", getattr(target, "__name__", str(target))))


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """All fx-node arguments of ``node`` (flattened through lists/tuples/kwargs), in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
    return found


def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _dim_arg(node: fx.Node, position: int, ndim: int, default: int | None = None) -> list[int] | None:
    """Normalised dim argument(s) at ``position`` (or kwarg ``dim``); None means "all dims"."""
    raw = node.args[position] if len(node.args) > position else node.kwargs.get("dim", default)
    if raw is None:
        return None
    dims = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    return [int(d) % ndim for d in dims] if ndim else [0]


def classify(node: fx.Node, is_tracked: Callable[[fx.Node], bool]) -> OpClass:
    """Channel semantics of one op given which of its inputs carry channels."""
    tracked = [a for a in tensor_args(node) if is_tracked(a)]
    name = op_name(node)
    if name in SPLIT_OPS and len(tracked) == 1:
        pieces = split_pieces(node, tracked[0])
        if pieces is None or name == "chunk":
            return OpClass("split", alias_of=tracked[0], pieces=pieces)
        return _other(tracked)  # fixed sizes along the channel dim: wrong once channels are pruned
    out_shape = _shape(node)
    if not tracked or name in NO_OUTPUT or out_shape is None:
        return IGNORE if not tracked or name in NO_OUTPUT else _other(tracked)
    first = tracked[0]
    in_shape = _shape(first) or ()
    keeps_last = bool(in_shape) and bool(out_shape) and in_shape[-1] == out_shape[-1]
    if name == "cat":
        return _classify_cat(node, tracked, out_shape)
    if name in ADD_OPS or name in MUL_OPS:
        return _classify_binary(node, name, tracked, out_shape)
    if name in ACTIVATIONS and len(tracked) == 1 and keeps_last:
        return OpClass("node", node_type=NodeType.ACTIVATION, inputs=((first, 0),))
    if len(tracked) == 1 and keeps_last and _keeps_channel_axis(node, name, in_shape, out_shape):
        return OpClass("alias", alias_of=first)
    return _other(tracked)


def _keeps_channel_axis(node: fx.Node, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    last_in, last_out = len(in_shape) - 1, len(out_shape) - 1
    if name in ALIAS_UNARY or name in ACTIVATIONS:
        return True
    if name in RESHAPE_OPS:
        if name == "unsqueeze":
            return _dim_arg(node, 1, len(out_shape)) != [last_out]
        if name == "squeeze":
            return in_shape[-1] != 1
        return True
    if name == "transpose":
        return last_in not in (_dim_arg(node, 1, len(in_shape)) or []) + (_dim_arg(node, 2, len(in_shape)) or [])
    if name == "permute":
        perm = node.args[1]
        return int(perm[-1]) % len(in_shape) == last_in
    if name in DIM_OPS:
        return _dim_arg(node, 1, len(in_shape)) != [last_in]
    if name in REDUCTIONS:
        dims = _dim_arg(node, 1, len(in_shape))
        return dims is not None and last_in not in dims
    return False


def _classify_binary(node: fx.Node, name: str, tracked: list[fx.Node], out_shape: tuple[int, ...]) -> OpClass:
    if len(set(tracked)) >= 2:
        if any((_shape(a) or (0,))[-1] != out_shape[-1] for a in tracked):
            return _other(tracked)
        kind = NodeType.ADD if name in ADD_OPS else NodeType.MUL
        dep = DependencyType.ADD if name in ADD_OPS else DependencyType.MUL
        return OpClass("node", node_type=kind, dep_type=dep, inputs=tuple((a, 0) for a in dict.fromkeys(tracked)))
    first = tracked[0]
    constants = [a for a in tensor_args(node) if a is not first]
    # a constant operand is fine only if it broadcasts over the channel dim (size 1 or absent)
    if all((_shape(c) or (1,))[-1:] in ((1,), ()) for c in constants) and (_shape(first) or (0,))[-1] == out_shape[-1]:
        return OpClass("alias", alias_of=first)
    return _other(tracked)


def _classify_cat(node: fx.Node, tracked: list[fx.Node], out_shape: tuple[int, ...]) -> OpClass:
    parts = list(node.args[0])
    dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", 0))
    if dim % len(out_shape) != len(out_shape) - 1:
        return _other(tracked)
    inputs, offset = [], 0
    tracked_set = set(tracked)
    for part in parts:
        shape = _shape(part)
        if shape is None:
            return _other(tracked)
        if part in tracked_set:
            inputs.append((part, offset))
        offset += shape[-1]
    return OpClass("node", node_type=NodeType.CONCAT, dep_type=DependencyType.CONCAT, inputs=tuple(inputs))


def channel_window(node: fx.Node) -> tuple[int, int] | None:
    """``(start, width)`` of the window a ``slice``/``narrow`` of the last dim selects; None for
    any other op or a strided slice."""
    name, in_shape, out_shape = op_name(node), _shape(node.args[0]) if node.args else None, _shape(node)
    if name not in ("slice", "narrow") or not in_shape or not out_shape:
        return None
    if _dim_arg(node, 1, len(in_shape), 0) != [len(in_shape) - 1]:
        return None
    if name == "narrow":
        start = int(node.args[2])
    else:
        raw = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        if step not in (None, 1):
            return None
        start = 0 if raw is None else int(raw)
    start = start + in_shape[-1] if start < 0 else start
    return min(max(start, 0), in_shape[-1]), out_shape[-1]


def split_pieces(node: fx.Node, first: fx.Node) -> tuple[tuple[int, int], ...] | None:
    """The ``[start, stop)`` windows of the last dim that a ``split``/``chunk`` returns, from the
    traced output shapes (None: it splits another dim, so every item has all channels)."""
    in_shape = _shape(first) or ()
    vals = node.meta.get("val")
    if not in_shape or _dim_arg(node, 2, len(in_shape), 0) != [len(in_shape) - 1]:
        return None
    pieces, start = [], 0
    for val in vals if isinstance(vals, (list, tuple)) else ():
        pieces.append((start, start + int(val.shape[-1])))
        start += int(val.shape[-1])
    return tuple(pieces)


def _other(tracked: list[fx.Node]) -> OpClass:
    return OpClass("node", node_type=NodeType.OTHER, inputs=tuple((a, 0) for a in dict.fromkeys(tracked)))


__all__ = ["OpClass", "channel_window", "classify", "op_name", "split_pieces", "tensor_args"]
