"""Minitron configs: an architecture, a search target, how width importance is aggregated.

Stage: plans. Frozen, validated on construction. Errors (documented choice):

- :class:`ConfigError` for a target or architecture that cannot exist (zero heads, heads not a
  multiple of KV groups, a size above the dense model's, hidden not a multiple of the heads,
  a size not a multiple of its divisor) — the message names the field and the numbers;
- :class:`InvalidSparsity` for removing more layers than allowed (as ``DepthPruner`` does);
- :class:`GraphError` when a plan does not fit a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pruning_core.errors import ConfigError

Aggregation = Literal["mean", "l2", "var"]
_AGGREGATIONS = ("mean", "l2", "var")


@dataclass(frozen=True, slots=True, kw_only=True)
class WidthImportanceConfig:
    """How per-token activation magnitudes become one score per head/neuron/channel.

    Minitron (Muralidharan et al. 2024, Sec. 2.2) aggregates over the sequence, then over the
    batch, and compares mean, L2 and variance; the default (sequence ``mean``, batch ``l2``)
    is the combination the paper recommends for width.
    """

    seq_agg: Aggregation = "mean"
    batch_agg: Aggregation = "l2"

    def __post_init__(self) -> None:
        for name in ("seq_agg", "batch_agg"):
            if getattr(self, name) not in _AGGREGATIONS:
                raise ConfigError(name, f"must be one of {_AGGREGATIONS}, got {getattr(self, name)!r}")


DEFAULT_WIDTH_CONFIG = WidthImportanceConfig()


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    """One Llama-like shape. ``head_dim`` is fixed by the dense model and not part of it."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads", f"{self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size", f"{self.hidden_size} is not a multiple of num_attention_heads "
                              f"{self.num_attention_heads} (transformers' LlamaConfig requires it to reload)")

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        """The architecture of a HF Llama-like config (a composite config's text config)."""
        getter = getattr(config, "get_text_config", None)
        config = getter() if getter is not None else config
        return cls(
            num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size), num_attention_heads=int(config.num_attention_heads),
            num_key_value_heads=int(config.num_key_value_heads or config.num_attention_heads),
        )

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def num_parameters(
        self,
        *,
        vocab_size: int,
        head_dim: int,
        tied_embeddings: bool,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        norms_per_layer: int = 2,
        qk_norm: bool = False,
    ) -> int:
        """Parameter count of a Llama-like model with this shape (embeddings counted once if tied).

        Fused layouts (Phi-3's ``qkv_proj``, ``gate_up_proj``) hold the same weights as separate
        projections and count the same.

        Args:
            qkv_bias: q/k/v projections have biases (Llama ``attention_bias``; Qwen2 always).
            o_bias: the output projection has a bias (Llama ``attention_bias``; not Qwen2).
            mlp_bias: gate/up/down have biases (Llama ``mlp_bias``).
            norms_per_layer: hidden-size norm weights per layer (2; Gemma 2/3: 4).
            qk_norm: q and k norms of ``head_dim`` weights in every layer (Qwen3, Gemma 3).
        """
        h, i = self.hidden_size, self.intermediate_size
        q_kv = head_dim * (self.num_attention_heads + 2 * self.num_key_value_heads)  # q, k, v output sizes
        attn = h * head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        attn += q_kv * qkv_bias + h * o_bias + 2 * head_dim * qk_norm
        mlp = 3 * h * i + (2 * i + h) * mlp_bias
        layer = attn + mlp + norms_per_layer * h  # + the RMSNorm weights
        embeddings = vocab_size * h * (1 if tied_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    def check_within(self, dense: Architecture) -> None:
        """Raise :class:`ConfigError` if any size exceeds the dense model's, or a query group grows."""
        for name in self.__slots__:
            if getattr(self, name) > getattr(dense, name):
                raise ConfigError(name, f"target {getattr(self, name)} is above the original {getattr(dense, name)}")
        per_group = self.num_attention_heads // self.num_key_value_heads
        dense_group = dense.num_attention_heads // dense.num_key_value_heads
        if per_group > dense_group:
            raise ConfigError("num_attention_heads", f"{per_group} query heads per KV group; the model has "
                              f"{dense_group} (heads are pruned within their group, never regrouped)")


@dataclass(frozen=True, slots=True, kw_only=True)
class MinitronTarget:
    """What the search may produce: a parameter budget and/or explicit choices per axis.

    Attributes:
        param_budget: upper bound on parameters; candidates must also reach
            ``(1 - budget_tolerance) * param_budget`` (so they use the budget).
        num_layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads:
            allowed values per axis; ``None`` means every value allowed by the divisors.
        hidden_divisor, ffn_divisor: sizes searched must be multiples of these (ModelOpt's
            ``hidden_size_divisor``); explicit values are checked against them too.
        min_layers: fewest layers a candidate may keep.
        max_candidates: keep only the first (largest) this many candidates (None: all).
    """

    param_budget: int | None = None
    budget_tolerance: float = 0.05
    num_layers: tuple[int, ...] | None = None
    hidden_size: tuple[int, ...] | None = None
    intermediate_size: tuple[int, ...] | None = None
    num_attention_heads: tuple[int, ...] | None = None
    num_key_value_heads: tuple[int, ...] | None = None
    hidden_divisor: int = 64
    ffn_divisor: int = 64
    min_layers: int = 1
    max_candidates: int | None = None

    def __post_init__(self) -> None:
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ConfigError("max_candidates", f"must be >= 1, got {self.max_candidates}")
        if self.param_budget is not None and self.param_budget < 1:
            raise ConfigError("param_budget", f"must be positive, got {self.param_budget}")
        if not (math.isfinite(self.budget_tolerance) and 0.0 <= self.budget_tolerance < 1.0):
            raise ConfigError("budget_tolerance", f"must be in [0, 1), got {self.budget_tolerance}")
        for name in ("hidden_divisor", "ffn_divisor", "min_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name, divisor in (("hidden_size", self.hidden_divisor), ("intermediate_size", self.ffn_divisor),
                              ("num_layers", 1), ("num_attention_heads", 1), ("num_key_value_heads", 1)):
            values = getattr(self, name)
            if values is None:
                continue
            object.__setattr__(self, name, tuple(int(v) for v in values))
            bad = [v for v in getattr(self, name) if v < 1 or v % divisor]
            if not getattr(self, name) or bad:
                raise ConfigError(name, f"values must be positive multiples of {divisor}; bad: {bad or 'empty'}")
        if self.param_budget is None and all(
            getattr(self, n) is None
            for n in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
        ):
            raise ConfigError("param_budget", "give a parameter budget or at least one explicit axis")


__all__ = ["DEFAULT_WIDTH_CONFIG", "Aggregation", "Architecture", "MinitronTarget", "WidthImportanceConfig"]
