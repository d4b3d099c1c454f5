"""Shared fixtures: a seeded generator, a tiny random Llama, hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def make_tiny_llama(**overrides):
    """A random LlamaForCausalLM small enough for unit tests (2 layers, hidden 64, GQA 4 heads / 2 KV)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    params.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**params))
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
