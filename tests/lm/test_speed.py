"""Measured prefill/decode speed: rates from medians, alternating comparison, CSR Linear exactness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_core.errors import ConfigError
from pruning_core.lm.speed import (
    SparseLinear,
    compare_speed,
    measure_speed,
    sparsify_linears,
    speed_ratio,
    time_once,
)
from tests.conftest import make_tiny_llama


def test_rates_are_tokens_over_median_seconds():
    model = make_tiny_llama()
    rates = measure_speed(model, prompt_tokens=8, decode_tokens=4, repeats=3, warmup=1, batch_size=2)
    assert rates["repeats"] == 3 and rates["device"] == "cpu"
    assert rates["prefill_tokens_per_s"] == pytest.approx(16 / rates["prefill_seconds"])
    assert rates["decode_tokens_per_s"] == pytest.approx(8 / rates["decode_seconds"])


def test_decode_with_cache_is_greedy_generation():
    # time_once's decode loop produces the tokens that greedy generation without a cache produces
    model = make_tiny_llama()
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    tokens, seen = prompt, []
    real_forward = model.forward

    def spy(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        seen.append(out.logits[:, -1:].argmax(-1))
        return out

    model.forward = spy
    time_once(model, prompt, 3)
    model.forward = real_forward
    with torch.no_grad():
        for _ in range(4):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(torch.cat(seen, dim=1), tokens[:, 6:])


def test_fewer_layers_decode_faster():
    shallow, deep = make_tiny_llama(num_hidden_layers=1), make_tiny_llama(num_hidden_layers=8)
    result = compare_speed({"deep": deep, "shallow": shallow}, prompt_tokens=16, decode_tokens=8, repeats=5)
    ratio = speed_ratio(result["deep"], result["shallow"])
    assert ratio["decode_ratio"] > 1.5 and ratio["prefill_ratio"] > 1.5


def test_sparse_linear_matches_dense():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) > 0.9)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(SparseLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-6)
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        dense = model(tokens).logits
        sparsify_linears(model, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"])
        torch.testing.assert_close(model(tokens).logits, dense, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        sparsify_linears(model, ["model.norm"])


def test_bad_counts():
    model = make_tiny_llama()
    with pytest.raises(ConfigError, match="repeats"):
        measure_speed(model, repeats=0)
    with pytest.raises(ConfigError, match="models"):
        compare_speed({})
