"""``PruningPlan``: channel and layer removals by graph node id, checked against a graph.

Stage: structured plans. Users state intent ("remove output channels 1, 5 of this node",
"remove this layer"); :meth:`PruningPlan.validate` checks ids, ranges and that the entries do
not contradict each other through the graph's couplings; :meth:`PruningPlan.to_structured`
expands every entry to its full channel group and returns the :class:`StructuredPlan` that
slices every coupled parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pruning_core.errors import GraphError, InvalidSparsity
from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.propagate import channel_group
from pruning_core.graph.structured import LayerRemoval, StructuredPlan, plan_from_groups
from pruning_core.graph.types import out_space


class PruningPlan:
    """Channel removals (``{node_id: output channels}``) and layer removals (``[layer_id]``)."""

    def __init__(self) -> None:
        self.channel_removals: dict[str, list[int]] = {}
        self.layer_removals: list[str] = []
        self._validated = False

    def remove_channels(self, node_id: str, channels: Iterable[int]) -> PruningPlan:
        """Set (replace, not merge) the output channels to remove from ``node_id``.

        Channels are stored sorted and de-duplicated. Resets validation.
        """
        self.channel_removals[node_id] = sorted({int(c) for c in channels})
        self._validated = False
        return self

    def remove_layer(self, layer_id: str) -> PruningPlan:
        """Mark a layer (a node id, or a module-list entry like ``model.layers.3``) for removal.

        Removing the same layer twice is a no-op. Resets validation.
        """
        if layer_id not in self.layer_removals:
            self.layer_removals.append(layer_id)
        self._validated = False
        return self

    def channels_to_remove(self, node_id: str) -> list[int] | None:
        return self.channel_removals.get(node_id)

    def is_layer_removed(self, layer_id: str) -> bool:
        return layer_id in self.layer_removals

    def is_validated(self) -> bool:
        return self._validated

    def total_channels_removed(self) -> int:
        return sum(len(v) for v in self.channel_removals.values())

    def total_layers_removed(self) -> int:
        return len(self.layer_removals)

    def validate(self, graph: DependencyGraph) -> None:
        """Check the plan against ``graph``.

        Raises:
            GraphError: an unknown node or layer id; two entries that contradict each other
                through a coupling (e.g. different channels for gate and up of one MLP).
            InvalidSparsity: a channel outside ``[0, output_dim)``, or every channel of a node.
        """
        for layer_id in self.layer_removals:
            if graph.get_node(layer_id) is None and not any(
                n.id.startswith((layer_id + ".", layer_id + ":")) for n in graph.nodes()
            ):
                raise GraphError(f"Layer '{layer_id}' not found in graph")
        for node_id, channels in self.channel_removals.items():
            node = graph.get_node(node_id)
            if node is None:
                raise GraphError(f"Layer '{node_id}' not found in graph")
            dim = node.space_dim(out_space(node.node_type))
            for ch in channels:
                if ch < 0 or (dim > 0 and ch >= dim):
                    raise InvalidSparsity(float(ch), f"Channel {ch} >= output_dim {dim} for layer {node_id}")
            if dim > 0 and len(channels) >= dim:
                raise InvalidSparsity(float(len(channels)), f"would remove all {dim} channels of layer {node_id}")
        self._check_consistency(graph)
        self._validated = True

    def _check_consistency(self, graph: DependencyGraph) -> None:
        for node_id, channels in self.channel_removals.items():
            group = channel_group(graph, node_id, channels)
            for other, other_channels in self.channel_removals.items():
                member = (other, out_space(graph.node(other).node_type))
                if other != node_id and member in group and list(group.channels(*member)) != other_channels:
                    raise GraphError(
                        f"plan entries contradict each other: removing {channels} from '{node_id}' removes "
                        f"{list(group.channels(*member))} from '{other}', but the plan says {other_channels}"
                    )

    def to_structured(self, graph: DependencyGraph) -> StructuredPlan:
        """Validate, expand each entry to its channel group, and return the structural plan.

        Layer ids must be module-list entries (``<container>.<index>``); the container's size
        is taken from the graph (highest index seen + 1).
        """
        self.validate(graph)
        plan = plan_from_groups(graph, (channel_group(graph, n, c) for n, c in self.channel_removals.items()))
        by_container: dict[str, list[int]] = {}
        for layer_id in self.layer_removals:
            match = re.fullmatch(r"(.+)\.(\d+)", layer_id)
            if match is None:
                raise GraphError(f"layer id '{layer_id}' is not a module-list entry '<container>.<index>'")
            by_container.setdefault(match.group(1), []).append(int(match.group(2)))
        removals = tuple(
            LayerRemoval(container, _container_size(graph, container), tuple(indices))
            for container, indices in by_container.items()
        )
        return StructuredPlan(plan.axis_edits, removals, plan.config)


def _container_size(graph: DependencyGraph, container: str) -> int:
    pattern = re.compile(re.escape(container) + r"\.(\d+)(\.|:|$)")
    indices = [int(m.group(1)) for n in graph.nodes() if (m := pattern.match(n.id))]
    if not indices:
        raise GraphError(f"no nodes under '{container}' in graph")
    return max(indices) + 1


__all__ = ["PruningPlan"]
