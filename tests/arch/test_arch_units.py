"""arch.units: the one layer selector, on a tiny model of every supported family (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_core.arch import PrunableUnit, decoder_blocks, prunable_units
from pruning_core.errors import ConfigError, GraphError, ShapeMismatch, UnsupportedArchitecture
from tests.tiny_models import ARCHITECTURES, make_tiny

DTYPES = [torch.float32, torch.bfloat16]
ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LLAMA = [*ATTN, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
EXPERTS = [f"mlp.experts.{p}.{e}" for p in ("gate_up_proj", "down_proj") for e in range(4)]
# Hand-written: family -> (decoder block path, unit names inside one block, in module order).
EXPECTED = {
    "llama": ("model.layers", LLAMA),
    "mistral": ("model.layers", LLAMA),
    "qwen2": ("model.layers", LLAMA),
    "qwen3": ("model.layers", LLAMA),  # q_norm / k_norm are not units
    "gemma2": ("model.layers", LLAMA),
    "gemma3": ("model.layers", LLAMA),
    "phi3": ("model.layers", ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "phi": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                             "mlp.fc1", "mlp.fc2"]),
    "olmo": ("model.layers", LLAMA),
    "stablelm": ("model.layers", LLAMA),
    "falcon": ("transformer.h", ["self_attention.query_key_value", "self_attention.dense",
                                 "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "falcon_alibi": ("transformer.h", ["self_attention.query_key_value", "self_attention.dense",
                                       "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "gpt_neox": ("gpt_neox.layers", ["attention.query_key_value", "attention.dense",
                                     "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "opt": ("model.decoder.layers", ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                     "self_attn.out_proj", "fc1", "fc2"]),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "mixtral": ("model.layers", [*ATTN, *EXPERTS]),  # the router mlp.gate is not a unit
    "qwen2_moe": ("model.layers", [*ATTN, *EXPERTS, "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                   "mlp.shared_expert.down_proj"]),  # nor mlp.gate / mlp.shared_expert_gate
}
# Math shapes [out, in] of a few units (hidden 64, ffn 128; Qwen2-MoE experts ffn 64).
SHAPES = {
    ("gpt2", "attn.c_attn"): (192, 64), ("gpt2", "mlp.c_fc"): (128, 64), ("gpt2", "mlp.c_proj"): (64, 128),
    ("phi3", "self_attn.qkv_proj"): (128, 64), ("phi3", "mlp.gate_up_proj"): (256, 64),
    ("mixtral", "mlp.experts.gate_up_proj.2"): (256, 64), ("mixtral", "mlp.experts.down_proj.3"): (64, 128),
    ("qwen2_moe", "mlp.experts.gate_up_proj.0"): (128, 64), ("qwen2_moe", "mlp.experts.down_proj.1"): (64, 64),
}


def test_every_family_is_covered():
    assert set(EXPECTED) == set(ARCHITECTURES)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_units_are_exactly_the_expected_ones(family, dtype):
    model = make_tiny(family, dtype=dtype)
    path, names = EXPECTED[family]
    units = prunable_units(model)
    assert [u.name for u in units] == [f"{path}.{i}.{n}" for i in range(2) for n in names]
    for u in units:
        assert u.module == u.name.rsplit(f".{u.param}.", 1)[0] if u.expert is not None else u.module == u.name
        assert u.kind == ("expert" if ".experts." in u.name else "conv1d" if family == "gpt2" else "linear")
        assert u.read(model).shape == u.shape and u.read(model).dtype == dtype
    for (fam, name), shape in SHAPES.items():
        if fam == family:
            assert next(u for u in units if u.name == f"{path}.1.{name}").shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_read_write_round_trip(family, dtype):
    model = make_tiny(family, dtype=dtype)
    units = prunable_units(model)
    g = torch.Generator().manual_seed(0)
    new = {u.name: torch.randn(u.shape, generator=g) for u in units}  # float32, written as `dtype`
    for u in units:
        u.write(model, new[u.name])
    for u in units:  # every unit holds its own new weight: writes did not touch each other
        assert torch.equal(u.read(model), new[u.name].to(dtype))
        stored = getattr(model.get_submodule(u.module), u.param)
        assert stored.dtype == dtype and isinstance(stored, nn.Parameter)
        expected = new[u.name].to(dtype)
        if u.transposed:  # Conv1D stores [in, out]
            assert torch.equal(stored, expected.T)
        elif u.expert is not None:
            assert torch.equal(stored[u.expert], expected)
        else:
            assert torch.equal(stored, expected)
    with pytest.raises(ShapeMismatch, match=units[0].name):
        units[0].write(model, torch.zeros(units[0].shape[::-1] if units[0].shape[0] != units[0].shape[1]
                                          else (1, 1)))


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "qwen2_moe"])
def test_one_block_with_prefix_names_match_the_whole_model(family):
    model = make_tiny(family)
    path, blocks = decoder_blocks(model)
    whole = {u.name: u for u in prunable_units(model)}
    alone = prunable_units(blocks[1], prefix=f"{path}.1.")
    assert [u.name for u in alone] == [n for n in whole if n.startswith(f"{path}.1.")]
    for u in alone:
        assert not u.module.startswith(path)  # module paths are relative to the block
        assert torch.equal(u.read(blocks[1]), whole[u.name].read(model))


def test_heads_embeddings_and_routers_are_never_units():
    tied = make_tiny("llama")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "embed": nn.Embedding(8, 4), "lm_head": nn.Linear(4, 8)})
    assert [u.name for u in prunable_units(model)] == ["body"]
    moe = make_tiny("qwen2_moe")
    names = {u.module for u in prunable_units(moe)}
    assert not names & {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate", "lm_head"}


def test_a_weight_that_maps_to_no_unit_is_a_typed_error():
    model = make_tiny("llama")
    model.model.layers[1].mlp.register_parameter("mystery", nn.Parameter(torch.ones(4, 4)))
    with pytest.raises(UnsupportedArchitecture) as info:
        prunable_units(model)
    err = info.value
    assert (err.model_class, err.block, err.pattern) == ("LlamaForCausalLM", "model.layers.1",
                                                         "mlp.mystery: LlamaMLP parameter [4, 4]")
    assert isinstance(err, ConfigError) and isinstance(err, GraphError)


def test_a_torch_conv_in_a_block_is_refused():
    model = make_tiny("gpt2")
    model.transformer.h[0].mlp.add_module("conv", nn.Conv1d(4, 4, 3))
    with pytest.raises(UnsupportedArchitecture, match=r"transformer.h.0.*mlp.conv.weight: Conv1d parameter \[4, 4, 3\]"):
        prunable_units(model)


def test_unsupported_expert_layouts_are_refused_not_skipped():
    model = make_tiny("mixtral")
    model.model.layers[0].mlp.experts.is_transposed = True
    with pytest.raises(UnsupportedArchitecture, match=r"model.layers.0.*mlp.experts: MixtralExperts.*is_transposed"):
        prunable_units(model)
    model = make_tiny("mixtral")
    experts = model.model.layers[1].mlp.experts
    experts.register_parameter("gate_up_proj_bias", nn.Parameter(torch.zeros(4, 256)))
    with pytest.raises(UnsupportedArchitecture, match=r"mlp.experts.gate_up_proj_bias: MixtralExperts parameter"):
        prunable_units(model)


def test_decoder_blocks_error_is_typed():
    with pytest.raises(UnsupportedArchitecture, match="Linear: no decoder blocks"):
        decoder_blocks(nn.Linear(2, 2))


def test_unit_is_a_frozen_value():
    unit = PrunableUnit("a.b", "a.b", "weight", None, False, (2, 3))
    assert (unit.in_features, unit.out_features, unit.tensor_name, unit.kind) == (3, 2, "a.b.weight", "linear")
    with pytest.raises(AttributeError):
        unit.name = "x"  # type: ignore[misc]
