"""Minitron activation-based width importance (Muralidharan et al. 2024, Sec. 2.2).

Stage: statistics -> scores. One forward pass over calibration batches with hooks at points
found in the traced graph (:mod:`pruning_core.minitron.structure`):

- **attention heads**: the input of the attention output projection (``o_proj``) is the
  concatenated per-head attention output; a head's per-token activation is the L2 norm of its
  ``head_dim`` slice, ``||Attn(X W_Q^i, X W_K^i, X W_V^i)||_2``;
- **MLP neurons**: the input of the down projection, i.e. ``act(gate(x)) * up(x)`` for SwiGLU;
  a neuron's per-token activation is ``|a_i|``;
- **embedding channels**: the outputs of every norm on the residual stream (each layer's two
  RMSNorms and the final norm); a channel's per-token activation is ``|LN(X)_i|``, summed
  over the norms.

Per-token activations ``[B, T, C]`` are aggregated over the sequence, then over the batch,
each by ``mean``, ``l2`` or ``var`` (:class:`WidthImportanceConfig`). Accumulation keeps exact
sums, so the result does not depend on how the calibration set is split into batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.errors import CalibrationRequired
from pruning_core.minitron.config import DEFAULT_WIDTH_CONFIG, WidthImportanceConfig
from pruning_core.minitron.structure import DecoderStructure
from pruning_core.validate import check_finite


@dataclass(frozen=True)
class WidthScores:
    """Importance per width axis (higher = keep). float64 tensors.

    Attributes:
        hidden: ``[hidden_size]`` embedding channels.
        neurons: ``[num_layers, intermediate_size]`` MLP neurons per layer.
        heads: ``[num_layers, num_heads]`` query heads per layer.
        num_tokens: calibration tokens seen.
    """

    hidden: torch.Tensor
    neurons: torch.Tensor
    heads: torch.Tensor
    num_tokens: int


class _Aggregate:
    """Sequence then batch aggregation of ``[B, T, C]`` activations, exact across batches."""

    def __init__(self, config: WidthImportanceConfig) -> None:
        self.config = config
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        self.samples = 0

    def update(self, act: torch.Tensor) -> None:
        a = act.detach().double()  # [B, T, C]
        if self.config.seq_agg == "mean":
            per_sample = a.mean(dim=1)
        elif self.config.seq_agg == "l2":
            per_sample = a.norm(dim=1)
        else:
            per_sample = a.var(dim=1, unbiased=False)
        if self.sum is None:
            self.sum, self.sum_sq = torch.zeros_like(per_sample[0]), torch.zeros_like(per_sample[0])
        self.sum += per_sample.sum(dim=0)
        self.sum_sq += per_sample.square().sum(dim=0)
        self.samples += per_sample.shape[0]

    def finalize(self) -> torch.Tensor:
        if self.sum is None or self.sum_sq is None or not self.samples:
            raise CalibrationRequired("width importance (a hook never fired)")
        mean = self.sum / self.samples
        if self.config.batch_agg == "mean":
            return mean
        if self.config.batch_agg == "l2":
            return self.sum_sq.sqrt()
        return (self.sum_sq / self.samples - mean.square()).clamp_min(0.0)


def collect_width_scores(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    structure: DecoderStructure,
    config: WidthImportanceConfig = DEFAULT_WIDTH_CONFIG,
    *,
    progress: bool = False,
) -> WidthScores:
    """Run ``batches`` through ``model`` once and return the Minitron width importance.

    Args:
        model: the dense model (hooks are removed afterwards, also on error).
        batches: token ids ``[B, T]``.
        structure: from :func:`~pruning_core.minitron.structure.decoder_structure`.
        config: sequence/batch aggregation.
    """
    if not batches:
        raise CalibrationRequired("collect_width_scores")
    heads = [_Aggregate(config) for _ in structure.attention]
    neurons = [_Aggregate(config) for _ in structure.mlp]
    norms = [_Aggregate(config) for _ in structure.norms]
    handles = _register_hooks(model, structure, heads, neurons, norms)
    tokens = 0
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="width importance", disable=not progress, leave=False):
                model(input_ids=ids, use_cache=False)
                tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    scores = WidthScores(
        hidden=torch.stack([a.finalize() for a in norms]).sum(dim=0),
        neurons=torch.stack([a.finalize() for a in neurons]),
        heads=torch.stack([a.finalize() for a in heads]),
        num_tokens=tokens,
    )
    for what in ("hidden", "neurons", "heads"):
        check_finite(getattr(scores, what), method="collect_width_scores", what=f"{what} importance")
    return scores


def _register_hooks(
    model: nn.Module, structure: DecoderStructure, heads: list[_Aggregate], neurons: list[_Aggregate],
    norms: list[_Aggregate],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Pre-hooks on each o_proj (per-head norms) and down_proj (|a|), hooks on each norm (|LN(x)|)."""
    modules = dict(model.named_modules())
    handles = []
    for unit, agg in zip(structure.attention, heads, strict=True):
        split = _head_norms(unit.num_heads, unit.head_dim)
        handles.append(modules[unit.o].register_forward_pre_hook(_pre_hook(agg, split)))
    for unit, agg in zip(structure.mlp, neurons, strict=True):
        handles.append(modules[unit.down].register_forward_pre_hook(_pre_hook(agg, torch.abs)))
    for name, agg in zip(structure.norms, norms, strict=True):
        handles.append(modules[name].register_forward_hook(lambda _m, _a, out, agg=agg: agg.update(out.abs())))
    return handles


def _head_norms(num_heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def split(x: torch.Tensor) -> torch.Tensor:  # [B, T, heads * head_dim] -> [B, T, heads]
        return x.unflatten(-1, (num_heads, head_dim)).norm(dim=-1)
    return split


def _pre_hook(agg: _Aggregate, transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple) -> None:
        agg.update(transform(args[0]))
    return hook


__all__ = ["WidthScores", "collect_width_scores"]
