"""The seed's ``DepthPruner`` facade: Block Importance scores, layer selection, result record.

Stage: compat (see :mod:`pruning_core.compat`). Block Importance (Men et al. 2024, ShortGPT,
arXiv:2403.03853, Eq. 1; used by Minitron, Muralidharan et al. 2024, arXiv:2407.14679) of layer i
is ``BI_i = 1 - E_t[cos(h_in[t], h_out[t])]``, per token, averaged over all calibration tokens
(:func:`~pruning_core.minitron.bi.block_importance`). A layer that barely changes the residual
stream (BI near 0) is the first to remove. The library's own depth pruning is
:mod:`pruning_core.minitron.depth_scores` (BI, LM-loss drop, iterative selection, ``depth_plan``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from pruning_core.errors import ConfigError, InvalidSparsity, ShapeMismatch
from pruning_core.graph.structured import apply_plan_
from pruning_core.minitron.bi import BlockImportanceScores, block_importance
from pruning_core.minitron.depth_scores import (
    bi_iterative,
    collect_block_importance,
    decoder_layers,
    depth_plan,
)


@dataclass(frozen=True, slots=True)
class DepthPruner:
    """How many layers to remove; ``iterative`` recomputes scores after each removal."""

    num_layers_to_remove: int = 0
    iterative: bool = True
    min_layers: int = 1

    def __post_init__(self) -> None:
        if self.num_layers_to_remove < 0:
            raise InvalidSparsity(float(self.num_layers_to_remove), "num_layers_to_remove must be >= 0")
        if self.min_layers < 0:
            raise ConfigError("min_layers", f"must be >= 0, got {self.min_layers}")

    def with_iterative(self, iterative: bool) -> DepthPruner:
        return replace(self, iterative=bool(iterative))

    def with_min_layers(self, min_layers: int) -> DepthPruner:
        return replace(self, min_layers=int(min_layers))

    def is_iterative(self) -> bool:
        return self.iterative

    def prune_(self, model: nn.Module, batches: Sequence[torch.Tensor]) -> DepthPruningResult:
        """Score ``model``'s decoder layers by Block Importance on ``batches``, remove the least
        important ``num_layers_to_remove`` physically (in place), and report them.

        ``iterative`` recomputes BI on the shallower model after each removal; otherwise one
        ranking is used. The reported scores are the dense model's BI of the removed layers.
        """
        num_layers = len(decoder_layers(model))
        self.validate(num_layers)
        scores = collect_block_importance(model, batches)
        if self.iterative:
            removed = bi_iterative(model, batches, self.num_layers_to_remove, min_layers=self.min_layers)
        else:
            removed = self.select_layers_to_remove(scores, num_layers)
        apply_plan_(model, depth_plan(model, removed))
        return DepthPruningResult(tuple((i, scores.get(i) or 0.0) for i in sorted(removed)), num_layers)

    @staticmethod
    def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
        """Cosine of two tensors taken as flat vectors.

        Empty or both (near) zero -> 1.0; one zero -> 0.0; clamped to [-1, 1].
        """
        if a.numel() != b.numel():
            raise ShapeMismatch(list(a.shape), list(b.shape), name="cosine_similarity", reason="element counts differ")
        x, y = a.reshape(-1).double(), b.reshape(-1).double()
        if x.numel() == 0 or (bool((x.abs() < 1e-10).all()) and bool((y.abs() < 1e-10).all())):
            return 1.0
        denom = float(x.norm() * y.norm())
        return 0.0 if denom < 1e-10 else max(-1.0, min(1.0, float(x @ y) / denom))

    def compute_layer_importance(self, h_in: torch.Tensor, h_out: torch.Tensor) -> float:
        """BI of one layer from ``[..., hidden]`` tensors: 1 - mean per-token cosine, in [0, 2]."""
        total, count = block_importance(h_in, h_out)
        return 1.0 - total / count if count else 0.0

    def compute_block_importance(
        self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
    ) -> BlockImportanceScores:
        """BI for every layer from captured ``inputs[i]``/``outputs[i]`` (``[..., hidden]`` each)."""
        if len(inputs) != len(outputs):
            raise ShapeMismatch([len(inputs)], [len(outputs)], name="compute_block_importance", reason="layer counts")
        scores, tokens = [], 0
        for i, (h_in, h_out) in enumerate(zip(inputs, outputs, strict=True)):
            total, count = block_importance(h_in, h_out)
            scores.append((i, 1.0 - total / count if count else 0.0))
            tokens = count
        return BlockImportanceScores(tuple(scores), tokens)

    def validate(self, num_layers: int) -> None:
        if num_layers < self.min_layers:
            raise InvalidSparsity(float(num_layers), f"model has {num_layers} layers, fewer than min_layers {self.min_layers}")
        if self.num_layers_to_remove > num_layers - self.min_layers:
            raise InvalidSparsity(
                float(self.num_layers_to_remove),
                f"cannot remove {self.num_layers_to_remove} of {num_layers} layers and keep min_layers {self.min_layers}",
            )

    def select_layers_to_remove(self, scores: BlockImportanceScores, num_layers: int) -> list[int]:
        """The ``num_layers_to_remove`` lowest-BI layers, sorted **descending** (safe removal order)."""
        self.validate(num_layers)
        scores.as_tensor(num_layers)  # every layer must be scored
        return sorted(scores.least_important(self.num_layers_to_remove), reverse=True)


@dataclass(frozen=True, slots=True)
class DepthPruningResult:
    """Removed layers with their scores, and the depth before/after."""

    removed_layers: tuple[tuple[int, float], ...]
    original_depth: int

    def __post_init__(self) -> None:
        if len(self.removed_layers) > self.original_depth:
            raise InvalidSparsity(float(len(self.removed_layers)), f"more removed layers than the depth {self.original_depth}")

    @property
    def final_depth(self) -> int:
        return self.original_depth - len(self.removed_layers)

    def compression_ratio(self) -> float:
        return math.inf if self.final_depth == 0 else self.original_depth / self.final_depth

    def removal_percentage(self) -> float:
        return 0.0 if self.original_depth == 0 else len(self.removed_layers) / self.original_depth * 100.0


__all__ = ["DepthPruner", "DepthPruningResult"]
