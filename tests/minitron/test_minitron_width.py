"""Width pruning: the seed's pinned WidthPruner cases, Minitron activation importance,
GQA-consistent head selection, and physical slicing of a tiny Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from pruning_core.compat import WidthPruner, WidthPruningResult
from pruning_core.errors import ConfigError, InvalidPattern, InvalidSparsity, ShapeMismatch
from pruning_core.graph import apply_plan_
from pruning_core.minitron import (
    Architecture,
    WidthImportanceConfig,
    collect_width_scores,
    select_heads,
    width_plan,
)
from pruning_core.minitron.width_scores import _Aggregate

T = torch.tensor


# ----------------------------------------------------------------------------- seed pinned cases
def test_validate_seed_cases():
    WidthPruner(512, 2048, 8).validate(1024, 4096)
    with pytest.raises(InvalidPattern, match="divisible"):
        WidthPruner(500, 2048, 8).validate(1024, 4096)
    with pytest.raises(InvalidSparsity):
        WidthPruner(2048, 2048, 8).validate(1024, 4096)
    with pytest.raises(InvalidSparsity):
        WidthPruner(512, 8192, 8).validate(1024, 4096)


def test_zero_heads_is_a_config_error():
    """The seed divided by zero (panic); here construction fails with the field named."""
    with pytest.raises(ConfigError, match="num_attention_heads"):
        WidthPruner(512, 2048, 0)


def test_channel_importance_seed_cases():
    imp = WidthPruner.compute_channel_importance(T([[1.0, 2.0, 3.0, 4.0]] * 2), T([[1.0, 3.0], [3.0, 1.0]]))
    assert imp.hidden.tolist() == [1, 4, 9, 16] and imp.intermediate.tolist() == [5, 5] and imp.num_samples == 2
    with pytest.raises(ShapeMismatch):
        WidthPruner.compute_channel_importance(T([1.0, 2.0]), T([[1.0]]))
    with pytest.raises(ShapeMismatch):
        WidthPruner.compute_channel_importance(T([[1.0], [2.0]]), T([[1.0]]))


def test_top_k_seed_cases():
    imp = WidthPruner.compute_channel_importance(T([[3.0, 1.0, 4.0, 1.0, 5.0]]), T([[10.0, 20.0, 5.0, 15.0]]))
    assert imp.top_hidden_channels(3) == [0, 2, 4]
    assert imp.top_intermediate_channels(2) == [1, 3]
    assert imp.top_hidden_channels(10) == [0, 1, 2, 3, 4]
    ties = WidthPruner.compute_channel_importance(T([[1.0, 2.0, 2.0, 1.0]]), T([[1.0]]))
    assert ties.top_hidden_channels(2) == [1, 2]


def test_select_channels_seed_cases():
    imp = WidthPruner.compute_channel_importance(T([[1.0, 5.0, 3.0, 4.0]]).sqrt(), T([[10.0, 5.0, 15.0]]).sqrt())
    assert WidthPruner(2, 2, 1).select_channels_to_keep(imp) == ([1, 3], [0, 2])
    with pytest.raises(InvalidSparsity):
        WidthPruner(100, 100, 4).select_channels_to_keep(imp)


def test_masks_head_dim_and_results():
    assert WidthPruner.generate_hidden_mask(5, [0, 2, 4]).tolist() == [True, False, True, False, True]
    with pytest.raises(InvalidSparsity):  # the seed silently ignored index 100
        WidthPruner.generate_hidden_mask(3, [0, 1, 100])
    assert WidthPruner(512, 2048, 8).head_dim_after_pruning() == 64
    result = WidthPruningResult(1024, 512, 4096, 2048)
    assert result.hidden_compression_ratio() == 2 and result.intermediate_compression_ratio() == 2
    assert WidthPruningResult(1000, 750, 10, 10).hidden_removal_percentage() == 25.0
    zeros = WidthPruningResult(0, 0, 0, 0)
    assert zeros.hidden_compression_ratio() == math.inf and zeros.hidden_removal_percentage() == 0.0
    with pytest.raises(InvalidSparsity):  # the seed's percentage underflowed
        WidthPruningResult(10, 20, 10, 10)


# ----------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize(
    ("seq", "batch", "expected"),
    [("mean", "mean", 2.0), ("mean", "l2", math.sqrt(8)), ("mean", "var", 0.0),
     ("l2", "mean", (math.sqrt(10) + math.sqrt(8)) / 2), ("var", "mean", 0.5)],
)
def test_aggregation_golden(seq, batch, expected):
    """Two samples, two tokens, one channel: [[1, 3], [2, 2]] (hand-computed)."""
    agg = _Aggregate(WidthImportanceConfig(seq_agg=seq, batch_agg=batch))
    agg.update(T([[[1.0], [3.0]]]))
    agg.update(T([[[2.0], [2.0]]]))
    assert float(agg.finalize()[0]) == pytest.approx(expected)


def test_unknown_aggregation_is_a_config_error():
    with pytest.raises(ConfigError, match="seq_agg"):
        WidthImportanceConfig(seq_agg="max")


def test_width_scores_do_not_depend_on_batch_split(llama4, batches):
    model, _, structure = llama4
    whole = collect_width_scores(model, [torch.cat(batches)], structure)
    split = collect_width_scores(model, batches, structure)
    for name in ("hidden", "neurons", "heads"):
        torch.testing.assert_close(getattr(whole, name), getattr(split, name))


def test_importance_sees_dead_units(batches):
    """A KV group with zero v rows outputs nothing: its query heads score 0. A neuron with a zero
    up row is inactive: it scores 0. A channel with zero weight in every norm scores 0."""
    from tests.minitron.conftest import tiny, trace

    model = tiny()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[16:32] = 0  # KV head 1 -> query heads 2, 3
            layer.mlp.up_proj.weight[7] = 0
            layer.input_layernorm.weight[5] = 0
            layer.post_attention_layernorm.weight[5] = 0
        model.model.norm.weight[5] = 0
    from pruning_core.minitron import decoder_structure

    scores = collect_width_scores(model, batches, decoder_structure(model, trace(model)))
    assert torch.all(scores.heads[:, 2:] == 0) and torch.all(scores.heads[:, :2] > 0)
    assert torch.all(scores.neurons[:, 7] == 0) and torch.all(scores.neurons[:, :7] > 0)
    assert scores.hidden[5] == 0 and torch.all(scores.hidden[:5] > 0)
    assert select_heads(scores.heads[0], 2, 2, 1) == [0, 1]


# ----------------------------------------------------------------------------- head selection
def test_select_heads_golden():
    """9 heads, 3 KV groups of 3 (SmolLM2's layout).

    Target 4 heads in 2 groups (2 per group): a group scores its best 2 heads: g0 = 3 + 2 = 5,
    g1 = 9 + 9 = 18, g2 = 10 + 0 = 10 -> keep g1, g2; g1 keeps heads 3, 4 (three-way tie: lower
    indices win), g2 keeps 8 and 6 (tie 6/7 -> 6).
    Target 6 heads in 2 groups (SmolLM2 9 -> 6): whole groups; g0 = 6 < g2 = 10 < g1 = 27 -> g0 goes.
    Target 3 heads in 3 groups: the best head of every group.
    """
    scores = T([1.0, 2.0, 3.0, 9.0, 9.0, 9.0, 0.0, 0.0, 10.0])
    assert select_heads(scores, 3, 4, 2) == [3, 4, 6, 8]
    assert select_heads(scores, 3, 6, 2) == [3, 4, 5, 6, 7, 8]
    assert select_heads(scores, 3, 3, 3) == [2, 3, 8]


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 4), per_group=st.integers(1, 4), data=st.data())
def test_select_heads_is_gqa_consistent(groups, per_group, data):
    """Every kept group keeps the same number of query heads, and exactly target_kv groups survive."""
    target_kv = data.draw(st.integers(1, groups))
    target_per_group = data.draw(st.integers(1, per_group))
    seed = data.draw(st.integers(0, 1000))
    scores = torch.rand(groups * per_group, generator=torch.Generator().manual_seed(seed))
    kept = select_heads(scores, groups, target_kv * target_per_group, target_kv)
    by_group: dict[int, int] = {}
    for h in kept:
        by_group[h // per_group] = by_group.get(h // per_group, 0) + 1
    assert len(by_group) == target_kv and set(by_group.values()) == {target_per_group}
    assert kept == sorted(kept)


@pytest.mark.parametrize(
    ("heads", "kv", "match"),
    [(6, 4, "whole number"), (4, 4, "within 3 groups"), (8, 2, "heads per group")],
)
def test_select_heads_rejects_bad_targets(heads, kv, match):
    with pytest.raises(ConfigError, match=match):
        select_heads(torch.rand(9), 3, heads, kv)


# ----------------------------------------------------------------------------- physical slicing
def _arch(**kw) -> Architecture:
    base = dict(num_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    return Architecture(**{**base, **kw})


def test_full_size_width_plan_is_the_identity(llama4, batches):
    model, graph, structure = llama4
    scores = collect_width_scores(model, batches, structure)
    pruned = apply_plan_(copy.deepcopy(model), width_plan(graph, structure, scores, _arch()))
    with torch.no_grad():
        assert torch.equal(pruned(batches[0]).logits, model(batches[0]).logits)


@pytest.mark.parametrize(
    "target",
    [dict(intermediate_size=64), dict(num_attention_heads=2, num_key_value_heads=1),
     dict(num_attention_heads=2, num_key_value_heads=2), dict(hidden_size=48, intermediate_size=96),
     dict(hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)],
)
def test_width_plan_slices_to_the_target(llama4, batches, target, tmp_path):
    model, graph, structure = llama4
    scores = collect_width_scores(model, batches, structure)
    arch = _arch(**target)
    plan = width_plan(graph, structure, scores, arch)
    pruned = apply_plan_(copy.deepcopy(model), plan)
    actual = sum(p.numel() for p in pruned.parameters())
    assert actual == plan.predicted_num_parameters(model)
    assert actual == arch.num_parameters(vocab_size=128, head_dim=16, tied_embeddings=True)
    assert Architecture.from_config(pruned.config) == arch and pruned.config.head_dim == 16
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    pruned.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = batches[0][:1, :4]
    cached = reloaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, reloaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False,
                                                 pad_token_id=0))


def test_width_plan_keeps_the_most_important_heads(llama4, batches):
    """The plan keeps exactly the heads select_heads picks, per layer (q rows sliced accordingly)."""
    model, graph, structure = llama4
    scores = collect_width_scores(model, batches, structure)
    plan = width_plan(graph, structure, scores, _arch(num_attention_heads=2, num_key_value_heads=1))
    edits = {(e.param, e.dim): e.keep for e in plan.axis_edits}
    for i in range(4):
        kept = select_heads(scores.heads[i], 2, 2, 1)
        rows = tuple(h * 16 + j for h in kept for j in range(16))
        assert edits[(f"model.layers.{i}.self_attn.q_proj.weight", 0)] == rows
        assert edits[(f"model.layers.{i}.self_attn.o_proj.weight", 1)] == rows
        group = kept[0] // 2
        assert edits[(f"model.layers.{i}.self_attn.k_proj.weight", 0)] == tuple(range(group * 16, group * 16 + 16))


@pytest.mark.parametrize(
    ("target", "field"),
    [(dict(intermediate_size=256), "intermediate_size"), (dict(hidden_size=128), "hidden_size"),
     (dict(num_attention_heads=8, num_key_value_heads=2), "num_attention_heads")],
)
def test_width_targets_above_the_original_are_refused(llama4, batches, target, field):
    model, graph, structure = llama4
    scores = collect_width_scores(model, batches[:1], structure)
    with pytest.raises(ConfigError, match=field):
        width_plan(graph, structure, scores, _arch(**target))


@pytest.mark.parametrize(
    ("kw", "match"),
    [(dict(num_attention_heads=3, num_key_value_heads=2), "not a multiple of num_key_value_heads"),
     (dict(num_attention_heads=0), "positive"), (dict(hidden_size=50), "not a multiple of num_attention_heads")],
)
def test_impossible_architectures_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        _arch(**kw)


def test_width_pruner_prunes_a_real_model(batches):
    """The seed's WidthPruner end to end on a tiny Llama (it only produced index lists before)."""
    from tests.minitron.conftest import tiny

    model = tiny()
    result = WidthPruner(48, 64, 2, 1).prune_(model, batches)
    assert Architecture.from_config(model.config) == _arch(hidden_size=48, intermediate_size=64,
                                                           num_attention_heads=2, num_key_value_heads=1)
    assert (result.original_hidden_dim, result.final_hidden_dim, len(result.hidden_channels_kept)) == (64, 48, 48)
    assert result.intermediate_compression_ratio() == 2
    with torch.no_grad():
        assert model(batches[0]).logits.shape == (2, 16, 128)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        WidthPruner(48, 64, 3).prune_(tiny(), batches)  # 3 heads cannot sit in the model's 2 KV groups


def test_width_pruner_keeps_the_attention_unless_asked(batches):
    """Heads and KV heads default to the model's own (the seed's default of 1 head raised here)."""
    from tests.minitron.conftest import tiny

    model, dense = tiny(), tiny()
    result = WidthPruner(64, 64).prune_(model, batches)
    assert Architecture.from_config(model.config) == _arch(intermediate_size=64)  # 4 heads, 2 KV heads, hidden 64
    assert result.hidden_channels_kept == tuple(range(64))
    # one tuple per layer: the neurons whose gate/up rows and down columns survived, in order
    assert len(result.intermediate_channels_kept) == 4
    for kept, layer, ref in zip(result.intermediate_channels_kept, model.model.layers, dense.model.layers, strict=True):
        assert len(kept) == 64 and list(kept) == sorted(kept)
        assert torch.equal(layer.mlp.up_proj.weight, ref.mlp.up_proj.weight[list(kept)])
        assert torch.equal(layer.mlp.down_proj.weight, ref.mlp.down_proj.weight[:, list(kept)])
    assert len({tuple(k) for k in result.intermediate_channels_kept}) > 1  # chosen per layer, not once


def test_width_pruner_unchanged_heads_in_validate_and_head_dim():
    WidthPruner(60, 64).validate(64, 128)  # heads unknown: only the sizes are checked
    with pytest.raises(InvalidPattern, match="num_attention_heads \\(8\\)"):
        WidthPruner(60, 64).validate(64, 128, original_heads=8)
    assert WidthPruner(48, 64).head_dim_after_pruning(original_heads=4) == 12
    with pytest.raises(ConfigError, match="original_heads"):
        WidthPruner(48, 64).head_dim_after_pruning()
