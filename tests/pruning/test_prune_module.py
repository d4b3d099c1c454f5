"""prune_module / prune_sequential on a tiny random Llama: targets, scopes, monotonicity, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pruning_core.calibration import (
    calibrate_block,
    capture_block_inputs,
    collect_activation_stats,
    run_block,
)
from pruning_core.errors import CalibrationRequired, ConfigError, InvalidMask, InvalidPattern, NoParameters
from pruning_core.masks import NM, MaskScope, Row, SparsitySpec, Unstructured
from pruning_core.methods import Magnitude, SparseGPT, Wanda
from pruning_core.pruning import output_head_names, prune_module, prune_sequential, target_layers
from tests.conftest import make_tiny_llama


def spec(sparsity=None, pattern="unstructured", scope=None, method=None):
    return SparsitySpec.parse(sparsity, pattern, scope,
                              default_scope=method.default_scope if method else MaskScope.LAYER)


HALF = SparsitySpec(0.5)


def _ids(n=4, t=64, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def test_default_targets_exclude_the_tied_head(tiny_llama):
    assert output_head_names(tiny_llama) == {"lm_head"}
    layers = target_layers(tiny_llama)
    assert len(layers) == 14 and "lm_head" not in layers
    untied = make_tiny_llama(tie_word_embeddings=False)
    assert "lm_head" in output_head_names(untied) and "lm_head" not in target_layers(untied)
    mlp_only = target_layers(tiny_llama, lambda n, m: n.endswith("mlp.down_proj"))
    assert list(mlp_only) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(NoParameters):
        target_layers(tiny_llama, lambda n, m: False)


def test_magnitude_whole_model(tiny_llama):
    head = tiny_llama.lm_head.weight.detach().clone()
    result = prune_module(tiny_llama, Magnitude(), HALF)
    assert result.achieved_sparsity == 0.5 and len(result.layer_sparsity) == 14
    assert all(s == 0.5 for s in result.layer_sparsity.values())
    assert torch.equal(tiny_llama.lm_head.weight, head)  # tied embedding untouched
    for name, mask in result.masks.items():
        w = tiny_llama.get_submodule(name).weight
        assert bool((w[~mask.tensor] == 0).all()) and int((w == 0).sum()) == mask.num_zeros
    assert result.layer_error == {}  # no context, no error
    assert result.memory_savings_bytes != 0


def test_wanda_whole_model_rows_and_errors(tiny_llama):
    ctx = collect_activation_stats(tiny_llama, [_ids()], hessian=True, progress=False)
    result = prune_module(tiny_llama, Wanda(), spec(0.5, method=Wanda()), ctx)
    for name, mask in result.masks.items():
        assert bool((mask.tensor.sum(dim=1) == mask.shape[1] // 2).all()), name  # per row (paper)
    assert set(result.layer_error) == set(result.masks)
    assert all(0 < e < 1 for e in result.layer_error.values())


def test_global_scope_one_threshold(tiny_llama):
    ctx = collect_activation_stats(tiny_llama, [_ids()], progress=False)
    layers = target_layers(tiny_llama)
    scores = {n: Wanda().score(m.weight, ctx.require_stats(n), name=n) for n, m in layers.items()}
    result = prune_module(tiny_llama, Wanda(), SparsitySpec(0.5, scope=MaskScope.GLOBAL), ctx)
    assert result.parameters_pruned == result.total_parameters // 2
    assert len(set(result.layer_sparsity.values())) > 1  # layers end up with different sparsities
    pruned_max = max(float(scores[n][~m.tensor].max()) for n, m in result.masks.items() if m.num_zeros)
    kept_min = min(float(scores[n][m.tensor].min()) for n, m in result.masks.items() if m.nnz)
    assert pruned_max <= kept_min  # one threshold across all layers


def test_sparsegpt_whole_model_beats_wanda_on_reconstruction():
    ids = _ids(8, 64)
    results = {}
    for method in (Wanda(), SparseGPT()):
        model = make_tiny_llama()
        ctx = collect_activation_stats(model, [ids], hessian=True, progress=False)
        results[method.name] = prune_module(model, method, SparsitySpec(0.5, NM(2, 4)), ctx)
    sgpt, wanda = results["sparsegpt"], results["wanda"]
    assert sgpt.achieved_sparsity == wanda.achieved_sparsity == 0.5
    better = sum(sgpt.layer_error[n] < wanda.layer_error[n] for n in sgpt.layer_error)
    assert better == len(sgpt.layer_error)


@settings(max_examples=8, deadline=None)
@given(s1=st.floats(0.05, 0.6), s2=st.floats(0.05, 0.9))
def test_iterative_pruning_is_monotone(s1, s2):
    model = make_tiny_llama(num_hidden_layers=1)
    first = prune_module(model, Magnitude(), SparsitySpec(s1), measure_memory=False)
    second = prune_module(model, Magnitude(), SparsitySpec(s2), measure_memory=False)
    for name, mask in second.masks.items():
        assert mask.is_subset_of(first.masks[name])
    assert second.achieved_sparsity >= max(s1, s2) - 1e-3


def test_earlier_masks_are_respected(tiny_llama):
    first = prune_module(tiny_llama, Magnitude(), SparsitySpec(0.3), measure_memory=False)
    fresh = make_tiny_llama()  # dense weights, but the earlier masks passed explicitly
    second = prune_module(fresh, Magnitude(), SparsitySpec(0.2), masks=first.masks, measure_memory=False)
    assert all(second.masks[n].is_subset_of(first.masks[n]) for n in first.masks)
    assert second.achieved_sparsity == first.achieved_sparsity  # 0.2 < 0.3: nothing more to prune


def test_postcondition_catches_a_short_pruner(tiny_llama):
    class Lazy(Magnitude):
        def prune_weight(self, weight, stats, spec, **kw):
            return super().prune_weight(weight, stats, spec.with_sparsity(spec.sparsity / 2), **kw)

    with pytest.raises(InvalidMask, match="postcondition"):
        prune_module(tiny_llama, Lazy(), HALF, measure_memory=False)


def test_errors(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    with pytest.raises(CalibrationRequired):
        prune_module(tiny_llama, Wanda(), HALF)
    with pytest.raises(ConfigError):
        prune_module(tiny_llama, SparseGPT(), SparsitySpec(0.5, scope=MaskScope.GLOBAL))
    with pytest.raises(ConfigError):
        spec(0.5, NM(2, 4), MaskScope.GLOBAL)
    with pytest.raises(InvalidPattern):
        prune_module(nn.Sequential(nn.Linear(6, 4)), Magnitude(), SparsitySpec(0.5, NM(2, 4)))
    with pytest.raises(ConfigError):
        prune_sequential(tiny_llama, [_ids()], Magnitude(), SparsitySpec(0.5, scope=MaskScope.GLOBAL), progress=False)
    # every error above came before any work: no weight changed
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())


def test_row_pattern_whole_model(tiny_llama):
    result = prune_module(tiny_llama, Magnitude(), SparsitySpec(0.25, Row()), measure_memory=False)
    assert result.achieved_sparsity == 0.25
    for mask in result.masks.values():
        assert mask.pattern == Row()


# ---------------------------------------------------------------- sequential
def test_prune_sequential_matches_the_manual_block_loop():
    ids = _ids(4, 64, seed=5)
    auto = make_tiny_llama()
    result = prune_sequential(auto, [ids], Wanda(), spec(0.5, method=Wanda()), progress=False)
    manual = make_tiny_llama()
    inputs = capture_block_inputs(manual, [ids], progress=False)
    for i, block in enumerate(manual.model.layers):
        ctx = calibrate_block(block, inputs, prefix=f"model.layers.{i}.")
        prune_module(block, Wanda(), spec(0.5, method=Wanda()), ctx, prefix=f"model.layers.{i}.")
        inputs = run_block(block, inputs)
    for name in result.masks:
        assert torch.equal(auto.get_submodule(name).weight, manual.get_submodule(name).weight), name
    assert result.achieved_sparsity == 0.5 and len(result.masks) == 14


def test_sequential_differs_from_one_pass_after_block_0():
    ids = _ids(4, 64, seed=6)
    seq = make_tiny_llama()
    seq_result = prune_sequential(seq, [ids], SparseGPT(), SparsitySpec(0.5, Unstructured()), progress=False)
    one = make_tiny_llama()
    ctx = collect_activation_stats(one, [ids], hessian=True, progress=False)
    one_result = prune_module(one, SparseGPT(), HALF, ctx)
    b0 = "model.layers.0.self_attn.q_proj"
    b1 = "model.layers.1.self_attn.q_proj"
    assert torch.equal(seq_result.masks[b0].tensor, one_result.masks[b0].tensor)  # same inputs for block 0
    assert not torch.equal(seq.get_submodule(b1).weight, one.get_submodule(b1).weight)  # pruned inputs later


def test_text_forms_of_pattern_and_scope(tiny_llama):
    result = prune_module(tiny_llama, Magnitude(), spec(None, "2:4"), measure_memory=False)
    assert all(m.pattern == NM(2, 4) for m in result.masks.values())
    with pytest.raises(ConfigError, match="scope"):
        spec(0.5, scope="everywhere")
    assert prune_module(make_tiny_llama(), Magnitude(), spec(0.5, scope="global"),
                        measure_memory=False).parameters_pruned == 36864


def test_stats_may_be_a_plain_mapping(tiny_llama):
    """``stats`` keyed by layer name (e.g. loaded per layer from disk) works like a context."""
    ctx = collect_activation_stats(tiny_llama, [_ids()], progress=False)
    other = make_tiny_llama()
    a = prune_module(tiny_llama, Wanda(), spec(0.5, method=Wanda()), ctx, measure_memory=False)
    b = prune_module(other, Wanda(), spec(0.5, method=Wanda()), dict(ctx), measure_memory=False)
    assert all(torch.equal(a.masks[n].tensor, b.masks[n].tensor) for n in a.masks)


def test_pre_contract_call_form_still_works(tiny_llama):
    """The seed's call form, in pruning_core.compat: ``prune_module(model, pruner, sparsity, pattern, context, scope=)``."""
    from pruning_core.compat import MagnitudePruner, WandaPruner
    from pruning_core.compat import prune_module as seed_prune_module
    from pruning_core.compat import prune_sequential as seed_prune_sequential

    ctx = collect_activation_stats(tiny_llama, [_ids()], progress=False)
    old = seed_prune_module(tiny_llama, WandaPruner(), 0.5, None, ctx, measure_memory=False)
    new = prune_module(make_tiny_llama(), Wanda(), spec(0.5, method=Wanda()), ctx, measure_memory=False)
    assert all(torch.equal(old.masks[n].tensor, new.masks[n].tensor) for n in old.masks)
    nm = seed_prune_module(make_tiny_llama(), MagnitudePruner(), None, "2:4", scope=None, measure_memory=False)
    assert all(m.pattern == NM(2, 4) for m in nm.masks.values())
    seq = seed_prune_sequential(make_tiny_llama(), [_ids()], MagnitudePruner(), 0.5, progress=False)
    assert seq.achieved_sparsity == 0.5
