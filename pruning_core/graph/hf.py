"""Hugging Face decoder-only models (Llama family) after structural edits: config and bookkeeping.

Stage: apply. After weights are sliced or layers dropped, a HF model's config and a few module
attributes must follow, or the model breaks on reload or with a KV cache:

- ``config.num_hidden_layers`` (and ``config.layer_types`` if present, kept entry by entry);
- each attention module's ``layer_idx`` (the KV-cache slot) renumbered to its new position;
- ``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``
  read back from the sliced shapes (``head_dim`` is kept and written explicitly);
- ``num_key_value_groups`` on each attention module (query heads per KV head).

Works on any model whose layers are ``model.<base>.layers`` with ``self_attn.{q,k,v,o}_proj``
and ``mlp.{gate,up,down}_proj`` (Llama, Mistral, Qwen2, SmolLM2); other models only get the
generic steps (module lists, ``layer_idx``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from pruning_core.arch import decoder_blocks
from pruning_core.errors import GraphError

logger = logging.getLogger(__name__)


def decoder_layers_path(model: nn.Module) -> str:
    """Qualified name of the decoder ``ModuleList`` (old name of :func:`pruning_core.arch.decoder_blocks`)."""
    return decoder_blocks(model)[0]


def remove_layers_(model: nn.Module, container: str, kept: Sequence[int]) -> None:
    """Keep only entries ``kept`` of the ModuleList ``container``; fix layer bookkeeping."""
    parent_path, _, attr = container.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([old[i] for i in kept]))
    config = _text_config(model)
    if config is None or container != _safe_layers_path(model):
        return
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(old):
        config.layer_types = [layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)


def sync_config_(model: nn.Module, expected: Mapping[str, int]) -> None:
    """Make a HF model's config and attention bookkeeping match its (edited) shapes.

    Everything is checked (:func:`check_config`) before anything is written.

    Raises:
        GraphError: see :func:`check_config`.
    """
    config = _text_config(model)
    if config is None:
        return
    derived = check_config(model, expected)
    path = _safe_layers_path(model)
    layers = model.get_submodule(path) if path else []
    for i, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    for key, value in derived.items():
        setattr(config, key, value)
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = derived["num_attention_heads"] // derived["num_key_value_heads"]
    logger.info("config after structural edits: %s", derived)


def check_config(
    model: nn.Module,
    expected: Mapping[str, int],
    *,
    shape_of: Callable[[nn.Parameter], Sequence[int]] | None = None,
    kept_layers: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, int]:
    """The config values the model's shapes imply, checked; nothing is changed.

    Args:
        expected: values the config must have afterwards (a plan's ``config``).
        shape_of: the shape each parameter will have (default: its current shape), so that a
            plan can be checked before it is applied.
        kept_layers: entries that will remain, per ``ModuleList`` path (a plan's layer
            removals); only the decoder layer list matters. Default: all of them.

    Returns:
        The derived values (``num_hidden_layers``, ``hidden_size``, ``intermediate_size``,
        ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``; those the model has).
        Empty for a model without a HF text config.

    Raises:
        GraphError: per-layer sizes differ (a HF config cannot express that), the hidden size
            is not a multiple of the head count (``LlamaConfig`` would refuse to reload), or a
            value differs from ``expected``.
    """
    config = _text_config(model)
    if config is None:
        return {}
    path = _safe_layers_path(model)
    layers = list(model.get_submodule(path)) if path else []
    if kept_layers and path in kept_layers:
        layers = [layers[i] for i in kept_layers[path]]
    derived = _derive_sizes(model, layers, config, shape_of or (lambda p: tuple(p.shape)))
    if "num_attention_heads" in derived and derived["hidden_size"] % derived["num_attention_heads"]:
        raise GraphError(
            f"hidden_size {derived['hidden_size']} is not a multiple of num_attention_heads "
            f"{derived['num_attention_heads']}: transformers' config validation would refuse to reload it"
        )
    after = {k: derived.get(k, getattr(config, k, None)) for k in expected}
    mismatched = {k: (v, after[k]) for k, v in expected.items() if after[k] != v}
    if mismatched:
        raise GraphError(f"config after the plan differs from the plan's expectation {{key: (expected, got)}}: {mismatched}")
    return derived


def _derive_sizes(
    model: nn.Module, layers: Sequence[nn.Module], config: Any, shape_of: Callable[[nn.Parameter], Sequence[int]]
) -> dict[str, int]:
    sizes: dict[str, int] = {"num_hidden_layers": len(layers)}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embed, nn.Embedding):
        sizes["hidden_size"] = int(shape_of(embed.weight)[1])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_layer: dict[str, set[int]] = {"num_attention_heads": set(), "num_key_value_heads": set(), "intermediate_size": set()}
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
            per_layer["num_attention_heads"].add(int(shape_of(attn.q_proj.weight)[0]) // head_dim)
            per_layer["num_key_value_heads"].add(int(shape_of(attn.k_proj.weight)[0]) // head_dim)
        if mlp is not None and hasattr(mlp, "up_proj"):
            per_layer["intermediate_size"].add(int(shape_of(mlp.up_proj.weight)[0]))
    for key, values in per_layer.items():
        if len(values) > 1:
            raise GraphError(f"layers have different {key} {sorted(values)}; a HF config needs one value")
        if values:
            sizes[key] = values.pop()
    if "num_attention_heads" in sizes:
        sizes["head_dim"] = int(head_dim)
    return sizes


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        getter = getattr(config, "get_text_config", None)
        config = getter() if getter else None
    return config if config is not None and hasattr(config, "num_hidden_layers") else None


def _safe_layers_path(model: nn.Module) -> str:
    try:
        return decoder_layers_path(model)
    except GraphError:
        return ""


__all__ = ["check_config", "decoder_layers_path", "remove_layers_", "sync_config_"]
