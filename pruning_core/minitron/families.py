"""The model families Minitron depth/width supports, their parameter layout, and the check.

Stage: plans (checked before any long work). Minitron needs Llama-like blocks (one attention
with q/k/v/o projections, one gated MLP, norms on the residual stream) *and* a config whose
sizes it knows how to rewrite. Which projections play which role is found in the traced graph
(:mod:`pruning_core.minitron.structure`); what a family adds to the parameter count is stated
here, per ``config.model_type``, from the transformers modeling code:

==============  =====================================================================
``llama``       q/k/v/o biases if ``attention_bias``, MLP biases if ``mlp_bias``
``mistral``     no biases
``qwen2``       q/k/v biases always, none on o_proj
``qwen3``       q/k norms (``head_dim`` each), biases if ``attention_bias``
``gemma2``      4 norms per layer (pre/post attention and feed-forward), scaled tied
                embedding, soft-capping, sliding/full ``layer_types``
``gemma3_text`` as Gemma 2, plus q/k norms
``phi3``        fused ``qkv_proj`` (q|k|v rows) and ``gate_up_proj`` (gate|up rows), no biases;
                with LongRoPE (``short_factor``/``long_factor``), ``Phi3Config`` checks the
                factors against ``hidden_size / num_attention_heads``, which must then stay
==============  =====================================================================

:func:`check_supported` refuses anything else, and a supported family whose real parameter
count differs from the layout's prediction, with :class:`UnsupportedArchitecture` naming the
decoder block and its module pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from pruning_core.arch import decoder_blocks
from pruning_core.errors import ConfigError, UnsupportedArchitecture
from pruning_core.minitron.config import Architecture

BiasRule = bool | str  # a constant, or the config attribute that decides (e.g. "attention_bias")


@dataclass(frozen=True, slots=True)
class MinitronFamily:
    """What a Llama-like family adds to the Llama layout (see the module table)."""

    name: str
    qkv_bias: BiasRule = False
    o_bias: BiasRule = False
    mlp_bias: BiasRule = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    rope_factors_per_head: bool = False  # LongRoPE factors are validated against hidden_size / heads

    def bias(self, rule: BiasRule, config: Any) -> bool:
        return bool(getattr(config, rule, False)) if isinstance(rule, str) else rule


_ATTN = "attention_bias"
FAMILIES: dict[str, MinitronFamily] = {
    "llama": MinitronFamily("Llama", qkv_bias=_ATTN, o_bias=_ATTN, mlp_bias="mlp_bias"),
    "mistral": MinitronFamily("Mistral"),
    "qwen2": MinitronFamily("Qwen2", qkv_bias=True),
    "qwen3": MinitronFamily("Qwen3", qkv_bias=_ATTN, o_bias=_ATTN, qk_norm=True),
    "gemma2": MinitronFamily("Gemma 2", qkv_bias=_ATTN, o_bias=_ATTN, norms_per_layer=4),
    "gemma3_text": MinitronFamily("Gemma 3", qkv_bias=_ATTN, o_bias=_ATTN, norms_per_layer=4, qk_norm=True),
    "phi3": MinitronFamily("Phi-3", rope_factors_per_head=True),
}


# Families we test and refuse, with what does not map (from their transformers modeling code).
REFUSED: dict[str, str] = {
    "phi": "parallel attention/MLP with a non-gated GELU MLP (fc1 -> fc2) and LayerNorms with biases",
    "olmo": "LayerNorms without weights (no norm parameter to slice or score the residual channels by)",
    "stablelm": "head_dim is derived from hidden_size / num_attention_heads (hidden pruning would change the "
                "heads) and optional per-head q/k LayerNorms, one module per head",
    "falcon": "a fused query_key_value with the heads interleaved, a non-gated GELU MLP, ALiBi or "
              "parallel attention",
    "gpt_neox": "a fused query_key_value interleaved per head (q, k, v of each head together), a non-gated "
                "GELU MLP and a parallel residual",
    "opt": "learned position embeddings, a non-gated ReLU MLP (fc1 -> fc2) and biased LayerNorms",
    "gpt2": "Conv1D projections (weights stored [in, out]) with a fused c_attn, learned position embeddings "
            "and a non-gated GELU MLP",
    "mixtral": "a mixture-of-experts MLP (router and fused 3-D expert weights), not one gated MLP",
    "qwen2_moe": "a mixture-of-experts MLP (router, fused 3-D expert weights, shared expert), not one gated MLP",
}


def text_config(model_or_config: Any) -> Any:
    """The text config of a model or config (``get_text_config()`` for composite configs)."""
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def minitron_family(model_or_config: Any) -> MinitronFamily:
    """The family of a model or config (by ``config.model_type``).

    Raises:
        UnsupportedArchitecture: the model type is not a supported Llama-like family.
    """
    config = text_config(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        owner = model_or_config if isinstance(model_or_config, nn.Module) else None
        why = REFUSED.get(str(model_type), "not a tested Llama-like block (one attention with q/k/v/o "
                          "projections, one gated MLP, norms on the residual stream)")
        raise UnsupportedArchitecture(
            type(owner).__name__ if owner is not None else type(config).__name__,
            f"Minitron depth/width does not support model_type {model_type!r}: {why}; supported: "
            f"{', '.join(supported_families())}", **_where(owner))
    return FAMILIES[model_type]


def supported_families() -> list[str]:
    return sorted(FAMILIES)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the parameter count needs besides the architecture (from the dense model).

    Attributes:
        norms_per_layer: hidden-size norm weights per decoder layer (Gemma: 4).
        qk_norm: each layer has q/k norms of ``head_dim`` weights (Qwen3, Gemma 3).
        hidden_per_head: if set, ``hidden_size / num_attention_heads`` must equal it (Phi-3 with
            LongRoPE factors; its config refuses anything else on reload).
    """

    vocab_size: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    hidden_per_head: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read from a HF config of a supported family (:data:`FAMILIES` says which biases and
        norms it has).

        Raises:
            UnsupportedArchitecture: not a supported family.
        """
        config = text_config(config)
        family = minitron_family(config)
        per_head = int(config.hidden_size) // int(config.num_attention_heads)
        rope = getattr(config, "rope_parameters", None) or {}
        fixed = family.rope_factors_per_head and ("short_factor" in rope or "long_factor" in rope)
        return cls(int(config.vocab_size), int(getattr(config, "head_dim", None) or per_head),
                   bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=family.bias(family.qkv_bias, config), o_bias=family.bias(family.o_bias, config),
                   mlp_bias=family.bias(family.mlp_bias, config), norms_per_layer=family.norms_per_layer,
                   qk_norm=family.qk_norm, hidden_per_head=per_head if fixed else None)

    def num_parameters(self, arch: Architecture) -> int:
        """``arch``'s parameter count for a model of this shape (see :meth:`Architecture.num_parameters`)."""
        return arch.num_parameters(vocab_size=self.vocab_size, head_dim=self.head_dim,
                                   tied_embeddings=self.tied_embeddings, qkv_bias=self.qkv_bias,
                                   o_bias=self.o_bias, mlp_bias=self.mlp_bias,
                                   norms_per_layer=self.norms_per_layer, qk_norm=self.qk_norm)


def check_supported(model: nn.Module) -> MinitronFamily:
    """Refuse, before any long work, a model Minitron depth/width cannot prune correctly.

    Cheap (no forward pass): the family, the decoder blocks, and the parameter layout (the real
    parameter count must equal :class:`ModelShape`'s prediction for the model's own
    architecture). The traced structure is checked again by
    :func:`~pruning_core.minitron.structure.trace_decoder` (roles of every block weight).

    Returns:
        The model's family.

    Raises:
        UnsupportedArchitecture: names the model class, the first decoder block and its module
            pattern, and what is not supported.
    """
    family = minitron_family(model)
    where = _where(model)
    config = text_config(model)
    try:
        predicted = ModelShape.from_config(config).num_parameters(Architecture.from_config(config))
    except (ConfigError, AttributeError, TypeError) as exc:
        raise UnsupportedArchitecture(type(model).__name__, f"its config does not describe a {family.name} "
                                      f"architecture ({exc})", **where) from exc
    actual = sum(p.numel() for p in model.parameters())
    if predicted != actual:
        raise UnsupportedArchitecture(type(model).__name__, f"{actual:,} parameters, but the {family.name} layout "
                                      f"of its config has {predicted:,}: a weight Minitron does not know", **where)
    return family


def block_pattern(block: nn.Module) -> str:
    """The modules holding parameters in a block, with their types and shapes (for messages)."""
    parts = []
    for name, module in block.named_modules():
        params = [f"{local} {list(p.shape)}" for local, p in module.named_parameters(recurse=False)]
        if params:
            parts.append(f"{name or '.'}: {type(module).__name__}({', '.join(params)})")
    return "; ".join(parts)


def _where(model: nn.Module | None) -> dict[str, str]:
    """``block``/``pattern`` keywords for an error about ``model``'s first decoder block."""
    if model is None:
        return {}
    try:
        path, blocks = decoder_blocks(model)
    except ConfigError:
        return {}
    return {"block": f"{path}.0", "pattern": block_pattern(blocks[0])}


__all__ = [
    "FAMILIES",
    "REFUSED",
    "MinitronFamily",
    "ModelShape",
    "block_pattern",
    "check_supported",
    "minitron_family",
    "supported_families",
    "text_config",
]
