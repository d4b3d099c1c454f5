"""Per-unit statistics: Linear-only models unchanged bit for bit, GPT-2 Conv1D on the math input
dimension, and MoE experts on exactly the tokens the model's own router sends them."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pruning_core.arch import decoder_blocks, prunable_units
from pruning_core.calibration import (
    calibrate_block,
    capture_block_inputs,
    collect_activation_stats,
    expert_token_table,
    select_units,
)
from pruning_core.calibration.stats import batch_partials
from pruning_core.errors import CalibrationRequired, ConfigError
from pruning_core.methods.base import require_stats
from tests.tiny_models import MOE, VOCAB, make_tiny

DTYPES = [torch.float32, torch.bfloat16]


def _ids(batch=2, length=24, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference_linear_stats(model, batches, names):
    """The pre-units algorithm: float32 partial sums of each raw Linear input, added in float64."""
    sums = {n: [0, 0, 0, 0] for n in names}

    def hook(name):
        def record(_m, args, _out):
            tokens = args[0].reshape(-1, args[0].shape[-1])
            sq, ab, n, xtx = batch_partials(tokens, hessian=True, batch_dtype=torch.float32)
            acc = sums[name]
            acc[0] = acc[0] + sq.double()
            acc[1] = acc[1] + ab.double()
            acc[2] += n
            acc[3] = acc[3] + xtx.double()
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            model(b, use_cache=False)
    for h in handles:
        h.remove()
    return sums


def test_linear_only_model_statistics_are_unchanged_bit_for_bit(tiny_llama):
    batches = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    ctx = collect_activation_stats(tiny_llama, batches, hessian=True, progress=False)
    names = [n for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)]
    assert ctx.layer_names() == names  # every nn.Linear, the head included, in module order
    ref = _reference_linear_stats(tiny_llama, batches, names)
    for name in names:
        s = ctx.require_stats(name)
        assert torch.equal(s.sum_sq, ref[name][0]) and torch.equal(s.sum_abs, ref[name][1])
        assert s.count == ref[name][2] and torch.equal(s.xtx, ref[name][3])


def test_gpt2_conv1d_statistics_are_over_the_math_input():
    model = make_tiny("gpt2")
    ids = _ids()
    seen = {}

    def record(_m, args, _out):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1]).double()

    handle = model.transformer.h[1].mlp.c_proj.register_forward_hook(record)
    ctx = collect_activation_stats(model, [ids], hessian=True, progress=False)
    handle.remove()
    stats = ctx.require_stats("transformer.h.1.mlp.c_proj")  # Conv1D(nf=64, nx=128): weight [128, 64]
    x = seen["x"]
    assert stats.in_features == 128 == x.shape[1] and stats.count == 48
    torch.testing.assert_close(stats.sum_sq, (x ** 2).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.xtx, x.T @ x, rtol=1e-5, atol=1e-5)


def _routed_by_hand(model, ids, layer):
    """Route ``layer``'s MoE input with the model's own router; per-expert inputs computed by hand."""
    mlp = model.model.layers[layer].mlp
    captured = {}

    def record(_m, args):
        captured["h"] = args[0].detach()

    handle = mlp.register_forward_pre_hook(record)
    with torch.no_grad():
        model(ids, use_cache=False)
        handle.remove()
        h = captured["h"].reshape(-1, captured["h"].shape[-1])  # (tokens, hidden)
        _, _, top_k = mlp.gate(h)  # (tokens, k)
        experts, out = mlp.experts, {}
        for e in range(experts.num_experts):
            x = h[(top_k == e).any(-1)]
            gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            out[e] = (x, F.silu(gate) * up)  # both families use SiLU experts
    return out, top_k


def _sums(x):
    x = x.double()
    return (x ** 2).sum(0), x.T @ x


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", MOE)
def test_expert_statistics_equal_a_direct_computation_on_the_routed_tokens(family, dtype):
    model = make_tiny(family, dtype=dtype)
    ids = _ids()
    ctx = collect_activation_stats(model, [ids], hessian=True, progress=False)
    for layer in range(2):
        routed, top_k = _routed_by_hand(model, ids, layer)
        counts = []
        for e, (x, gated) in routed.items():
            base = f"model.layers.{layer}.mlp.experts"
            for name, inputs in ((f"{base}.gate_up_proj.{e}", x), (f"{base}.down_proj.{e}", gated)):
                stats = ctx.require_stats(name)
                sum_sq, xtx = _sums(inputs)
                assert stats.count == inputs.shape[0] > 0
                torch.testing.assert_close(stats.sum_sq, sum_sq, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(stats.xtx, xtx, rtol=1e-5, atol=1e-5)
            counts.append(x.shape[0])
        assert sum(counts) == top_k.numel() == 2 * ids.numel()  # every token goes to 2 experts
        assert expert_token_table(ctx, prunable_units(model))[f"model.layers.{layer}.mlp.experts"] == counts


@pytest.mark.parametrize("family", MOE)
def test_sequential_expert_statistics_equal_one_pass_on_the_dense_model(family):
    model = make_tiny(family)
    batches = [_ids(seed=1), _ids(batch=1, seed=2)]
    full = collect_activation_stats(model, batches, hessian=True, progress=False)
    inputs = capture_block_inputs(model, batches, progress=False)
    path, blocks = decoder_blocks(model)
    ctx = calibrate_block(blocks[0], inputs, hessian=True, prefix=f"{path}.0.")
    assert [n for n in ctx.layer_names() if ".experts." in n] == \
        [u.name for u in prunable_units(model) if u.name.startswith(f"{path}.0.") and u.expert is not None]
    for name, stats in ctx:
        assert stats.count == full.require_stats(name).count
        torch.testing.assert_close(stats.xtx, full.require_stats(name).xtx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", MOE)
def test_an_expert_without_tokens_is_reported_never_silently_skipped(family, caplog):
    model = make_tiny(family)
    one_token = torch.tensor([[7]])  # top-2 of 4 experts: two experts per layer get no token
    with caplog.at_level(logging.WARNING, logger="pruning_core.calibration.hooks"):
        ctx = collect_activation_stats(model, [one_token], progress=False)
    empty = ctx.empty_layers()
    assert len(empty) == 2 * 2 * 2  # 2 layers x 2 experts x (gate_up_proj, down_proj)
    assert all(".experts." in n and ctx.require_stats(n).count == 0 for n in empty)
    for name in empty:
        assert name in caplog.text
    assert "pruned by weight magnitude" in caplog.text
    table = expert_token_table(ctx, prunable_units(model))
    assert all(sorted(c) == [0, 0, 1, 1] for c in table.values())
    with pytest.raises(CalibrationRequired):  # a statistics-based method refuses zero-token statistics
        require_stats("wanda", ctx.require_stats(empty[0]), empty[0])


def test_unit_selection_by_name_filter_and_errors():
    model = make_tiny("mixtral")
    names = ["model.layers.0.mlp.experts.down_proj.2", "model.layers.1.self_attn.q_proj"]
    ctx = collect_activation_stats(model, [_ids()], layers=names, progress=False)
    assert ctx.layer_names() == names
    only_experts = select_units(model, lambda n, m: ".experts." in n)
    assert len(only_experts) == 16 and {type(model.get_submodule(u.module)).__name__ for u in only_experts} == \
        {"MixtralExperts"}
    with pytest.raises(ConfigError, match="model.layers.0.mlp.experts.down_proj.9"):
        select_units(model, ["model.layers.0.mlp.experts.down_proj.9"])
