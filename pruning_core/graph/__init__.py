"""Channel dependency graph: trace a model, propagate channel pruning, plan and apply edits.

Stage: structured plans and apply. ``build_dependency_graph`` traces a real model;
``channel_group``/``propagate_channel_pruning`` compute what pruning channels implies;
``PruningPlan`` (removals by node id) and ``StructuredPlan`` (plain-data edits, JSON) describe the
edits; ``apply_plan_`` performs them in place. :mod:`~pruning_core.graph.roles` finds a decoder's
token embedding, attention units and gated MLP units by what they do in the graph.
"""

from pruning_core.graph.graph import DependencyGraph
from pruning_core.graph.handlers import DEFAULT_HANDLERS, LeafHandler, with_handler
from pruning_core.graph.hf import decoder_layers_path
from pruning_core.graph.plan import PruningPlan
from pruning_core.graph.propagate import (
    ChannelGroup,
    channel_group,
    coupled_spaces,
    propagate_channel_pruning,
)
from pruning_core.graph.roles import (
    AttentionUnit,
    MlpUnit,
    attention_units,
    implied_config,
    mlp_units,
    token_embedding,
)
from pruning_core.graph.structured import (
    AxisEdit,
    LayerRemoval,
    StructuredPlan,
    apply_plan_,
    plan_from_groups,
)
from pruning_core.graph.trace import build_dependency_graph
from pruning_core.graph.types import DependencyType, GraphEdge, GraphNode, NodeType

__all__ = [
    "DEFAULT_HANDLERS",
    "AttentionUnit",
    "AxisEdit",
    "ChannelGroup",
    "DependencyGraph",
    "DependencyType",
    "GraphEdge",
    "GraphNode",
    "LayerRemoval",
    "LeafHandler",
    "MlpUnit",
    "NodeType",
    "PruningPlan",
    "StructuredPlan",
    "apply_plan_",
    "attention_units",
    "build_dependency_graph",
    "channel_group",
    "coupled_spaces",
    "decoder_layers_path",
    "implied_config",
    "mlp_units",
    "plan_from_groups",
    "propagate_channel_pruning",
    "token_embedding",
    "with_handler",
]
