"""collect_activation_stats / collect_gradients on real torch models (tiny MLP and tiny Llama)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_core.calibration import collect_activation_stats, collect_gradients, select_linear_layers
from pruning_core.errors import ConfigError, NumericalInstability


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _record_inputs(model: nn.Module, batches, names):
    """Reference: keep every raw input of the named Linear layers."""
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, a, _o, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_mlp_stats_equal_direct_computation():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 16, generator=g), torch.randn(3, 5, 16, generator=g)]
    ctx = collect_activation_stats(model, batches, hessian=True, dataset="rand", progress=False)
    assert ctx.layer_names() == ["0", "2"] and ctx.dataset == "rand"
    assert ctx.num_samples == 4 + 3
    raw = _record_inputs(model, batches, ["0", "2"])
    for name, x in raw.items():
        s = ctx.require_stats(name)
        assert s.count == x.shape[0] == 4 + 15
        torch.testing.assert_close(s.sum_sq, (x ** 2).sum(0), rtol=1e-6, atol=1e-6)  # float32 partials
        torch.testing.assert_close(s.sum_abs, x.abs().sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.xtx, x.T @ x, rtol=1e-5, atol=1e-4)


def test_outputs_unchanged_and_hooks_removed(tiny_llama):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_llama(ids).logits
    hooks_before = sum(len(m._forward_hooks) for m in tiny_llama.modules())
    outputs = []
    tiny_llama.register_forward_hook(lambda _m, _a, out: outputs.append(out.logits.clone()))
    collect_activation_stats(tiny_llama, [ids], hessian=True, progress=False)
    assert torch.equal(outputs[0], before)  # the hooked forward produced the same logits
    assert sum(len(m._forward_hooks) for m in tiny_llama.modules()) == hooks_before + 1
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, before)


def test_hooks_removed_and_mode_restored_on_error(tiny_llama):
    tiny_llama.train()
    good = torch.randint(0, 128, (1, 8))
    bad = torch.full((1, 8), 10_000)  # out-of-range token id: the embedding raises
    with pytest.raises(IndexError):
        collect_activation_stats(tiny_llama, [good, bad], progress=False)
    assert all(not m._forward_hooks for m in tiny_llama.modules())
    assert tiny_llama.training


def test_shared_inputs_give_identical_stats(tiny_llama):
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(3))
    ctx = collect_activation_stats(tiny_llama, [ids, ids[:1]], hessian=True, progress=False)
    q, k, v = (ctx.require_stats(f"model.layers.1.self_attn.{p}_proj") for p in "qkv")
    assert q is not k  # each layer owns its accumulator
    assert torch.equal(q.sum_sq, k.sum_sq) and torch.equal(q.xtx, v.xtx) and q.count == v.count == 40
    # ... and they equal what a layer gets when it is hooked alone (no sharing possible).
    alone = collect_activation_stats(tiny_llama, [ids, ids[:1]], hessian=True, progress=False,
                                     layers=["model.layers.1.self_attn.k_proj"])
    assert torch.equal(alone.require_stats("model.layers.1.self_attn.k_proj").sum_sq, k.sum_sq)
    # o_proj has the same width but a different input: not confused with q/k/v.
    o = ctx.require_stats("model.layers.1.self_attn.o_proj")
    assert not torch.equal(o.sum_sq, q.sum_sq)


def test_in_place_change_between_hooks_is_not_reused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            x.mul_(2.0)  # same tensor object, new contents
            return y + self.b(x)

    model = Twice()
    x = torch.ones(2, 4)
    ctx = collect_activation_stats(model, [x], progress=False)
    assert ctx.require_stats("a").sum_sq.tolist() == [2.0] * 4
    assert ctx.require_stats("b").sum_sq.tolist() == [8.0] * 4


def test_layer_selection(tiny_llama):
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    ctx = collect_activation_stats(tiny_llama, [torch.randint(0, 128, (1, 4))], layers=names, progress=False)
    assert ctx.layer_names() == names
    only_mlp = select_linear_layers(tiny_llama, lambda n, m: ".mlp." in n)
    assert len(only_mlp) == 6 and all(".mlp." in n for n in only_mlp)
    assert "lm_head" in select_linear_layers(tiny_llama)
    with pytest.raises(ConfigError, match="model.nope"):
        select_linear_layers(tiny_llama, ["model.nope"])
    with pytest.raises(ConfigError):
        select_linear_layers(tiny_llama, lambda n, m: False)


def test_dict_batches_and_sample_count(tiny_llama):
    ids = torch.randint(0, 128, (2, 6))
    ctx = collect_activation_stats(tiny_llama, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                                   progress=False)
    assert ctx.num_samples == 2
    assert ctx.require_stats("lm_head").count == 12


def test_nan_activation_is_reported_with_layer():
    model = tiny_mlp()
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    with pytest.raises(NumericalInstability) as info:
        collect_activation_stats(model, [x], progress=False)
    assert info.value.layer == "0" and info.value.index == (1, 3)
    assert all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------- gradients
def test_gradients_equal_autograd_of_each_batch():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(5, 16, generator=g) for _ in range(3)]

    def loss_fn(m, b):
        return m(b).square().mean()

    ctx = collect_gradients(model, batches, loss_fn, progress=False)
    expected_sum = torch.zeros_like(model[2].weight)
    expected_abs = torch.zeros_like(model[2].weight)
    for b in batches:
        model.zero_grad()
        loss_fn(model, b).backward()
        expected_sum += model[2].weight.grad
        expected_abs += model[2].weight.grad.abs()
    gs = ctx.gradient_stats["2"]
    assert gs.num_batches == 3 and ctx.num_samples == 15
    torch.testing.assert_close(gs.grad_sum, expected_sum)
    torch.testing.assert_close(gs.abs_grad_sum, expected_abs)
    torch.testing.assert_close(gs.mean_gradient, expected_sum / 3)


def test_gradients_leave_model_state_alone(tiny_llama):
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    tiny_llama.train()
    ctx = collect_gradients(tiny_llama, [torch.randint(0, 128, (2, 8))], progress=False,
                            layers=lambda n, m: n.startswith("model.layers.0."))
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert tiny_llama.training
    assert len(ctx.gradient_stats) == 7
    assert float(ctx.gradient_stats["model.layers.0.mlp.down_proj"].abs_grad_sum.sum()) > 0


def test_non_finite_loss_raises():
    model = tiny_mlp()
    with pytest.raises(NumericalInstability, match="loss"):
        collect_gradients(model, [torch.randn(2, 16)], lambda m, b: m(b).sum() * float("inf"), progress=False)
