"""Applying structural plans to a real (tiny, random) Hugging Face Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning_core.errors import GraphError
from pruning_core.graph import (
    AxisEdit,
    PruningPlan,
    StructuredPlan,
    apply_plan_,
    channel_group,
    coupled_spaces,
    plan_from_groups,
)
from tests.conftest import make_tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
ATT = "model.layers.{i}.self_attn."


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _keep_plan(graph, source: str, keep: list[int], space: str | None = None) -> StructuredPlan:
    """Every parameter axis coupled to ``source`` keeps ``keep`` in this order (identity offsets)."""
    edits = []
    for nid, sp in coupled_spaces(graph, source, space):
        node = graph.node(nid)
        for param, dim in node.attrs.get("params", {}).get(sp, ()):
            edits.append(AxisEdit(param, dim, node.space_dim(sp), tuple(keep)))
    return StructuredPlan(tuple(edits))


def test_full_size_plan_is_the_identity(llama_and_graph):
    model, graph = llama_and_graph
    dense = _logits(model)
    plan = _keep_plan(graph, "model.embed_tokens", list(range(64))).merged(
        _keep_plan(graph, "model.layers.0.mlp.up_proj", list(range(128)))
    )
    pruned = apply_plan_(copy.deepcopy(model), plan)
    assert torch.equal(_logits(pruned), dense)


@pytest.mark.parametrize("source", ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"])
def test_consistent_mlp_permutation_keeps_the_function(llama_and_graph, source):
    model, graph = llama_and_graph
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(3)).tolist()
    space = "in" if source.endswith("down_proj") else None
    pruned = apply_plan_(copy.deepcopy(model), _keep_plan(graph, source, perm, space))
    torch.testing.assert_close(_logits(pruned), _logits(model), rtol=1e-5, atol=1e-5)
    assert not torch.equal(pruned.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight) or \
        not torch.equal(pruned.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_consistent_hidden_permutation_keeps_the_function(llama_and_graph):
    """The residual stream can be permuted too (norm weights and tied head follow)."""
    model, graph = llama_and_graph
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4)).tolist()
    pruned = apply_plan_(copy.deepcopy(model), _keep_plan(graph, "model.embed_tokens", perm))
    torch.testing.assert_close(_logits(pruned), _logits(model), rtol=1e-5, atol=1e-5)


def _combined_plan(graph) -> StructuredPlan:
    plan = PruningPlan()
    plan.remove_channels("model.embed_tokens", [1, 5, 9, 33])
    for i in range(2):
        plan.remove_channels(f"model.layers.{i}.mlp.up_proj", list(range(0, 128, 4)))
        plan.remove_channels(ATT.format(i=i) + "q_proj", list(range(16, 32)) + list(range(48, 64)))
    plan.remove_layer("model.layers.1")
    return plan.to_structured(graph)


def test_parameter_count_drops_exactly_as_predicted(llama_and_graph):
    model, graph = llama_and_graph
    plan = _combined_plan(graph)
    predicted = plan.predicted_num_parameters(model)
    pruned = apply_plan_(copy.deepcopy(model), plan)
    assert _num_params(pruned) == predicted
    # by hand: hidden 60, ffn 96, 2 q heads (2 KV heads kept), 1 layer, vocab 128, tied head
    layer = 60 * 32 + 2 * 60 * 32 + 32 * 60 + 3 * 60 * 96 + 2 * 60
    assert predicted == 128 * 60 + layer + 60
    cfg = pruned.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.num_hidden_layers, cfg.head_dim) == (60, 96, 2, 2, 1, 16)
    assert pruned.model.layers[0].self_attn.num_key_value_groups == 1
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied


def _reference_heads(model, q_heads: list[int], kv_heads: list[int]) -> LlamaForCausalLM:
    """A fresh Llama with fewer heads, its weights sliced by hand (the straightforward reference)."""
    cfg = LlamaConfig(**{**model.config.to_dict(), "num_attention_heads": len(q_heads),
                         "num_key_value_heads": len(kv_heads), "head_dim": 16})
    ref = LlamaForCausalLM(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q_rows = torch.cat([torch.arange(h * 16, h * 16 + 16) for h in q_heads])
    kv_rows = torch.cat([torch.arange(g * 16, g * 16 + 16) for g in kv_heads])
    for i in range(cfg.num_hidden_layers):
        p = ATT.format(i=i)
        state[p + "q_proj.weight"] = state[p + "q_proj.weight"][q_rows]
        state[p + "k_proj.weight"] = state[p + "k_proj.weight"][kv_rows]
        state[p + "v_proj.weight"] = state[p + "v_proj.weight"][kv_rows]
        state[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, q_rows]
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize(
    ("removed_q", "kept_q", "kept_kv"),
    [
        ([32, 63], [0, 1], [0]),  # heads 2, 3 = all of KV group 1: the group goes (GQA)
        ([16, 48], [0, 2], [0, 1]),  # one query head per group: both KV heads stay
    ],
)
def test_head_pruning_matches_hand_sliced_reference(llama_and_graph, removed_q, kept_q, kept_kv):
    model, graph = llama_and_graph
    groups = [channel_group(graph, ATT.format(i=i) + "q_proj", removed_q) for i in range(2)]
    pruned = apply_plan_(copy.deepcopy(model), plan_from_groups(graph, groups))
    assert pruned.config.num_attention_heads == len(kept_q)
    assert pruned.config.num_key_value_heads == len(kept_kv)
    torch.testing.assert_close(_logits(pruned), _logits(_reference_heads(model, kept_q, kept_kv)))


def test_json_plan_replays_on_a_fresh_dense_model(llama_and_graph):
    model, graph = llama_and_graph
    plan = _combined_plan(graph)
    first = apply_plan_(copy.deepcopy(model), plan)
    replayed = apply_plan_(make_tiny_llama(), StructuredPlan.from_json(plan.to_json()))
    assert StructuredPlan.from_json(plan.to_json()) == plan
    a, b = first.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pruned_model_saves_reloads_and_generates(llama_and_graph, tmp_path):
    model, graph = llama_and_graph
    pruned = apply_plan_(copy.deepcopy(model), _combined_plan(graph))
    pruned.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(pruned))
    prompt = IDS[:1, :5]
    cached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 13) and torch.equal(cached, uncached)


def test_plan_on_the_wrong_model_is_refused(llama_and_graph):
    _, graph = llama_and_graph
    plan = _combined_plan(graph)
    with pytest.raises(GraphError, match="expects size"):
        apply_plan_(make_tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), plan)


def test_hidden_size_must_stay_a_multiple_of_the_heads(llama_and_graph):
    """transformers' LlamaConfig refuses hidden % heads != 0 on reload, so the plan is refused."""
    model, graph = llama_and_graph
    plan = PruningPlan().remove_channels("model.embed_tokens", [0, 1]).to_structured(graph)
    with pytest.raises(GraphError, match="not a multiple of num_attention_heads"):
        apply_plan_(copy.deepcopy(model), plan)


def test_plan_config_expectation_is_checked(llama_and_graph):
    model, graph = llama_and_graph
    plan = PruningPlan().remove_channels("model.embed_tokens", [0, 1, 2, 3]).to_structured(graph)
    wrong = StructuredPlan(plan.axis_edits, (), {"hidden_size": 64})
    with pytest.raises(GraphError, match="hidden_size"):
        apply_plan_(copy.deepcopy(model), wrong)


def test_malformed_plans_are_refused():
    with pytest.raises(GraphError, match="distinct"):
        AxisEdit("w", 0, 4, (0, 0))
    with pytest.raises(GraphError, match="all 4"):
        AxisEdit("w", 0, 4, ())
    with pytest.raises(ValueError, match="unknown keys"):
        StructuredPlan.from_dict({"axis_edits": [], "extra": 1})


def test_graph_and_plan_pickle(llama_and_graph):
    """Flows hand these between tasks (Prefect may pickle results)."""
    import pickle

    _, graph = llama_and_graph
    plan = _combined_plan(graph)
    assert pickle.loads(pickle.dumps(plan)) == plan
    again = pickle.loads(pickle.dumps(graph))
    assert again.num_nodes() == graph.num_nodes() and again.num_edges() == graph.num_edges()
    assert coupled_spaces(again, "model.embed_tokens") == coupled_spaces(graph, "model.embed_tokens")


def _snapshot(model: torch.nn.Module) -> dict:
    """Everything apply_plan_ could change: parameter objects and values, module sizes, config, layers."""
    return {
        "params": {n: (id(p), p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)},
        "sizes": [(n, getattr(m, "in_features", None), getattr(m, "out_features", None), getattr(m, "embedding_dim", None))
                  for n, m in model.named_modules()],
        "config": model.config.to_dict(),
        "layers": [id(layer) for layer in model.model.layers],
        "layer_idx": [layer.self_attn.layer_idx for layer in model.model.layers],
    }


def _bad_plans(graph):
    from pruning_core.minitron import depth_plan

    model = make_tiny_llama()
    hidden_62 = PruningPlan().remove_channels("model.embed_tokens", [0, 1]).to_structured(graph)
    hidden_60 = PruningPlan().remove_channels("model.embed_tokens", [0, 1, 2, 3]).to_structured(graph)
    return {
        # the audit's case: slices first, then sync_config_ refused hidden 62 with 4 heads
        "hidden not a multiple of the heads": hidden_62,
        "config expectation differs": StructuredPlan(hidden_60.axis_edits, (), {"hidden_size": 64}),
        "layers removed, then a bad width": depth_plan(model, [0]).merged(hidden_62),
        "layer count expectation differs": StructuredPlan(hidden_60.axis_edits, depth_plan(model, [1]).layer_removals,
                                                          {"num_hidden_layers": 2}),
        "per-layer sizes differ": _keep_plan(graph, "model.layers.0.mlp.up_proj", list(range(64))),
    }


@pytest.mark.parametrize("case", ["hidden not a multiple of the heads", "config expectation differs",
                                  "layers removed, then a bad width", "layer count expectation differs",
                                  "per-layer sizes differ"])
def test_a_failed_apply_leaves_the_model_unchanged(llama_and_graph, case):
    """No deepcopy: the plan is refused before the first weight is sliced or layer removed."""
    _, graph = llama_and_graph
    model = make_tiny_llama()
    dense, before = _logits(model), _snapshot(model)
    with pytest.raises(GraphError):
        apply_plan_(model, _bad_plans(graph)[case])
    after = _snapshot(model)
    assert after["sizes"] == before["sizes"] and after["config"] == before["config"]
    assert after["layers"] == before["layers"] and after["layer_idx"] == before["layer_idx"]
    assert after["params"].keys() == before["params"].keys()
    for name, (pid, value) in before["params"].items():
        assert after["params"][name][0] == pid and torch.equal(after["params"][name][1], value), name
    assert torch.equal(_logits(model), dense)
