"""The seed's ``WidthPruner`` facade: targets, channel importance from activations, result record.

Stage: compat (see :mod:`pruning_core.compat`). :class:`WidthPruner` holds hidden/intermediate
targets and the head count; :meth:`WidthPruner.compute_channel_importance` is ``mean(x^2)`` per
channel over caller-supplied ``[N, C]`` activations, and :meth:`WidthPruner.prune_` runs the
library's Minitron width pruning: per-head, per-neuron and residual-channel importance from hooks
(:func:`~pruning_core.minitron.width_scores.collect_width_scores`), GQA-consistent head
selection and physical slicing (:func:`~pruning_core.minitron.width_plan.width_plan`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruning_core.errors import ConfigError, InvalidPattern, InvalidSparsity, ShapeMismatch
from pruning_core.graph.structured import apply_plan_
from pruning_core.minitron.config import DEFAULT_WIDTH_CONFIG, Architecture, WidthImportanceConfig
from pruning_core.minitron.structure import trace_decoder
from pruning_core.minitron.width_plan import top_k_indices, width_plan
from pruning_core.minitron.width_scores import collect_width_scores
from pruning_core.validate import check_finite, check_rank


@dataclass(frozen=True, slots=True)
class ChannelImportance:
    """Per-channel importance: ``hidden [H]``, ``intermediate [I]``, from ``num_samples`` rows."""

    hidden: torch.Tensor
    intermediate: torch.Tensor
    num_samples: int

    def hidden_dim(self) -> int:
        return int(self.hidden.numel())

    def intermediate_dim(self) -> int:
        return int(self.intermediate.numel())

    def top_hidden_channels(self, k: int) -> list[int]:
        """Top ``k`` hidden channels (ties: lower index), ascending; all if ``k`` exceeds the size."""
        return top_k_indices(self.hidden, min(k, self.hidden_dim()))

    def top_intermediate_channels(self, k: int) -> list[int]:
        return top_k_indices(self.intermediate, min(k, self.intermediate_dim()))


@dataclass(frozen=True, slots=True)
class WidthPruner:
    """Width targets. ``num_attention_heads`` must be >= 1 if given.

    ``num_attention_heads`` and ``num_key_value_heads`` (GQA) default to ``None``: the model's
    own counts, i.e. attention is left alone unless asked (``WidthPruner(48, 64)`` only narrows
    the hidden size and the MLP).
    """

    target_hidden_dim: int
    target_intermediate_dim: int
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads is not None and self.num_attention_heads < 1:
            raise ConfigError("num_attention_heads", f"must be >= 1, got {self.num_attention_heads}")
        for name in ("target_hidden_dim", "target_intermediate_dim"):
            if getattr(self, name) < 1:
                raise InvalidSparsity(float(getattr(self, name)), f"{name} must be >= 1")
        if self.num_key_value_heads is not None and self.num_key_value_heads < 1:
            raise ConfigError("num_key_value_heads", f"must be >= 1, got {self.num_key_value_heads}")

    def prune_(
        self,
        model: nn.Module,
        batches: Sequence[torch.Tensor],
        *,
        config: WidthImportanceConfig = DEFAULT_WIDTH_CONFIG,
    ) -> WidthPruningResult:
        """Minitron width pruning of a HF decoder LM in place: trace it, score heads/neurons/
        channels on ``batches``, keep the top ones (GQA-consistent), slice every coupled weight.

        Returns:
            The sizes, the kept hidden channels and, per layer, the kept MLP neurons (dense
            indices, ascending).

        Raises:
            ConfigError: targets the model cannot take (above the original, heads not a
                multiple of the KV heads, hidden not a multiple of the heads).
        """
        graph, structure = trace_decoder(model, batches[0][:1, :8])
        scores = collect_width_scores(model, batches, structure, config)
        dense = Architecture.from_config(model.config)
        target = Architecture(
            num_layers=dense.num_layers, hidden_size=self.target_hidden_dim,
            intermediate_size=self.target_intermediate_dim,
            num_attention_heads=self.num_attention_heads or dense.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads or dense.num_key_value_heads,
        )
        plan = width_plan(graph, structure, scores, target)  # raises ConfigError before anything changes
        # the same selections width_plan makes (top-k, ties to the lower index)
        hidden_keep = top_k_indices(scores.hidden, self.target_hidden_dim)
        neurons_keep = tuple(tuple(top_k_indices(layer, self.target_intermediate_dim)) for layer in scores.neurons)
        apply_plan_(model, plan)
        return WidthPruningResult(dense.hidden_size, target.hidden_size, dense.intermediate_size,
                                  target.intermediate_size, tuple(hidden_keep), neurons_keep)

    def validate(self, original_hidden: int, original_intermediate: int, original_heads: int | None = None) -> None:
        """Targets must fit the model: hidden divisible by the heads (``num_attention_heads``, or
        ``original_heads`` when that is left unchanged; not checked if both are unknown), nothing
        above the original."""
        heads = self.num_attention_heads or original_heads
        if heads is not None and self.target_hidden_dim % heads:
            raise InvalidPattern(
                f"target_hidden_dim ({self.target_hidden_dim}) must be divisible by num_attention_heads ({heads})"
            )
        if self.target_hidden_dim > original_hidden:
            raise InvalidSparsity(float(self.target_hidden_dim), f"target_hidden_dim exceeds the original {original_hidden}")
        if self.target_intermediate_dim > original_intermediate:
            raise InvalidSparsity(
                float(self.target_intermediate_dim), f"target_intermediate_dim exceeds the original {original_intermediate}"
            )

    @staticmethod
    def compute_channel_importance(hidden: torch.Tensor, intermediate: torch.Tensor) -> ChannelImportance:
        """``importance[c] = mean_n x[n, c]^2`` for ``[N, H]`` hidden and ``[N, I]`` intermediate activations."""
        check_rank(hidden, 2, name="hidden", what="activation matrix")
        check_rank(intermediate, 2, name="intermediate", what="activation matrix")
        if hidden.shape[0] != intermediate.shape[0]:
            raise ShapeMismatch([hidden.shape[0]], [intermediate.shape[0]], name="compute_channel_importance",
                                reason="hidden and intermediate sample counts differ")
        for name, x in (("hidden", hidden), ("intermediate", intermediate)):
            check_finite(x, method="width_importance", what=f"{name} activations")
        return ChannelImportance(hidden.double().square().mean(dim=0), intermediate.double().square().mean(dim=0),
                                 int(hidden.shape[0]))

    def select_channels_to_keep(self, importance: ChannelImportance) -> tuple[list[int], list[int]]:
        """Validate against the importance's sizes, then the top channels of each axis (ascending)."""
        self.validate(importance.hidden_dim(), importance.intermediate_dim())
        return (importance.top_hidden_channels(self.target_hidden_dim),
                importance.top_intermediate_channels(self.target_intermediate_dim))

    @staticmethod
    def generate_hidden_mask(original_dim: int, keep: Sequence[int]) -> torch.Tensor:
        """Boolean ``[original_dim]`` mask, True = keep. An out-of-range index is an error."""
        bad = [i for i in keep if not 0 <= int(i) < original_dim]
        if bad:
            raise InvalidSparsity(float(bad[0]), f"channel index outside [0, {original_dim})")
        mask = torch.zeros(original_dim, dtype=torch.bool)
        mask[list(keep)] = True
        return mask

    def head_dim_after_pruning(self, original_heads: int | None = None) -> int:
        """``target_hidden_dim // num_attention_heads`` (Minitron itself keeps head_dim fixed).

        Raises:
            ConfigError: the head count is left unchanged and ``original_heads`` is not given.
        """
        heads = self.num_attention_heads or original_heads
        if heads is None:
            raise ConfigError("num_attention_heads", "unchanged (None): pass the model's head count as original_heads")
        return self.target_hidden_dim // heads


@dataclass(frozen=True, slots=True)
class WidthPruningResult:
    """Sizes before/after, and what :meth:`WidthPruner.prune_` kept (empty when not recorded).

    Attributes:
        hidden_channels_kept: kept residual-stream channels (dense indices, ascending).
        intermediate_channels_kept: kept MLP neurons of each decoder layer (one tuple per layer,
            dense indices, ascending); Minitron selects neurons per layer.
    """

    original_hidden_dim: int
    final_hidden_dim: int
    original_intermediate_dim: int
    final_intermediate_dim: int
    hidden_channels_kept: tuple[int, ...] = ()
    intermediate_channels_kept: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.final_hidden_dim > self.original_hidden_dim or self.final_intermediate_dim > self.original_intermediate_dim:
            raise InvalidSparsity(float(self.final_hidden_dim), "final width above the original")

    def hidden_compression_ratio(self) -> float:
        return math.inf if self.final_hidden_dim == 0 else self.original_hidden_dim / self.final_hidden_dim

    def intermediate_compression_ratio(self) -> float:
        return math.inf if self.final_intermediate_dim == 0 else self.original_intermediate_dim / self.final_intermediate_dim

    def hidden_removal_percentage(self) -> float:
        orig = self.original_hidden_dim
        return 0.0 if orig == 0 else (orig - self.final_hidden_dim) / orig * 100.0

    def intermediate_removal_percentage(self) -> float:
        orig = self.original_intermediate_dim
        return 0.0 if orig == 0 else (orig - self.final_intermediate_dim) / orig * 100.0


__all__ = ["ChannelImportance", "WidthPruner", "WidthPruningResult"]
