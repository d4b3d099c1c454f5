"""Hugging Face decoder LMs after structural edits: the config, module attributes, reloadability.

Stage: apply. After weights are sliced or layers dropped, the model must be exactly the model
``from_pretrained`` rebuilds from its saved config, or it breaks on reload or with a KV cache.
Nothing here knows parameter names; the reference is transformers itself:

- the new config is the old one with the plan's sizes, ``num_hidden_layers`` and
  ``config.layer_types`` (kept entry by entry, so sliding/full attention stays with its layer),
  and ``head_dim`` written explicitly (it is fixed by the dense model; Qwen2/Phi-3 configs
  would otherwise derive it from ``hidden_size / num_attention_heads``);
- :func:`check_config` (dry run) has transformers' config class validate it, as on reload, and
  builds a skeleton of the model class from it on the ``meta`` device (no memory): every
  parameter the plan leaves must have the skeleton's shape, so fused layouts (Phi-3's
  ``qkv_proj``), q/k norms and extra norms are checked like any other weight;
- :func:`sync_config_` writes the config, then copies every plain attribute in which a module
  differs from its skeleton counterpart (``layer_idx`` = the KV-cache slot,
  ``num_key_value_groups``, Phi-3's ``num_key_value_heads``, ...);
- a scaled token embedding (Gemma: ``embed * sqrt(hidden_size)``, a non-persistent buffer that
  reload recomputes from ``hidden_size``) keeps the dense model's scale: when ``hidden_size``
  changes, the embedding rows are multiplied by ``sqrt(old / new)`` and, if the output head is
  tied to them, the final norm's ``(1 + w)`` is divided by the same factor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pruning_core.arch import MODEL_BUILD_LOCK, decoder_blocks
from pruning_core.errors import ConfigError, GraphError

logger = logging.getLogger(__name__)
ShapeOf = Callable[[nn.Parameter], Sequence[int]]
# Model types whose RMSNorm computes x_hat * (1 + w) (the final-norm compensation needs it).
UNIT_OFFSET_NORM_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})
_SKIP_ATTRIBUTES = frozenset({"training", "config"})
_PLAIN = (bool, int, float, str, tuple, type(None))


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


def check_config(
    model: nn.Module,
    expected: Mapping[str, int],
    *,
    shape_of: ShapeOf | None = None,
    kept_layers: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """The config values the model will have after an edit, checked; nothing is changed.

    Args:
        expected: sizes the config must have afterwards (a plan's ``config``).
        shape_of: the shape each parameter will have (default: its current shape), so that a
            plan can be checked before it is applied.
        kept_layers: entries that will remain, per ``ModuleList`` path (a plan's layer
            removals); only the decoder layer list matters. Default: all of them.

    Returns:
        The values to write (``num_hidden_layers``, ``head_dim``, ``layer_types`` when the
        config has them, and ``expected``). Empty for a model without a HF text config.

    Raises:
        GraphError: the hidden size is not a multiple of the head count, the layer count
            differs from ``expected``, transformers' config class refuses the new config, or a
            parameter's shape differs from the one a model built from the new config has
            (e.g. layers with different sizes, or a size the plan's config does not state).
    """
    checked = _check(model, expected, shape_of, kept_layers)
    return checked[0] if checked is not None else {}


def _check(
    model: nn.Module, expected: Mapping[str, int], shape_of: ShapeOf | None,
    kept_layers: Mapping[str, Sequence[int]] | None,
) -> tuple[dict[str, Any], nn.Module] | None:
    """:func:`check_config`'s values and the skeleton built from them (None without a HF config)."""
    config = _text_config(model)
    if config is None:
        return None
    path = _safe_layers_path(model)
    dense_layers = len(model.get_submodule(path)) if path else 0
    kept = list(kept_layers[path]) if kept_layers and path in kept_layers else list(range(dense_layers))
    values = _new_values(config, expected, kept, dense_layers)
    skeleton = _skeleton(model, _new_config(config, values))
    _check_shapes(model, skeleton, path, kept, shape_of or (lambda p: tuple(p.shape)))
    _check_embedding_scale(model, skeleton)
    return values, skeleton


def sync_config_(model: nn.Module, expected: Mapping[str, int]) -> None:
    """Make a HF model's config and module attributes match its (edited) shapes.

    Everything is checked (:func:`check_config`) before anything is written.

    Raises:
        GraphError: see :func:`check_config`.
    """
    checked = _check(model, expected, None, None)
    if checked is None:
        return
    values, skeleton = checked
    config = _text_config(model)
    for key, value in values.items():
        setattr(config, key, value)
    _keep_embedding_scale_(model, skeleton)
    _copy_attributes_(model, skeleton)
    logger.info("config after structural edits: %s", {k: v for k, v in values.items() if k != "layer_types"})


def _new_values(config: Any, expected: Mapping[str, int], kept: Sequence[int], dense_layers: int) -> dict[str, Any]:
    if "num_hidden_layers" in expected and expected["num_hidden_layers"] != len(kept):
        raise GraphError(f"config after the plan differs from the plan's expectation: num_hidden_layers "
                         f"{expected['num_hidden_layers']} expected, {len(kept)} layers kept")
    values: dict[str, Any] = {**expected, "num_hidden_layers": len(kept)}
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == dense_layers:
        values["layer_types"] = [layer_types[i] for i in kept]
    heads = getattr(config, "num_attention_heads", None)
    if heads:
        values["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        hidden, new_heads = values.get("hidden_size", config.hidden_size), values.get("num_attention_heads", heads)
        if hidden % new_heads:
            raise GraphError(f"hidden_size {hidden} is not a multiple of num_attention_heads {new_heads}: "
                             "transformers' config validation would refuse to reload it")
    return values


def _config_errors() -> tuple[type[Exception], ...]:
    """What a transformers config class raises for values it refuses (its validators are
    huggingface_hub strict-dataclass validators, whose error is not a ValueError)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (ValueError, TypeError, KeyError)
    return (ValueError, TypeError, KeyError, StrictDataclassError)


def _new_config(config: Any, values: Mapping[str, Any]) -> Any:
    """``config`` with ``values``, rebuilt by its class (validated as ``from_pretrained`` would)."""
    try:
        return type(config).from_dict({**config.to_dict(), **values})
    except _config_errors() as exc:
        raise GraphError(f"{type(config).__name__} refuses the config after the plan "
                         f"({ {k: v for k, v in values.items() if k != 'layer_types'} }): {exc}") from exc


def _skeleton(model: nn.Module, config: Any) -> nn.Module:
    """The model class built from ``config`` on the meta device (shapes and attributes, no memory)."""
    try:
        with MODEL_BUILD_LOCK, torch.device("meta"):
            return type(model)(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise GraphError(f"cannot build {type(model).__name__} from the config after the plan: {exc}") from exc


def _check_shapes(model: nn.Module, skeleton: nn.Module, path: str, kept: Sequence[int], shape_of: ShapeOf) -> None:
    """Every parameter left after the edit must have the skeleton's shape, and none may be missing."""
    position = {old: new for new, old in enumerate(kept)}
    reference = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    after: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters():
        if path and name.startswith(path + "."):
            index, _, rest = name[len(path) + 1:].partition(".")
            if int(index) not in position:
                continue
            name = f"{path}.{position[int(index)]}.{rest}"
        after[name] = tuple(int(s) for s in shape_of(param))
    wrong = {n: (after.get(n), reference.get(n)) for n in sorted(set(after) | set(reference)) if after.get(n) != reference.get(n)}
    if wrong:
        config = skeleton.config  # type: ignore[attr-defined]
        sizes = {k: getattr(config, k, None) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                       "num_key_value_heads", "head_dim", "num_hidden_layers")}
        shown = "; ".join(f"{n}: {a} after the edit, {r} in the model of that config" for n, (a, r) in list(wrong.items())[:4])
        raise GraphError(f"{len(wrong)} parameters do not fit a {type(model).__name__} with config {sizes} "
                         f"(layers of different sizes, or a size the plan's config does not state): {shown}")


def _check_embedding_scale(model: nn.Module, skeleton: nn.Module) -> None:
    """A scaled embedding tied to the head can keep its scale only with a known final-norm form."""
    if _embedding_scales(model, skeleton) is None or not _tied_head(model):
        return
    if getattr(_text_config(model), "model_type", None) not in UNIT_OFFSET_NORM_TYPES:
        raise GraphError(f"{type(model).__name__}: the token embedding is scaled by sqrt(hidden_size) and tied to "
                         "the output head; changing hidden_size would change the model's scale, and this family's "
                         f"final norm is not one whose weight can compensate (known: {sorted(UNIT_OFFSET_NORM_TYPES)})")


def _embedding_scales(model: nn.Module, skeleton: nn.Module) -> tuple[float, float] | None:
    """(current, rebuilt) ``scalar_embed_scale`` of a scaled token embedding, if they differ."""
    old = getattr(model.get_input_embeddings(), "scalar_embed_scale", None) if hasattr(model, "get_input_embeddings") else None
    new = getattr(skeleton.get_input_embeddings(), "scalar_embed_scale", None) if old is not None else None
    return None if old is None or new is None or old == new else (float(old), float(new))


def _tied_head(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight


@torch.no_grad()
def _keep_embedding_scale_(model: nn.Module, skeleton: nn.Module) -> None:
    """Rescale the embedding rows (and a tied head's final norm) so inputs keep the dense scale."""
    scales = _embedding_scales(model, skeleton)
    if scales is None:
        return
    old, new = scales
    factor = old / new
    embed = model.get_input_embeddings()
    embed.weight.copy_((embed.weight.float() * factor).to(embed.weight.dtype))
    if isinstance(getattr(embed, "embed_scale", None), torch.Tensor):
        embed.embed_scale.fill_(new)
    if _tied_head(model):  # logits = W (n(h) * (1 + w)): divide (1 + w) by the factor W was multiplied by
        norm = model.get_decoder().norm
        norm.weight.copy_(((1.0 + norm.weight.float()) / factor - 1.0).to(norm.weight.dtype))
    logger.info("hidden size changed: token embedding rescaled by %.6f to keep the scale %.4f", factor, old)


def _copy_attributes_(model: nn.Module, skeleton: nn.Module) -> None:
    """Set every plain attribute in which a module differs from the rebuilt model's module."""
    reference = dict(skeleton.named_modules())
    for name, module in model.named_modules():
        ref = reference.get(name)
        if ref is None or type(ref) is not type(module):
            continue
        for key, value in vars(ref).items():
            if key.startswith("_") or key in _SKIP_ATTRIBUTES or not isinstance(value, _PLAIN):
                continue
            if getattr(module, key, None) != value:
                setattr(module, key, value)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        getter = getattr(config, "get_text_config", None)
        config = getter() if getter else None
    return config if config is not None and hasattr(config, "num_hidden_layers") else None


def _safe_layers_path(model: nn.Module) -> str:
    try:
        return decoder_layers_path(model)
    except (ConfigError, GraphError):
        return ""


__all__ = ["UNIT_OFFSET_NORM_TYPES", "check_config", "decoder_layers_path", "remove_layers_", "sync_config_"]
