"""Fixtures for graph tests: the tiny random Llama and its traced dependency graph."""

from __future__ import annotations

import pytest
import torch

from pruning_core.graph import build_dependency_graph
from tests.conftest import make_tiny_llama


def trace_llama(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    return build_dependency_graph(model, kwargs={"input_ids": ids, "use_cache": False})


@pytest.fixture(scope="module")
def llama_and_graph():
    model = make_tiny_llama()
    return model, trace_llama(model)
