"""Minitron depth and width on every Llama-like family (tiny random models of the real
transformers classes from tests/tiny_models.py), and the typed refusal of every other family.

Hand-made references: dropping a layer equals the dense model with that layer skipped (a hook
returns its input); removing MLP neurons / query heads equals the dense model with the matching
input columns of ``down_proj`` / ``o_proj`` zeroed; keeping every channel is the dense model bit
for bit. Windows are 32 tokens, longer than Gemma's sliding window of 16, so sliding and full
attention layers differ.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_core.errors import GraphError, UnsupportedArchitecture
from pruning_core.graph import apply_plan_
from pruning_core.minitron import (
    FAMILIES,
    Architecture,
    MinitronTarget,
    ModelShape,
    build_candidate,
    candidate_plan,
    check_supported,
    compute_scores,
    depth_plan,
    enumerate_candidates,
    trace_decoder,
    width_plan,
    without_layers,
)
from tests.tiny_models import ARCHITECTURES, LLAMA_LIKE, VOCAB, make_tiny

GEN = torch.Generator().manual_seed(0)
BATCHES = [torch.randint(3, VOCAB, (2, 32), generator=GEN) for _ in range(2)]
IDS = BATCHES[0]
DENSE = dict(num_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
TARGETS = {
    "depth": dict(num_layers=3),
    "mlp-halved": dict(intermediate_size=64),
    "whole-kv-groups": dict(num_attention_heads=2, num_key_value_heads=1),
    "one-head-per-group": dict(num_attention_heads=2, num_key_value_heads=2),
    "hidden": dict(hidden_size=48),
    "all-axes-and-depth": dict(num_layers=3, hidden_size=32, intermediate_size=32, num_attention_heads=2,
                               num_key_value_heads=1),
}
OTHERS = [name for name in ARCHITECTURES if name not in LLAMA_LIKE]


def arch(**changes: int) -> Architecture:
    return Architecture(**{**DENSE, **changes})


def hf_sizes(a: Architecture) -> dict[str, int]:
    return {"num_hidden_layers": a.num_layers, "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
            "num_attention_heads": a.num_attention_heads, "num_key_value_heads": a.num_key_value_heads}


@functools.cache
def dense(name: str):
    """(model, graph, structure, scores) of a 4-layer tiny model of family ``name`` (cached)."""
    model = make_tiny(name, layers=4)
    graph, structure = trace_decoder(model, IDS[:1, :8])
    return model, graph, structure, compute_scores(model, BATCHES, structure)


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _skip(_module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _kept(plan, param: str, dim: int) -> tuple[int, ...] | None:
    return next((e.keep for e in plan.axis_edits if (e.param, e.dim) == (param, dim)), None)


# ----------------------------------------------------------------------------- support and counts
@pytest.mark.parametrize("name", LLAMA_LIKE)
def test_family_is_supported_and_its_layout_predicts_the_parameters(name):
    model = dense(name)[0]
    assert check_supported(model) is FAMILIES[model.config.model_type]
    shape = ModelShape.from_config(model.config)
    assert shape.num_parameters(Architecture.from_config(model.config)) == sum(p.numel() for p in model.parameters())


def test_the_architecture_table_and_minitron_agree_on_the_families():
    """pruning_core.arch.FAMILIES marks the Minitron families; their layouts are stated here."""
    from pruning_core.arch import FAMILIES as ARCH_FAMILIES
    from pruning_core.minitron.families import REFUSED

    assert {t for t, f in ARCH_FAMILIES.items() if f.minitron} == set(FAMILIES)
    assert {t for t, f in ARCH_FAMILIES.items() if not f.minitron} == set(REFUSED)
    assert {make_tiny(n).config.model_type for n in LLAMA_LIKE} == set(FAMILIES)


@pytest.mark.parametrize("name", LLAMA_LIKE)
@pytest.mark.parametrize("tied", [True, False])
def test_prediction_equals_the_model_transformers_builds(name, tied):
    """For shapes the pruning can produce, the count equals a skeleton built from that config."""
    model = dense(name)[0]
    for target in [*TARGETS.values(), dict(num_layers=1, hidden_size=16, intermediate_size=8,
                                           num_attention_heads=1, num_key_value_heads=1)]:
        a = arch(**target)
        types = getattr(model.config, "layer_types", None)
        config = type(model.config).from_dict({
            **model.config.to_dict(), **hf_sizes(a), "tie_word_embeddings": tied, "head_dim": 16,
            **({"layer_types": types[: a.num_layers]} if types else {})})
        with torch.device("meta"):
            built = type(model)(config)
        assert ModelShape.from_config(config).num_parameters(a) == sum(p.numel() for p in built.parameters())


# ----------------------------------------------------------------------------- depth
@pytest.mark.parametrize("name", LLAMA_LIKE)
@pytest.mark.parametrize("removed", [1, 2])
def test_dropping_a_layer_equals_skipping_it(name, removed):
    """Also for Gemma's alternating sliding/full layers: each kept layer keeps its own type."""
    model = dense(name)[0]
    handle = model.model.layers[removed].register_forward_hook(_skip, with_kwargs=True)
    try:
        reference = logits(model)
    finally:
        handle.remove()
    pruned = build_candidate(model, depth_plan(model, [removed]))
    kept = [i for i in range(4) if i != removed]
    torch.testing.assert_close(logits(pruned), reference, rtol=0, atol=1e-6)
    with without_layers(model, [removed]):
        torch.testing.assert_close(logits(model), reference, rtol=0, atol=1e-6)
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        assert pruned.config.layer_types == [types[i] for i in kept] and model.config.layer_types == types
    for new, old in enumerate(kept):
        attn, ref = pruned.model.layers[new].self_attn, model.model.layers[old].self_attn
        assert attn.layer_idx == new and getattr(attn, "sliding_window", None) == getattr(ref, "sliding_window", None)


# ----------------------------------------------------------------------------- width
@pytest.mark.parametrize("name", LLAMA_LIKE)
def test_keeping_every_channel_is_the_dense_model(name):
    model, graph, structure, scores = dense(name)
    pruned = build_candidate(model, width_plan(graph, structure, scores.width, arch()))
    assert torch.equal(logits(pruned), logits(model))


def _zeroed_reference(model, structure, plan):
    """The dense model with the down_proj/o_proj input columns the plan removes set to zero."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    consumers = [m.down for m in structure.mlp] + [a.o for a in structure.attention]
    with torch.no_grad():
        for module in consumers:
            keep = _kept(plan, f"{module}.weight", 1)
            if keep is not None:
                weight = params[f"{module}.weight"]
                weight[:, [i for i in range(weight.shape[1]) if i not in set(keep)]] = 0
    return ref


@pytest.mark.parametrize("name", LLAMA_LIKE)
@pytest.mark.parametrize("target", list(TARGETS))
def test_width_and_depth_candidates(name, target, tmp_path):
    model, graph, structure, scores = dense(name)
    a = arch(**TARGETS[target])
    plan = candidate_plan(model, graph, structure, scores, a)
    pruned = build_candidate(model, plan)
    count = sum(p.numel() for p in pruned.parameters())
    assert count == ModelShape.from_config(model.config).num_parameters(a) == plan.predicted_num_parameters(model)
    assert Architecture.from_config(pruned.config) == a and pruned.config.head_dim == 16
    out = logits(pruned)
    if a.hidden_size == 64 and a.num_layers == 4:  # heads / neurons only: the zeroed dense model (depth: above)
        torch.testing.assert_close(out, logits(_zeroed_reference(model, structure, plan)), rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                  "num_hidden_layers", "head_dim")} == {**hf_sizes(a), "head_dim": 16}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), out, rtol=1e-5, atol=1e-5)
    prompt = IDS[:1, :6]
    cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=2)
    uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=2)
    assert cached.shape == (1, 12) and torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_hidden_pruning_keeps_the_embedding_scale(name):
    """Gemma scales embeddings by sqrt(hidden_size), recomputed on reload: the kept channels of
    the pruned embedding equal the dense ones, and the tied head sees the dense logit scale."""
    model, graph, structure, scores = dense(name)
    plan = width_plan(graph, structure, scores.width, arch(hidden_size=48))
    pruned = build_candidate(model, plan)
    kept = list(_kept(plan, "model.embed_tokens.weight", 1))
    with torch.no_grad():
        torch.testing.assert_close(pruned.model.embed_tokens(IDS), model.model.embed_tokens(IDS)[..., kept])
        assert float(pruned.model.embed_tokens.embed_scale) == pytest.approx(48**0.5)
        factor = 64**0.5 / 48**0.5
        torch.testing.assert_close((1 + pruned.model.norm.weight) * factor, (1 + model.model.norm.weight)[kept])
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight


def test_untied_gemma_rescales_only_the_embedding():
    model = make_tiny("gemma3", layers=2, tie_word_embeddings=False)
    graph, structure = trace_decoder(model, IDS[:1, :8])
    plan = width_plan(graph, structure, compute_scores(model, BATCHES[:1], structure).width,
                      arch(num_layers=2, hidden_size=48))
    pruned = build_candidate(model, plan)
    kept = list(_kept(plan, "model.embed_tokens.weight", 1))
    with torch.no_grad():
        torch.testing.assert_close(pruned.model.embed_tokens(IDS), model.model.embed_tokens(IDS)[..., kept])
    assert torch.equal(pruned.model.norm.weight, model.model.norm.weight[kept])
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight[:, kept])


def test_phi3_fused_rows_follow_heads_groups_and_neurons():
    """qkv_proj = q|k|v rows, gate_up_proj = gate|up rows: sliced consistently with the heads,
    the KV groups and the gate/up pairing (4 heads x 16, 2 KV heads, 128 neurons)."""
    model, graph, structure, scores = dense("phi3")
    plan = width_plan(graph, structure, scores.width, arch(num_attention_heads=2, num_key_value_heads=1,
                                                           intermediate_size=64))
    for i in range(4):
        heads = [h for h in range(4) if set(range(h * 16, h * 16 + 16)) <= set(_kept(plan, f"model.layers.{i}.self_attn.o_proj.weight", 1))]
        group = heads[0] // 2
        assert heads == [2 * group, 2 * group + 1]  # a whole KV group
        rows = [r for h in heads for r in range(h * 16, h * 16 + 16)]
        kv = list(range(group * 16, group * 16 + 16))
        assert list(_kept(plan, f"model.layers.{i}.self_attn.qkv_proj.weight", 0)) == (
            rows + [64 + r for r in kv] + [96 + r for r in kv])
        neurons = list(_kept(plan, f"model.layers.{i}.mlp.down_proj.weight", 1))
        assert list(_kept(plan, f"model.layers.{i}.mlp.gate_up_proj.weight", 0)) == neurons + [128 + n for n in neurons]


def test_phi3_with_longrope_keeps_hidden_per_head():
    """Phi3Config checks LongRoPE factors against hidden_size / num_attention_heads: candidates
    that change it are not enumerated, and a plan that does is refused before anything changes."""
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "rope_theta": 1e4}
    model = make_tiny("phi3", layers=4, rope_parameters=rope, original_max_position_embeddings=64)
    shape = ModelShape.from_config(model.config)
    assert shape.hidden_per_head == 16 and ModelShape.from_config(dense("phi3")[0].config).hidden_per_head is None
    target = MinitronTarget(hidden_size=(64, 48, 32), num_attention_heads=(4, 2), num_key_value_heads=(2, 1),
                            hidden_divisor=16)
    found = enumerate_candidates(Architecture.from_config(model.config), shape, target)
    assert found and all(a.hidden_size == 16 * a.num_attention_heads for a in found)
    graph, structure = trace_decoder(model, IDS[:1, :8])
    plan = width_plan(graph, structure, compute_scores(model, BATCHES[:1], structure).width, arch(hidden_size=48))
    before = logits(model)
    with pytest.raises(GraphError, match="Phi3Config refuses"):
        apply_plan_(model, plan)
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_q_and_k_norms_are_per_head_norms_not_projections(name):
    model, graph, structure, scores = dense(name)
    for i, unit in enumerate(structure.attention):
        prefix = f"model.layers.{i}.self_attn."
        assert (unit.q, unit.k, unit.v, unit.o) == tuple(prefix + p for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert unit.inner == (prefix + "k_norm", prefix + "q_norm")
    pruned = build_candidate(model, width_plan(graph, structure, scores.width, arch(num_attention_heads=2,
                                                                                     num_key_value_heads=1)))
    assert torch.equal(pruned.model.layers[0].self_attn.q_norm.weight, model.model.layers[0].self_attn.q_norm.weight)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", OTHERS)
def test_other_families_are_refused_before_any_work(name, monkeypatch):
    model = make_tiny(name)
    with pytest.raises(UnsupportedArchitecture, match=repr(model.config.model_type)) as info:
        check_supported(model)
    assert info.value.block.endswith(".0") and ": " in info.value.pattern
    import pruning_core.minitron.structure as structure

    monkeypatch.setattr(structure, "build_dependency_graph", lambda *a, **k: pytest.fail("traced"))
    with pytest.raises(UnsupportedArchitecture):
        trace_decoder(model, IDS[:1, :8])
    with pytest.raises(UnsupportedArchitecture):
        ModelShape.from_config(model.config)


def test_an_unknown_weight_in_a_supported_family_is_refused():
    model = make_tiny("llama")
    model.model.layers[0].mlp.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(UnsupportedArchitecture, match="a weight Minitron does not know") as info:
        check_supported(model)
    assert info.value.block == "model.layers.0" and "mlp: LlamaMLP(extra [3])" in info.value.pattern


def test_every_block_weight_needs_a_role():
    from dataclasses import replace

    from pruning_core.minitron.structure import _check_every_weight_has_a_role

    model, _, structure, _ = dense("gemma2")
    without = replace(structure, norms=tuple(n for n in structure.norms if not n.endswith("pre_feedforward_layernorm")))
    with pytest.raises(UnsupportedArchitecture, match="pre_feedforward_layernorm.weight") as info:
        _check_every_weight_has_a_role(model, without)
    assert info.value.block == "model.layers.0"
