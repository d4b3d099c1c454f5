"""arch.support: which job supports which family, decided from a config alone (meta skeleton)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pruning_core.arch import FAMILIES, architecture_support, meta_model, require_architecture
from pruning_core.errors import ConfigError, UnsupportedArchitecture
from tests.tiny_models import ARCHITECTURES, LLAMA_LIKE, make_tiny, tiny_config


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_every_tiny_family_supports_oneshot_and_llama_like_ones_minitron(family):
    support = architecture_support(tiny_config(family))
    assert support.tested and support.family is FAMILIES[support.model_type]
    assert support.oneshot
    assert support.minitron == (family in LLAMA_LIKE)
    require_architecture(tiny_config(family), "oneshot")


def test_the_config_check_reads_no_weights():
    model = meta_model(tiny_config("mixtral"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_minitron_on_another_family_names_class_block_and_pattern():
    with pytest.raises(UnsupportedArchitecture) as info:
        require_architecture(tiny_config("gpt2"), "minitron")
    err = info.value
    assert err.model_class == "GPT2LMHeadModel" and err.block == "transformer.h.0"
    assert err.pattern == "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"
    assert "Llama-like" in str(err) and "GPT-2" in str(err)


def test_a_model_that_does_not_map_is_refused_for_every_job():
    model = make_tiny("qwen3")
    model.model.layers[0].self_attn.register_parameter("table", nn.Parameter(torch.zeros(3, 3)))
    support = architecture_support(model)
    assert not support.oneshot and not support.minitron
    with pytest.raises(UnsupportedArchitecture, match=r"model.layers.0.*self_attn.table: Qwen3Attention parameter"):
        require_architecture(model, "oneshot")


def test_an_encoder_has_no_decoder_blocks():
    from transformers import BertConfig

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)
    support = architecture_support(config)
    assert not support.oneshot
    assert "no decoder blocks" in str(support.errors["oneshot"])


def test_an_untested_family_that_maps_is_accepted_with_a_warning(caplog):
    from transformers import GemmaConfig

    config = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with caplog.at_level(logging.WARNING, logger="pruning_core.arch.support"):
        support = require_architecture(config, "oneshot")
    assert support.oneshot and not support.tested and not support.minitron
    assert "not among the tested families" in caplog.text


def test_unknown_job():
    with pytest.raises(ConfigError, match="unknown job 'lottery'"):
        require_architecture(tiny_config("llama"), "lottery")  # type: ignore[arg-type]
