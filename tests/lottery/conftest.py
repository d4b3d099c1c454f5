"""Fixtures for the Lottery Ticket tests: a tiny MLP and a small synthetic classification task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_core.lottery import ClassifierTrainFn, TrainingConfig


class TinyMLP(nn.Module):
    """16 -> 32 -> 16 -> 4, ReLU; small enough for many rounds in a unit test."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)
        self.init_weights_(torch.Generator().manual_seed(seed))

    def init_weights_(self, generator: torch.Generator) -> None:
        for m in (self.fc1, self.fc2, self.out):
            nn.init.xavier_normal_(m.weight, generator=generator)
            nn.init.normal_(m.bias, std=0.01, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    """512 points in 16-D labelled by a fixed random linear map (4 classes)."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(512, 16, generator=gen)
    w = torch.randn(16, 4, generator=gen)
    return x, (x @ w).argmax(dim=1)


@pytest.fixture
def tiny_train_fn(tiny_data) -> ClassifierTrainFn:
    x, y = tiny_data
    return ClassifierTrainFn(x, y, TrainingConfig(lr=1e-2, batch_size=32), test=(x[:256], y[:256]))


@pytest.fixture
def make_mlp() -> type[TinyMLP]:
    """``make_mlp(seed)`` builds a :class:`TinyMLP` with a reproducible initialisation."""
    return TinyMLP


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP
    threads per process can slow every step by 10x; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
