"""Shared fixtures: a seeded generator, a tiny random Llama, hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def make_tiny_llama(**overrides):
    """A random LlamaForCausalLM small enough for unit tests (2 layers, hidden 64, GQA 4 heads / 2 KV)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    params.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**params))
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


TINY_VOCAB = 384


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (384 tokens: 256 bytes, 3 specials, 125 merges) trained on Emma in ~0.2 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pruning_core.lm.text import load_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([load_text("emma")[:100_000]], trainer)
    assert tok.get_vocab_size() == TINY_VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    """``(model, tokenizer)``: a random 2-layer Llama whose vocabulary is the tiny tokenizer's."""
    return make_tiny_llama(
        vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2
    ), tiny_tokenizer


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_lm):
    """A plain ``save_pretrained`` directory of :func:`tiny_lm` (no manifest)."""
    model, tokenizer = tiny_lm
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir_session(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama + tokenizer directory shared by a session's (read-only) users."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (temporary SQLite database) shared by the session's flow and API tests."""
    from flows.runtime import configure_environment

    configure_environment()  # before Prefect reads its settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store; flows pick it up through MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return uri
