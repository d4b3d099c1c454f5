"""Search: parameter counts, candidate enumeration under constraints, the scores table, building
and scoring candidates, distillation."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning_core.errors import ConfigError, NumericalInstability
from pruning_core.minitron import (
    Architecture,
    MinitronScores,
    MinitronTarget,
    ModelShape,
    build_candidate,
    candidate_plan,
    compute_scores,
    depth_plan,
    disjoint_windows,
    distill_,
    enumerate_candidates,
    evaluate_candidate,
    layer_drop_losses,
    lm_loss,
    loss_iterative,
    search,
    select_block,
    select_one_shot,
    trace_decoder,
)
from tests.minitron.conftest import tiny

DENSE = Architecture(num_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
SHAPE = ModelShape(vocab_size=128, head_dim=16, tied_embeddings=True)
SMOLLM2 = Architecture(num_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1,
          "intermediate_size": 40, "head_dim": 16}, {"tie_word_embeddings": False}],
)
def test_num_parameters_matches_a_real_model(overrides):
    model = tiny(**overrides)
    arch = Architecture.from_config(model.config)
    shape = ModelShape.from_config(model.config)
    assert arch.num_parameters(vocab_size=shape.vocab_size, head_dim=shape.head_dim,
                               tied_embeddings=shape.tied_embeddings) == sum(p.numel() for p in model.parameters())


def test_smollm2_parameter_count():
    """The documented 134,515,008 parameters of SmolLM2-135M (tied embeddings, head_dim 64)."""
    assert SMOLLM2.num_parameters(vocab_size=49152, head_dim=64, tied_embeddings=True) == 134_515_008


@settings(max_examples=30, deadline=None)
@given(budget=st.integers(20_000, 82_240), tol=st.sampled_from([0.02, 0.05, 0.2]))
def test_candidates_respect_budget_and_constraints(budget, tol):
    target = MinitronTarget(param_budget=budget, budget_tolerance=tol, hidden_divisor=16, ffn_divisor=32)
    try:
        found = enumerate_candidates(DENSE, SHAPE, target)
    except ConfigError:
        return  # nothing fits this narrow window; the error is the documented outcome
    params = [a.num_parameters(vocab_size=128, head_dim=16, tied_embeddings=True) for a in found]
    assert all((1 - tol) * budget <= p <= budget for p in params)
    assert params == sorted(params, reverse=True)
    for a in found:
        assert a.hidden_size % 16 == 0 or a.hidden_size == 64
        assert a.intermediate_size % 32 == 0 and a.num_attention_heads % a.num_key_value_heads == 0
        assert a.hidden_size % a.num_attention_heads == 0
        assert a.num_attention_heads // a.num_key_value_heads <= 2
        a.check_within(DENSE)


def test_max_candidates_keeps_the_largest():
    target = MinitronTarget(param_budget=90_000_000, budget_tolerance=0.05)
    every = enumerate_candidates(SMOLLM2, ModelShape(49152, 64, True), target)
    capped = enumerate_candidates(SMOLLM2, ModelShape(49152, 64, True),
                                  MinitronTarget(param_budget=90_000_000, budget_tolerance=0.05, max_candidates=3))
    assert len(every) > 3 and capped == every[:3]


def test_explicit_targets_enumerate_their_product():
    target = MinitronTarget(num_layers=(24, 27), intermediate_size=(768, 1536), num_attention_heads=(6, 9),
                            num_key_value_heads=(2, 3))
    found = enumerate_candidates(SMOLLM2, ModelShape(49152, 64, True), target)
    # 9 heads in 2 KV groups is not a whole number per group; 6 in 3 groups (2 each) is fine
    shapes = {(a.num_layers, a.intermediate_size, a.num_attention_heads, a.num_key_value_heads) for a in found}
    heads = ((6, 2), (6, 3), (9, 3))
    assert shapes == {(layers, ffn, h, kv) for layers in (24, 27) for ffn in (768, 1536) for h, kv in heads}
    # hidden sizes are multiples of 64 that the head count divides (576 = 9 x 64 is the only one for 9 heads)
    assert {a.hidden_size for a in found if a.num_attention_heads == 9} == {576}
    assert {a.hidden_size for a in found if a.num_attention_heads == 6} == {192, 384, 576}


@pytest.mark.parametrize(
    ("target", "match"),
    [(MinitronTarget(num_layers=(31,)), "above the original 30"),
     (MinitronTarget(intermediate_size=(2048,)), "above the original 1536"),
     (MinitronTarget(param_budget=1000), "no architecture")],
)
def test_bad_targets_name_the_numbers(target, match):
    with pytest.raises(ConfigError, match=match):
        enumerate_candidates(SMOLLM2, ModelShape(49152, 64, True), target)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({}, "param_budget"), ({"param_budget": 0}, "param_budget"), ({"param_budget": 10, "budget_tolerance": 1.0},
     "budget_tolerance"), ({"hidden_size": (500,)}, "hidden_size"), ({"num_layers": ()}, "num_layers"),
     ({"param_budget": 10, "ffn_divisor": 0}, "ffn_divisor"), ({"param_budget": 10, "max_candidates": 0},
                                                                "max_candidates")],
)
def test_target_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        MinitronTarget(**kwargs)


def test_scores_table_round_trip(llama4, batches):
    model, _, structure = llama4
    scores = compute_scores(model, batches, structure, loss_batches=batches[:1])
    cols = scores.to_columns()
    assert set(cols) == {"axis", "layer", "index", "score"}
    assert len(cols["axis"]) == 4 + 4 + 64 + 4 * 128 + 4 * 4
    pa = pytest.importorskip("pyarrow")
    table = pa.table(cols)
    assert table.schema.field("score").type == pa.float64()
    back = MinitronScores.from_columns(table.to_pydict())
    for a, b in ((scores.block_importance, back.block_importance), (scores.layer_loss, back.layer_loss),
                 (scores.width.hidden, back.width.hidden), (scores.width.neurons, back.width.neurons),
                 (scores.width.heads, back.width.heads)):
        torch.testing.assert_close(a, b)
    broken = dict(cols, axis=["bogus"] + cols["axis"][1:])
    with pytest.raises(ConfigError, match="unknown axis"):
        MinitronScores.from_columns(broken)


def test_candidates_are_built_from_cached_scores(llama4, batches):
    model, graph, structure = llama4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = compute_scores(model, batches, structure, loss_batches=batches[:1])
    arch = Architecture(num_layers=3, hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    for criterion, removed in (("bi", int(torch.argmin(scores.block_importance))),
                               ("loss", int(torch.argmin(scores.layer_loss)))):
        plan = candidate_plan(model, graph, structure, scores, arch, depth_criterion=criterion)
        assert plan.layer_removals[0].indices == (removed,)
        pruned = build_candidate(model, plan)
        assert Architecture.from_config(pruned.config) == arch
        assert sum(p.numel() for p in pruned.parameters()) == arch.num_parameters(vocab_size=128, head_dim=16,
                                                                                  tied_embeddings=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # dense untouched
    no_loss = MinitronScores(scores.block_importance, None, scores.width)
    with pytest.raises(ConfigError, match="loss_batches"):
        candidate_plan(model, graph, structure, no_loss, arch, depth_criterion="loss")


def test_search_ranks_by_loss(llama4, batches):
    model, graph, structure = llama4
    scores = compute_scores(model, batches, structure)
    candidates = enumerate_candidates(DENSE, SHAPE, MinitronTarget(param_budget=70_000, budget_tolerance=0.1,
                                                                   hidden_divisor=16, ffn_divisor=32))[:3]
    results = search(model, graph, structure, scores, candidates, batches)
    assert [r.loss for r in results] == sorted(r.loss for r in results)
    assert {r.architecture for r in results} == set(candidates)


def test_distillation_reduces_kl_on_its_batch(llama4, batches):
    teacher = llama4[0]
    student = tiny(num_hidden_layers=2)
    losses = distill_(student, teacher, batches[:1], steps=8, lr=3e-3)
    assert len(losses) == 8 and losses[-1] < losses[0]
    loss, history = evaluate_candidate(copy.deepcopy(student), batches[:2], teacher=teacher, distill_steps=2,
                                       distill_batches=batches[2:])
    assert len(history) == 2 and loss > 0
    with pytest.raises(ConfigError, match="teacher"):
        evaluate_candidate(student, batches, distill_steps=1)


def test_eager_attention_traces_like_sdpa(batches):
    """Attention is found through the SDPA call or, with attn_implementation 'eager' (Gemma 2's
    only choice: soft-capping), through softmax(q @ k^T) @ v: same units, same plans."""
    model = tiny()
    ids = torch.tensor([[1, 2, 3, 4]])
    sdpa_graph, sdpa = trace_decoder(model, ids)
    model.config._attn_implementation = "eager"
    eager_graph, eager = trace_decoder(model, ids)
    assert eager.attention == sdpa.attention and eager.norms == sdpa.norms
    assert [(m.producers, m.down, m.size) for m in eager.mlp] == [(m.producers, m.down, m.size) for m in sdpa.mlp]
    scores = compute_scores(model, batches[:1], sdpa)
    arch = Architecture(num_layers=3, hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    assert candidate_plan(model, eager_graph, eager, scores, arch) == candidate_plan(model, sdpa_graph, sdpa, scores, arch)


def _linear_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention without softmax (q (k^T v)): nothing the tracer can recognise as attention."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return (query @ (key.transpose(2, 3) @ value)).transpose(1, 2), None


def test_untraceable_attention_is_refused_clearly(monkeypatch):
    """An attention computed some other way cannot have its heads coupled: the structure says so
    (a typed error naming the block and its modules) instead of guessing."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pruning_core.errors import UnsupportedArchitecture

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "linear_test", _linear_attention)
    model = tiny()
    model.config._attn_implementation = "linear_test"
    with pytest.raises(UnsupportedArchitecture, match="attention unit") as info:
        trace_decoder(model, torch.tensor([[1, 2, 3, 4]]))
    assert info.value.block == "model.layers.0" and "self_attn.q_proj: Linear" in info.value.pattern


# ----------------------------------------------------------------------------- biases (Qwen2, Llama with biases)
def _qwen2(**overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2ForCausalLM(Qwen2Config(**{**config, **overrides})).eval()


@pytest.mark.parametrize(
    ("make", "bias"),
    [(lambda: tiny(attention_bias=True, mlp_bias=True), (True, True, True)),
     (lambda: tiny(attention_bias=True), (True, True, False)),
     (lambda: tiny(mlp_bias=True, tie_word_embeddings=False), (False, False, True)),
     (_qwen2, (True, False, False)),  # Qwen2: q/k/v biases, none on o_proj, no config flag
     (lambda: _qwen2(tie_word_embeddings=True), (True, False, False))],
    ids=["llama-attn+mlp-bias", "llama-attn-bias", "llama-mlp-bias", "qwen2", "qwen2-tied"],
)
def test_num_parameters_counts_biases(make, bias):
    model = make()
    shape = ModelShape.from_config(model.config)
    assert (shape.qkv_bias, shape.o_bias, shape.mlp_bias) == bias
    actual = sum(p.numel() for p in model.parameters())
    assert shape.num_parameters(Architecture.from_config(model.config)) == actual
    bias_free = ModelShape(shape.vocab_size, shape.head_dim, shape.tied_embeddings)
    assert bias_free.num_parameters(Architecture.from_config(model.config)) < actual  # the biases are counted


def test_pruned_qwen2_has_the_predicted_parameters(batches):
    """Width and depth pruning of a model with q/k/v biases: the biases are sliced with their rows."""
    model = _qwen2()
    graph, structure = trace_decoder(model, batches[0][:1, :8])
    scores = compute_scores(model, batches, structure)
    arch = Architecture(num_layers=2, hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    plan = candidate_plan(model, graph, structure, scores, arch)
    pruned = build_candidate(model, plan)
    predicted = ModelShape.from_config(model.config).num_parameters(arch)
    assert sum(p.numel() for p in pruned.parameters()) == predicted == plan.predicted_num_parameters(model)
    assert pruned.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    with torch.no_grad():
        assert pruned(batches[0]).logits.shape == (2, 16, 128)


# ----------------------------------------------------------------------------- depth criteria
def test_loss_block_removes_the_contiguous_block_with_the_smallest_loss_increase(llama4, batches):
    model, graph, structure = llama4
    scores = compute_scores(model, batches, structure, loss_batches=batches[:2], layer_loss=False, block_sizes=[2])
    assert scores.layer_loss is None and set(scores.block_loss) == {2} and scores.block_loss[2].shape == (3,)
    base = lm_loss(model, batches[:2])
    brute = []
    for start in range(3):  # every contiguous pair, removed physically
        pruned = build_candidate(model, depth_plan(model, [start, start + 1]))
        brute.append(lm_loss(pruned, batches[:2]) - base)
    torch.testing.assert_close(scores.block_loss[2], torch.tensor(brute, dtype=torch.float64), rtol=0, atol=1e-5)
    best = int(torch.tensor(brute).argmin())
    arch = Architecture(num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    plan = candidate_plan(model, graph, structure, scores, arch, depth_criterion="loss_block")
    assert plan.layer_removals[0].indices == (best, best + 1)
    one_layer = Architecture(num_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2)
    with pytest.raises(ConfigError, match="block size 1"):
        candidate_plan(model, graph, structure, scores, one_layer, depth_criterion="loss_block")


def test_loss_iterative_is_greedy_on_the_recomputed_lm_loss(llama4, batches):
    model, graph, structure = llama4
    data = batches[:2]
    order = loss_iterative(model, data, 2)
    remaining, expected = list(range(4)), []
    for _ in range(2):  # brute force: drop each remaining layer physically, keep the best drop
        losses = [lm_loss(build_candidate(model, depth_plan(model, expected + [i])), data) for i in remaining]
        expected.append(remaining.pop(int(torch.tensor(losses).argmin())))
    assert order == expected
    assert order[0] == select_one_shot(layer_drop_losses(model, data), 1)[0]
    scores = compute_scores(model, batches, structure)
    arch = Architecture(num_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    plan = candidate_plan(model, graph, structure, scores, arch, depth_criterion="loss_iterative", removal_order=order)
    assert plan.layer_removals[0].indices == (order[0],)  # the greedy prefix
    with pytest.raises(ConfigError, match="removal order"):
        candidate_plan(model, graph, structure, scores, arch, depth_criterion="loss_iterative")
    with pytest.raises(ConfigError, match="depth_criterion"):
        candidate_plan(model, graph, structure, scores, arch, depth_criterion="random")


def test_select_block_golden():
    assert select_block(torch.tensor([0.5, 0.1, 0.1, 0.3]), 2) == [1, 2]  # tie: the lower start
    assert select_block(torch.tensor([0.2, 0.9, -0.1]), 3) == [2, 3, 4]
    with pytest.raises(NumericalInstability):
        select_block(torch.tensor([0.1, float("nan")]), 2)


def test_block_losses_round_trip_through_the_table(llama4, batches):
    model, _, structure = llama4
    scores = compute_scores(model, batches, structure, loss_batches=batches[:1], block_sizes=[1, 3])
    cols = scores.to_columns()
    assert cols["axis"].count("block_loss") == 4 + 2
    back = MinitronScores.from_columns(cols)
    assert set(back.block_loss) == {1, 3}
    for k in (1, 3):
        torch.testing.assert_close(back.block_loss[k], scores.block_loss[k])
    torch.testing.assert_close(back.block_loss[1], scores.layer_loss)  # a block of one layer is the layer loss


# ----------------------------------------------------------------------------- distillation windows
def test_distillation_needs_windows_other_than_the_scoring_ones(llama4, batches):
    teacher = llama4[0]
    student = tiny(num_hidden_layers=2)
    with pytest.raises(ConfigError, match="distill_batches"):
        evaluate_candidate(copy.deepcopy(student), batches, teacher=teacher, distill_steps=1)
    with pytest.raises(ConfigError, match="in-sample"):
        evaluate_candidate(copy.deepcopy(student), batches[:2], teacher=teacher, distill_steps=1,
                           distill_batches=[batches[1][:1], batches[2]])
    loss, history = evaluate_candidate(copy.deepcopy(student), batches[:2], teacher=teacher, distill_steps=2,
                                       distill_batches=batches[2:])
    assert len(history) == 2 and loss > 0


def test_disjoint_windows_share_no_token_position_with_the_avoided_windows():
    tokens = torch.arange(1000)  # every token id is its position
    avoid = torch.stack([tokens[s : s + 32] for s in (0, 100, 470, 960)])
    got = disjoint_windows(tokens, 12, 32, seed=0, avoid=avoid)
    assert got.shape == (12, 32)
    assert not set(got.flatten().tolist()) & set(avoid.flatten().tolist())
    assert all(torch.equal(row, tokens[int(row[0]) : int(row[0]) + 32]) for row in got)  # real windows of the text
    assert torch.equal(got, disjoint_windows(tokens, 12, 32, seed=0, avoid=avoid))  # seeded
    assert not torch.equal(got, disjoint_windows(tokens, 12, 32, seed=1, avoid=avoid))
    with pytest.raises(ConfigError, match="share no token"):
        disjoint_windows(tokens[:100], 5, 40, seed=0, avoid=tokens[30:62][None])  # every start 0..60 overlaps 30..61
    with pytest.raises(ConfigError, match="does not occur"):
        disjoint_windows(tokens, 1, 32, seed=0, avoid=torch.full((1, 32), 5000))


def test_disjoint_windows_avoid_repeated_text():
    """A scoring window's text repeated elsewhere is avoided at every occurrence."""
    tokens = torch.cat([torch.arange(50), torch.arange(100, 150), torch.arange(50)])  # [0..49] twice
    avoid = tokens[10:20][None]
    got = disjoint_windows(tokens, 100, 8, seed=0, avoid=avoid)
    starts = {int(w[0]) for w in got}  # token ids 0..49 and 100..149 identify their positions here
    assert not set(got.flatten().tolist()) & set(range(10, 20)) and len(starts) >= 30
