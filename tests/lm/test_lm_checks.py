"""lm.checks: only decoder-only causal LMs, the stored dtype, window lengths, all before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch

from pruning_core.errors import ConfigError, UnsupportedArchitecture
from pruning_core.lm import models
from pruning_core.lm.checks import (
    check_causal_lm,
    check_window_length,
    inspect_model,
    read_config,
    stored_dtype,
)
from pruning_core.lm.models import load_causal_lm
from tests.tiny_models import ARCHITECTURES, save_tiny, tiny_config


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if loading reaches the tokenizer or the weights: the config check must come first."""

    def forbidden():
        raise AssertionError("the tokenizer or the weights were read before the architecture check")

    monkeypatch.setattr(models, "offline_transformers", forbidden)


def _bert_dir(tmp_path, tokenizer, cls_name="BertForMaskedLM", **config):
    import transformers

    cfg = transformers.BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, **config)
    out = tmp_path / "bert"
    getattr(transformers, cls_name)(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_saved_bert_is_refused_from_its_config(tmp_path, tiny_tokenizer, no_weights):
    with pytest.raises(UnsupportedArchitecture, match="BertForMaskedLM.*not a causal language model") as info:
        load_causal_lm(_bert_dir(tmp_path, tiny_tokenizer))
    assert info.value.model_class == "BertForMaskedLM"


def test_a_bert_lm_head_that_is_not_a_decoder_is_bidirectional(tmp_path, tiny_tokenizer, no_weights):
    with pytest.raises(UnsupportedArchitecture, match="BertLMHeadModel.*bidirectional encoder"):
        load_causal_lm(_bert_dir(tmp_path, tiny_tokenizer, "BertLMHeadModel"))


def test_encoder_decoder_and_non_lm_configs_are_refused():
    import transformers

    with pytest.raises(UnsupportedArchitecture, match="encoder-decoder"):
        check_causal_lm(transformers.T5Config())
    with pytest.raises(UnsupportedArchitecture, match="LlamaForSequenceClassification"):
        check_causal_lm(tiny_config("llama", architectures=["LlamaForSequenceClassification"]))
    with pytest.raises(UnsupportedArchitecture, match="no causal-LM class"):
        check_causal_lm(transformers.ViTConfig())


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_every_tiny_family_is_a_causal_lm(family):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    with torch.device("meta"):
        config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    check_causal_lm(config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_a_model_loads_in_its_stored_dtype_unless_told(tmp_path, tiny_tokenizer, dtype):
    out = save_tiny(tmp_path / "m", "qwen2", tiny_tokenizer, dtype=dtype)
    assert stored_dtype(out) == dtype
    model, _ = load_causal_lm(out)
    assert {p.dtype for p in model.parameters()} == {dtype}
    model, _ = load_causal_lm(out, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_without_a_config_dtype_the_safetensors_dtype_decides(tmp_path, tiny_tokenizer):
    out = save_tiny(tmp_path / "m", "llama", tiny_tokenizer, dtype=torch.bfloat16)
    raw = json.loads((out / "config.json").read_text())
    raw.pop("dtype", None)
    raw.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(raw))
    assert stored_dtype(out) == torch.bfloat16


def test_window_length_beyond_the_positions_is_a_config_error():
    check_window_length(tiny_config("llama"), 256)
    with pytest.raises(ConfigError, match=r"257 tokens exceed .*max_position_embeddings = 256") as info:
        check_window_length(tiny_config("llama"), 257)
    assert info.value.field == "window_length"
    with pytest.raises(ConfigError, match="max_position_embeddings = 256") as info:  # GPT-2 maps n_positions
        check_window_length(tiny_config("gpt2"), 512, field="evaluation.window_length")
    assert info.value.field == "evaluation.window_length"


def test_inspect_model_checks_everything_up_front(tmp_path, tiny_tokenizer):
    out = save_tiny(tmp_path / "g", "gpt2", tiny_tokenizer, dtype=torch.bfloat16)
    info = inspect_model(out, job="oneshot", window_lengths={"calibration.window_length": 128})
    assert info.dtype == torch.bfloat16 and info.support is not None and info.support.oneshot
    assert read_config(out).model_type == "gpt2"
    with pytest.raises(ConfigError, match="calibration.window_length"):
        inspect_model(out, window_lengths={"calibration.window_length": 300})
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel in block 'transformer.h.0'"):
        inspect_model(out, job="minitron")
