"""Block Importance (Men et al. 2024, ShortGPT, arXiv:2403.03853, Eq. 1), per token.

Stage: scores. BI of layer i is ``1 - E_t[cos(h_in[t], h_out[t])]``: the cosine between a
layer's input and output hidden state for each token, averaged over all calibration tokens
(not one cosine over the flattened tensor, which would weight tokens by their norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pruning_core.errors import ConfigError, ShapeMismatch
from pruning_core.validate import check_finite


def block_importance(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """Per-token block importance of one layer on one batch.

    Args:
        h_in: layer input hidden states ``[..., tokens, hidden]`` (any leading dims; a 1-D
            tensor is one token).
        h_out: layer output, same shape.

    Returns:
        ``(sum over tokens of cos(h_in[t], h_out[t]), number of tokens)``, so batches can be
        accumulated exactly; BI = 1 - sum / count.
    """
    if h_in.shape != h_out.shape:
        raise ShapeMismatch(list(h_in.shape), list(h_out.shape), name="block_importance", reason="input vs output")
    a = h_in.reshape(-1, h_in.shape[-1]).float() if h_in.dim() else h_in.reshape(1, 1).float()
    b = h_out.reshape(-1, h_out.shape[-1]).float() if h_out.dim() else h_out.reshape(1, 1).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-10)  # [tokens]
    check_finite(cos, method="block_importance", what="cosine")
    return float(cos.sum()), int(cos.numel())


@dataclass(frozen=True, slots=True)
class BlockImportanceScores:
    """``scores`` = ((layer index, BI), ...); ``num_samples`` = calibration tokens seen."""

    scores: tuple[tuple[int, float], ...]
    num_samples: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", tuple((int(i), float(s)) for i, s in self.scores))
        if any(not math.isfinite(s) for _, s in self.scores):
            raise ConfigError("scores", f"non-finite block importance in {self.scores}")

    def get(self, index: int) -> float | None:
        return next((s for i, s in self.scores if i == index), None)

    def sorted_by_importance(self) -> list[tuple[int, float]]:
        """Ascending by score; ties keep their order (stable)."""
        return sorted(self.scores, key=lambda item: item[1])

    def least_important(self, n: int) -> list[int]:
        return [i for i, _ in self.sorted_by_importance()[: max(0, n)]]

    def as_tensor(self, num_layers: int) -> torch.Tensor:
        """Scores as a ``[num_layers]`` float64 tensor (every layer must be present)."""
        values = dict(self.scores)
        missing = [i for i in range(num_layers) if i not in values]
        if missing:
            raise ShapeMismatch([num_layers], [len(values)], name="BlockImportanceScores", reason=f"missing layers {missing}")
        return torch.tensor([values[i] for i in range(num_layers)], dtype=torch.float64)


__all__ = ["BlockImportanceScores", "block_importance"]
