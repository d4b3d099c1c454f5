"""InputSample: the per-unit output error on rows or on XᵀX equals the token computation, memory
is min(n, in)·in floats, and units fed the same tensor share one sample (hooks on a real block)."""

from __future__ import annotations

import pytest
import torch

from pruning_core.arch import decoder_blocks, prunable_units
from pruning_core.calibration.inputs import InputSample, attach_sample_hooks
from pruning_core.errors import NumericalInstability, ShapeMismatch
from pruning_core.metrics import reconstruction_error
from tests.tiny_models import MOE, VOCAB, make_tiny


def _expected(tokens: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    x = tokens.double()
    return ((x @ (w - w_hat).double().T).norm() / (x @ w.double().T).norm()).item()


@pytest.mark.parametrize("batches", [[5, 7], [10, 30], [3, 20, 40]])  # n <= in, crossing in, well past it
def test_relative_error_equals_the_token_computation_as_rows_or_gram(batches):
    g = torch.Generator().manual_seed(sum(batches))
    w = torch.randn(2500, 24, generator=g)  # more output rows than one measuring chunk
    w_hat = w * (torch.rand(w.shape, generator=g) > 0.5)
    sample, seen = InputSample(24), []
    for n in batches:
        x = torch.randn(1, n, 24, generator=g)
        sample.update(x)
        seen.append(x.reshape(-1, 24))
    tokens = torch.cat(seen)
    assert sample.count == tokens.shape[0]
    assert sample.relative_error(w, w_hat) == pytest.approx(_expected(tokens, w, w_hat), rel=1e-5)
    assert sample.nbytes == 4 * min(tokens.shape[0], 24) * 24  # rows while n <= in, then the Gram matrix
    assert sample.relative_error(w, w) == 0.0
    assert sample.relative_error(w, torch.zeros_like(w)) == pytest.approx(1.0)


def test_edge_cases_and_errors():
    sample = InputSample(4, name="mlp.up")
    assert sample.relative_error(torch.ones(2, 4), torch.zeros(2, 4)) is None  # no tokens yet
    sample.update(torch.zeros(3, 4))
    assert sample.relative_error(torch.ones(2, 4), torch.zeros(2, 4)) == 0.0  # both norms 0
    with pytest.raises(ShapeMismatch, match="mlp.up"):
        sample.update(torch.zeros(3, 5))
    with pytest.raises(ShapeMismatch):
        sample.relative_error(torch.ones(2, 4), torch.ones(3, 4))
    with pytest.raises(NumericalInstability):
        sample.relative_error(torch.ones(2, 4), torch.full((2, 4), float("nan")))


def test_rows_are_copied_not_aliased():
    x = torch.randn(3, 4)
    sample = InputSample(4)
    sample.update(x)
    w = torch.randn(2, 4)
    before = sample.squared_output_norm(w)
    x.zero_()  # a later in-place change of the activation must not change the sample
    assert sample.squared_output_norm(w) == before


def _block_inputs(model, block_index: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear input of one block, recorded by a plain hook (the reference)."""
    block = decoder_blocks(model)[1][block_index]
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda _m, a, _o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_hooks_on_a_llama_block_share_one_sample_per_input_tensor():
    model = make_tiny("llama")
    block = decoder_blocks(model)[1][1]
    units = prunable_units(block)
    handles, collector = attach_sample_hooks(block, units, prefix="model.layers.1.")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in range(2):
            model(ids[b : b + 1], use_cache=False)
            collector.clear()
    for h in handles:
        h.remove()
    samples = collector.by_unit
    q, k, v = (samples[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v  # one sample for the one tensor they all read
    assert samples["model.layers.1.mlp.gate_proj"] is samples["model.layers.1.mlp.up_proj"]
    assert len({id(s) for s in samples.values()}) == 4  # attention in, o_proj in, MLP in, down_proj in
    reference = _block_inputs(model, 1, ids[:1])
    reference = {n: torch.cat([reference[n], _block_inputs(model, 1, ids[1:])[n]]) for n in reference}
    for unit in units:
        w = unit.read(block)
        w_hat = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
        got = samples["model.layers.1." + unit.name].relative_error(w, w_hat)
        assert got == pytest.approx(_expected(reference[unit.module], w, w_hat), rel=1e-5), unit.name


@pytest.mark.parametrize("arch", MOE)
def test_moe_experts_sample_their_routed_tokens(arch):
    from pruning_core.calibration import collect_activation_stats

    model = make_tiny(arch)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    block = decoder_blocks(model)[1][0]
    units = [u for u in prunable_units(block) if u.expert is not None]
    handles, collector = attach_sample_hooks(block, units)
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    stats = collect_activation_stats(model, [ids], hessian=True, progress=False,
                                     layers=[u.name for u in prunable_units(model) if u.expert is not None
                                             and u.name.startswith("model.layers.0.")])
    for unit in units:
        sample, exact = collector.by_unit[unit.name], stats.require_stats("model.layers.0." + unit.name)
        assert sample.count == exact.count
        if exact.count:
            w = unit.read(block)
            w_hat = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5)
            assert sample.relative_error(w, w_hat) == pytest.approx(reconstruction_error(w, w_hat, exact), rel=1e-4)
