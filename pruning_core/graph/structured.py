"""Structural plans as plain data, and their in-place application to a model.

Stage: apply. A :class:`StructuredPlan` lists parameter-axis slices (parameter name, dim,
kept indices), removed entries of module lists (layers), and the config values the result
must have. It serialises to JSON and replays on a fresh dense model (Torch-Pruning's
``pruning_history`` idea, without pickling modules). Names always refer to the **dense**
model: axis edits are applied first, layer removals last.

Kept indices may be in any order: a plan can permute channels as well as drop them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pruning_core.errors import ConfigError, GraphError
from pruning_core.graph import hf
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.propagate import ChannelGroup
from pruning_core.graph.roles import implied_config

PLAN_VERSION = 1


@dataclass(frozen=True, slots=True)
class AxisEdit:
    """Keep ``keep`` (in this order) along ``dim`` of parameter ``param`` (dense size ``size``)."""

    param: str
    dim: int
    size: int
    keep: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(int(i) for i in self.keep))
        if not self.keep:
            raise GraphError(f"'{self.param}' dim {self.dim}: a plan may not remove all {self.size} channels")
        if len(set(self.keep)) != len(self.keep) or min(self.keep) < 0 or max(self.keep) >= self.size:
            raise GraphError(f"'{self.param}' dim {self.dim}: kept indices must be distinct and in [0, {self.size})")


@dataclass(frozen=True, slots=True)
class LayerRemoval:
    """Remove entries ``indices`` of the ``nn.ModuleList`` at ``container`` (dense length ``size``)."""

    container: str
    size: int
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", tuple(sorted(set(int(i) for i in self.indices))))
        if any(i < 0 or i >= self.size for i in self.indices):
            raise GraphError(f"'{self.container}': layer indices {list(self.indices)} outside [0, {self.size})")
        if len(self.indices) >= self.size:
            raise GraphError(f"'{self.container}': cannot remove all {self.size} layers")

    def kept(self) -> list[int]:
        return [i for i in range(self.size) if i not in set(self.indices)]


@dataclass(frozen=True)
class StructuredPlan:
    """Structural edits of one model, as plain data (see module docstring)."""

    axis_edits: tuple[AxisEdit, ...] = ()
    layer_removals: tuple[LayerRemoval, ...] = ()
    config: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis_edits", tuple(self.axis_edits))
        object.__setattr__(self, "layer_removals", tuple(self.layer_removals))
        object.__setattr__(self, "config", {k: int(v) for k, v in self.config.items()})  # private copy
        seen: dict[tuple[str, int], AxisEdit] = {}
        for edit in self.axis_edits:
            if seen.setdefault((edit.param, edit.dim), edit) != edit:
                raise GraphError(f"conflicting edits for '{edit.param}' dim {edit.dim}")
        if len({r.container for r in self.layer_removals}) != len(self.layer_removals):
            raise GraphError("one LayerRemoval per container")

    def merged(self, other: StructuredPlan) -> StructuredPlan:
        """Both plans' edits together (e.g. a width plan and a depth plan of the same dense model)."""
        edits = {(e.param, e.dim): e for e in self.axis_edits}
        for e in other.axis_edits:
            if edits.setdefault((e.param, e.dim), e) != e:
                raise GraphError(f"plans disagree on '{e.param}' dim {e.dim}")
        removals = {r.container: r for r in self.layer_removals}
        for r in other.layer_removals:
            if r.container in removals:
                r = LayerRemoval(r.container, r.size, removals[r.container].indices + r.indices)
            removals[r.container] = r
        return StructuredPlan(tuple(edits.values()), tuple(removals.values()), {**self.config, **other.config})

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "axis_edits": [{"param": e.param, "dim": e.dim, "size": e.size, "keep": list(e.keep)} for e in self.axis_edits],
            "layer_removals": [
                {"container": r.container, "size": r.size, "indices": list(r.indices)} for r in self.layer_removals
            ],
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StructuredPlan:
        unknown = set(data) - {"version", "axis_edits", "layer_removals", "config"}
        if unknown:
            raise ConfigError("plan", f"unknown keys {sorted(unknown)}")
        if data.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise ConfigError("plan.version", f"expected {PLAN_VERSION}, got {data.get('version')}")
        try:
            edits = tuple(AxisEdit(e["param"], int(e["dim"]), int(e["size"]), tuple(e["keep"])) for e in data.get("axis_edits", ()))
            removals = tuple(
                LayerRemoval(r["container"], int(r["size"]), tuple(r["indices"])) for r in data.get("layer_removals", ())
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError("plan", f"malformed entry: {exc!r}") from exc
        return cls(edits, removals, dict(data.get("config", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StructuredPlan:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ prediction
    def predicted_num_parameters(self, model: nn.Module) -> int:
        """Number of (unique) parameters ``model`` will have after :func:`apply_plan_`."""
        params = _params_by_name(model)
        shapes = {id(p): list(p.shape) for p in params.values()}
        for edit in self.axis_edits:
            shapes[id(_lookup(params, edit.param))][edit.dim] = len(edit.keep)
        dropped: set[int] = set()
        for removal in self.layer_removals:
            for i in removal.indices:
                prefix = f"{removal.container}.{i}."
                dropped |= {id(p) for name, p in params.items() if name.startswith(prefix)}
        return sum(math.prod(s) for pid, s in shapes.items() if pid not in dropped)


def plan_from_groups(
    graph: DependencyGraph, groups: Iterable[ChannelGroup], config: Mapping[str, int] | None = None
) -> StructuredPlan:
    """Turn channel groups (channels to **remove**) into axis edits of every coupled parameter.

    Each group member ``(node, space)`` slices the parameter axes the node's ``params`` attr
    lists for that space; members without parameters (adds, attention) need no edit. Groups
    that touch the same parameter axis (e.g. two inputs of one concat) remove the union.

    The plan's config is ``config`` plus the sizes the groups imply for a decoder LM
    (:func:`~pruning_core.graph.roles.implied_config`: hidden size, heads, KV heads,
    intermediate size), found by role in the graph.

    Raises:
        GraphError: ``config`` states a size the groups contradict.
    """
    group_list = list(groups)
    removed: dict[tuple[str, int], tuple[int, set[int]]] = {}
    for group in group_list:
        for (nid, space), channels in group.members.items():
            node = graph.node(nid)
            for param, dim in node.attrs.get("params", {}).get(space, ()):
                size, gone = removed.setdefault((param, int(dim)), (node.space_dim(space), set()))
                gone.update(channels)
    edits = tuple(
        AxisEdit(param, dim, size, tuple(i for i in range(size) if i not in gone))
        for (param, dim), (size, gone) in removed.items()
    )
    given = dict(config or {})
    implied = implied_config(graph, group_list)
    conflicts = {k: (given[k], v) for k, v in implied.items() if k in given and given[k] != v}
    if conflicts:
        raise GraphError(f"the plan's config contradicts what its channel groups imply {{key: (given, implied)}}: {conflicts}")
    return StructuredPlan(edits, (), {**given, **{k: v for k, v in implied.items() if k not in given}})


def apply_plan_(model: nn.Module, plan: StructuredPlan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place (physically) and return it.

    The plan is checked completely before anything changes (the resulting shapes and config
    are worked out first), so a plan that raises leaves ``model`` as it was.

    Raises:
        GraphError: a parameter/container named by the plan is missing, or its size differs
            from the one the plan was made for (replaying on the wrong model), tied parameters
            get different edits, or the model's config would not match ``plan.config``
            afterwards (or could not express the result, see :func:`hf.check_config`).
    """
    params = _params_by_name(model)
    _check_sizes(model, params, plan)
    by_param = _edits_by_param(params, plan.axis_edits)
    _check_result(model, plan, by_param)
    for param, edits in by_param.items():
        new = param.detach()
        for edit in edits:
            new = new.index_select(edit.dim, torch.tensor(edit.keep, dtype=torch.long, device=new.device))
        replacement = nn.Parameter(new.contiguous(), requires_grad=param.requires_grad)
        for module, local in _owners(model, param):
            setattr(module, local, replacement)
    for module in model.modules():
        _sync_module_attrs(module)
    for removal in plan.layer_removals:
        hf.remove_layers_(model, removal.container, removal.kept())
    hf.sync_config_(model, plan.config)
    return model


def _check_result(model: nn.Module, plan: StructuredPlan, by_param: Mapping[nn.Parameter, list[AxisEdit]]) -> None:
    """Dry run: the config the model would have after ``plan`` must be valid and as expected."""
    shapes = {id(p): list(p.shape) for p in by_param}
    for param, edits in by_param.items():
        for edit in edits:
            shapes[id(param)][edit.dim] = len(edit.keep)
    kept = {r.container: r.kept() for r in plan.layer_removals}
    hf.check_config(model, plan.config, shape_of=lambda p: shapes.get(id(p), p.shape), kept_layers=kept)


def _params_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _lookup(params: Mapping[str, nn.Parameter], name: str) -> nn.Parameter:
    if name not in params:
        raise GraphError(f"plan names parameter '{name}', which the model does not have")
    return params[name]


def _check_sizes(model: nn.Module, params: Mapping[str, nn.Parameter], plan: StructuredPlan) -> None:
    for edit in plan.axis_edits:
        p = _lookup(params, edit.param)
        if edit.dim >= p.dim() or p.shape[edit.dim] != edit.size:
            raise GraphError(f"'{edit.param}' has shape {list(p.shape)}; the plan expects size {edit.size} at dim {edit.dim}")
    for removal in plan.layer_removals:
        container = _get_module(model, removal.container)
        if not isinstance(container, nn.ModuleList) or len(container) != removal.size:
            raise GraphError(f"'{removal.container}' is not a ModuleList of {removal.size} layers")


def _edits_by_param(params: Mapping[str, nn.Parameter], edits: Iterable[AxisEdit]) -> dict[nn.Parameter, list[AxisEdit]]:
    by_param: dict[nn.Parameter, list[AxisEdit]] = {}
    for edit in edits:
        p = _lookup(params, edit.param)
        same = [e for e in by_param.get(p, []) if e.dim == edit.dim]
        if same and same[0].keep != edit.keep:
            raise GraphError(f"tied parameter '{edit.param}' gets two different edits at dim {edit.dim}")
        if not same:
            by_param.setdefault(p, []).append(edit)
    return by_param


def _owners(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    return [
        (m, local) for m in model.modules() for local, p in m._parameters.items() if p is param
    ]


def _get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise GraphError(f"model has no module '{path}'") from exc


def _sync_module_attrs(module: nn.Module) -> None:
    """Keep size attributes of standard modules equal to their (sliced) weights."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.normalized_shape:
        module.normalized_shape = (int(weight.shape[0]),)


__all__ = ["AxisEdit", "LayerRemoval", "StructuredPlan", "apply_plan_", "plan_from_groups"]
