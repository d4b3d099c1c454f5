"""The two networks of Frankle & Carbin (2019, arXiv:1803.03635, Figure 2) for 28x28 inputs.

Stage: models (used by the Lottery Ticket experiments).

- LeNet-300-100: fully connected 784-300-100-10 with ReLU (266,200 weights).
- Conv-2: two 3x3 convolutions with 64 channels, 2x2 max-pooling, then fully connected
  256-256-10 (the paper's CIFAR-10 net; here with one 28x28 input channel, so the first fully
  connected layer sees 64·14·14 = 12,544 features).

Both are initialised as in the paper: Gaussian Glorot (Xavier normal) weights, zero biases,
from an explicit ``torch.Generator`` (``init_weights_``), so an initialisation is reproducible
without touching the global RNG. Parameter names: ``conv.{i}.weight``, ``hidden.{i}.weight``,
``output.weight``; :func:`paper_layer_rates` gives the paper's per-round pruning rates per name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pruning_core.errors import ConfigError


def _init_(module: nn.Module, generator: torch.Generator | None) -> None:
    """Glorot-normal weights and zero biases for every Linear and Conv2d inside ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_sizes(field: str, sizes: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sizes)
    if not out or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in out):
        raise ConfigError(field, f"must be a non-empty sequence of positive integers, got {sizes!r}")
    return out


class LeNet300100(nn.Module):
    """LeNet-300-100: ``x [B, 1, 28, 28] (or [B, 784]) -> logits [B, num_classes]``."""

    def __init__(
        self,
        hidden: Sequence[int] = (300, 100),
        *,
        in_features: int = 784,
        num_classes: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        sizes = (in_features, *_check_sizes("hidden", hidden))
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.output = nn.Linear(sizes[-1], num_classes)
        self.init_weights_(generator)

    def init_weights_(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise in place: Glorot-normal weights, zero biases."""
        _init_(self, generator)

    @property
    def output_layer_name(self) -> str:
        return "output.weight"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [B, 784]
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.output(x)


class Conv2(nn.Module):
    """Conv-2: ``x [B, C, 28, 28] -> logits [B, num_classes]`` (conv64-conv64-pool-fc256-fc256-fc10)."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (64, 64),
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        chans = (in_channels, *_check_sizes("channels", channels))
        if image_size % 2:
            raise ConfigError("image_size", f"must be even for the 2x2 pooling, got {image_size}")
        self.conv = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        sizes = (chans[-1] * (image_size // 2) ** 2, *_check_sizes("hidden", hidden))
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.output = nn.Linear(sizes[-1], num_classes)
        self.init_weights_(generator)

    def init_weights_(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise in place: Glorot-normal weights, zero biases."""
        _init_(self, generator)

    @property
    def output_layer_name(self) -> str:
        return "output.weight"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.conv:
            x = F.relu(conv(x))  # [B, 64, 28, 28]
        x = F.max_pool2d(x, 2).flatten(1)  # [B, 64·14·14]
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.output(x)


def paper_layer_rates(model: LeNet300100 | Conv2) -> dict[str, float]:
    """Per-round pruning rates of Frankle & Carbin (2019): 20% for fully connected layers,
    10% for convolutions, and half the fully connected rate (10%) for the output layer.

    Returns:
        ``{parameter name: rate}`` for every weight of ``model``.
    """
    rates = {f"hidden.{i}.weight": 0.2 for i in range(len(model.hidden))}
    if isinstance(model, Conv2):
        rates.update({f"conv.{i}.weight": 0.1 for i in range(len(model.conv))})
    rates[model.output_layer_name] = 0.1
    return rates


__all__ = ["Conv2", "LeNet300100", "paper_layer_rates"]
