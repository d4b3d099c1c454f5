"""Fixtures for Minitron tests: a 4-layer tiny random Llama, its graph and structure, token batches."""

from __future__ import annotations

import pytest
import torch

from pruning_core.minitron import trace_decoder
from tests.conftest import make_tiny_llama


def tiny(**overrides):
    return make_tiny_llama(**{"num_hidden_layers": 4, **overrides})


def trace(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    return trace_decoder(model, ids)[0]


def token_batches(n: int = 3, batch: int = 2, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (batch, length), generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def llama4():
    """(model, graph, structure) of a 4-layer tiny Llama (GQA: 4 heads, 2 KV heads, head_dim 16)."""
    model = tiny()
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    graph, structure = trace_decoder(model, ids)
    return model, graph, structure


@pytest.fixture
def batches() -> list[torch.Tensor]:
    return token_batches()
