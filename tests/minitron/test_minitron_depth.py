"""Depth pruning: the seed's pinned DepthPruner cases, per-token Block Importance, layer-drop
loss, one-shot vs iterative selection, and physical layer removal on a tiny Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from pruning_core.compat import DepthPruner, DepthPruningResult
from pruning_core.errors import InvalidSparsity, ShapeMismatch
from pruning_core.graph import apply_plan_
from pruning_core.minitron import (
    BlockImportanceScores,
    block_importance,
    collect_block_importance,
    depth_plan,
    layer_drop_losses,
    lm_loss,
    select_iterative,
    select_one_shot,
    without_layers,
)
from tests.minitron.conftest import tiny

T = torch.tensor


# ----------------------------------------------------------------------------- seed pinned cases
@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([1.0, 2.0], [1.0, 2.0], 1.0), ([1.0, 0.0], [0.0, 1.0], 0.0), ([1.0, 2.0], [-1.0, -2.0], -1.0),
     ([0.0, 0.0], [0.0, 0.0], 1.0), ([1.0, 2.0], [0.0, 0.0], 0.0), ([], [], 1.0)],
)
def test_cosine_similarity_seed_cases(a, b, expected):
    assert DepthPruner.cosine_similarity(T(a), T(b)) == pytest.approx(expected, abs=1e-9)


def test_cosine_length_mismatch_is_an_error():
    with pytest.raises(ShapeMismatch):
        DepthPruner.cosine_similarity(T([1.0, 2.0, 3.0]), T([1.0, 2.0]))


@pytest.mark.parametrize(("out", "bi"), [([1.0, 2.0], 0.0), ([0.0, 1.0], 1.0), ([-1.0, -2.0], 2.0)])
def test_layer_importance_seed_cases(out, bi):
    h_in = T([1.0, 2.0]) if out != [0.0, 1.0] else T([1.0, 0.0])
    assert DepthPruner().compute_layer_importance(h_in, T(out)) == pytest.approx(bi, abs=1e-6)


def test_block_importance_seed_case():
    inputs = [T([1.0, 0.0])] * 3
    outputs = [T([1.0, 0.0]), T([0.9, 0.1]), T([0.0, 1.0])]
    scores = DepthPruner().compute_block_importance(inputs, outputs)
    assert scores.get(0) == pytest.approx(0.0, abs=1e-6) and scores.get(2) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < scores.get(1) < 0.1
    with pytest.raises(ShapeMismatch):
        DepthPruner().compute_block_importance(inputs, outputs[:2])


def test_sorting_and_least_important():
    scores = BlockImportanceScores(((0, 0.5), (1, 0.1), (2, 0.9), (3, 0.3)))
    assert [i for i, _ in scores.sorted_by_importance()] == [1, 3, 0, 2]
    assert scores.least_important(2) == [1, 3]


def test_select_returns_descending_indices_and_checks_counts():
    scores = BlockImportanceScores(((0, 0.5), (1, 0.1), (2, 0.9), (3, 0.3)))
    assert DepthPruner(2).select_layers_to_remove(scores, 4) == [3, 1]
    three = BlockImportanceScores(((0, 0.5), (1, 0.1), (2, 0.9)))
    assert DepthPruner(2).select_layers_to_remove(three, 3) == [1, 0]
    for pruner in (DepthPruner(5, min_layers=2), DepthPruner(10)):
        with pytest.raises(InvalidSparsity):
            pruner.select_layers_to_remove(three, 3)


def test_select_needs_a_score_for_every_layer():
    """The seed did not check that the scores cover the model."""
    with pytest.raises(ShapeMismatch, match="missing layers"):
        DepthPruner(1).select_layers_to_remove(BlockImportanceScores(((0, 0.5),)), 3)


def test_depth_result_and_validate_seed_cases():
    result = DepthPruningResult(((3, 0.1), (7, 0.2)), 10)
    assert (result.final_depth, result.compression_ratio(), result.removal_percentage()) == (8, 1.25, 20.0)
    assert DepthPruningResult(((0, 0.1),), 1).compression_ratio() == math.inf
    DepthPruner(3, min_layers=2).validate(10)
    with pytest.raises(InvalidSparsity):
        DepthPruner(0, min_layers=5).validate(3)
    with pytest.raises(InvalidSparsity):
        DepthPruner(8, min_layers=2).validate(5)


# ----------------------------------------------------------------------------- per-token BI (seed bug)
def test_per_token_bi_differs_from_flattened_cosine():
    """Token 0 (norm 10) is rotated 90 degrees, token 1 (norm 1) is unchanged.

    Per token: cos = [0, 1] -> BI = 1 - 0.5 = 0.5 (ShortGPT's definition).
    Flattened (the seed): cos = 1 / 101 -> BI = 0.990, dominated by the large token.
    """
    h_in, h_out = T([[10.0, 0.0], [0.0, 1.0]]), T([[0.0, 10.0], [0.0, 1.0]])
    assert DepthPruner().compute_layer_importance(h_in, h_out) == pytest.approx(0.5)
    assert 1 - DepthPruner.cosine_similarity(h_in, h_out) == pytest.approx(1 - 1 / 101)


def test_block_importance_sums_are_split_invariant():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, 8, generator=gen), torch.randn(4, 5, 8, generator=gen)
    whole = block_importance(a, b)
    parts = [block_importance(a[i : i + 1], b[i : i + 1]) for i in range(4)]
    assert whole[1] == 20 and whole[0] == pytest.approx(sum(p[0] for p in parts))


def test_collected_bi_matches_hidden_states_reference(llama4, batches):
    """Hooks vs an independent reference from HF's hidden_states (h[i] in, h[i+1] out)."""
    model = llama4[0]
    got = collect_block_importance(model, batches).as_tensor(4)
    sums, count = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        for ids in batches:
            hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states
            for i in range(4):
                sums[i] += torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).double().sum()
            count += ids.numel()
    torch.testing.assert_close(got, 1 - sums / count)


# ----------------------------------------------------------------------------- selection
@settings(max_examples=40, deadline=None)
@given(scores=st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=12), data=st.data())
def test_iterative_equals_one_shot_when_scores_do_not_change(scores, data):
    n = data.draw(st.integers(0, len(scores) - 1))
    fixed = torch.tensor(scores, dtype=torch.float64)

    def score_fn(removed: list[int]) -> torch.Tensor:
        return fixed[[i for i in range(len(scores)) if i not in removed]]

    assert sorted(select_iterative(len(scores), n, score_fn)) == select_one_shot(fixed, n)


def test_iterative_recomputes_after_each_removal():
    """Removing layer 0 makes layer 2 important: one-shot picks {0, 2}, iterative {0, 1}."""
    def score_fn(removed: list[int]) -> torch.Tensor:
        base = {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.9}
        if 0 in removed:
            base[2] = 1.0
        return torch.tensor([base[i] for i in range(4) if i not in removed])

    assert select_one_shot(score_fn([]), 2) == [0, 2]
    assert select_iterative(4, 2, score_fn) == [0, 1]


def test_selection_rejects_too_many_layers():
    with pytest.raises(InvalidSparsity, match="cannot remove 4 of 4"):
        select_one_shot(torch.zeros(4), 4)
    with pytest.raises(InvalidSparsity, match="min_layers 3"):
        select_iterative(4, 2, lambda r: torch.zeros(4 - len(r)), min_layers=3)


def test_layer_drop_loss_matches_physical_removal(llama4, batches):
    model = llama4[0]
    drops = layer_drop_losses(model, batches)
    base = lm_loss(model, batches)
    pruned = apply_plan_(copy.deepcopy(model), depth_plan(model, [2]))
    assert drops.shape == (4,) and drops[2] == pytest.approx(lm_loss(pruned, batches) - base, abs=1e-5)
    blocks = layer_drop_losses(model, batches, block_size=2)
    with without_layers(model, [1, 2]):
        assert blocks[1] == pytest.approx(lm_loss(model, batches) - base, abs=1e-5)
    assert len(model.model.layers) == 4  # restored


def test_lm_loss_equals_hf_loss(llama4, batches):
    model = llama4[0]
    with torch.no_grad():
        reference = model(batches[0], labels=batches[0], use_cache=False).loss
    assert lm_loss(model, batches[:1]) == pytest.approx(float(reference), rel=1e-5)


# ----------------------------------------------------------------------------- physical removal
def test_depth_plan_removes_layers_and_renumbers_the_cache(tmp_path):
    model = tiny()
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    plan = depth_plan(model, [0, 2])
    predicted = plan.predicted_num_parameters(model)
    kept = [model.model.layers[1], model.model.layers[3]]
    apply_plan_(model, plan)
    assert list(model.model.layers) == kept
    assert model.config.num_hidden_layers == 2 and model.config.layer_types == ["sliding_attention"] * 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert sum(p.numel() for p in model.parameters()) == predicted
    model.config.layer_types = ["full_attention"] * 2  # the tiny model has no sliding window configured
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[5, 17, 99, 3]])
    cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    plain = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain) and cached.shape == (1, 10)


def test_depth_plan_with_nothing_removed_is_the_identity(llama4, batches):
    model = llama4[0]
    pruned = apply_plan_(copy.deepcopy(model), depth_plan(model, []))
    with torch.no_grad():
        assert torch.equal(pruned(batches[0]).logits, model(batches[0]).logits)


@pytest.mark.parametrize("iterative", [False, True])
def test_depth_pruner_prunes_a_real_model(batches, iterative):
    """The seed's DepthPruner end to end: its ``iterative`` flag now changes how layers are chosen."""
    from pruning_core.minitron import bi_iterative

    model = tiny()
    dense_bi = collect_block_importance(model, batches)
    expected = sorted(bi_iterative(model, batches, 2)) if iterative else sorted(dense_bi.least_important(2))
    result = DepthPruner(2, iterative=iterative).prune_(model, batches)
    assert [i for i, _ in result.removed_layers] == expected
    assert [s for _, s in result.removed_layers] == [dense_bi.get(i) for i in expected]
    assert (result.original_depth, result.final_depth, model.config.num_hidden_layers) == (4, 2, 2)
    with pytest.raises(InvalidSparsity):
        DepthPruner(2).with_min_layers(1).prune_(model, batches)  # only 2 layers left
    assert DepthPruner(1).with_iterative(False).is_iterative() is False
