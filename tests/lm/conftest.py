"""Fixtures for pruning_core.lm: a tiny BPE tokenizer trained on Emma, a tiny Llama that matches
it, a saved tiny model directory, and (slow tests only) the real SmolLM2-135M cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest import make_tiny_llama  # noqa: E402

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
def smollm2_path():
    """The converted SmolLM2-135M directory (converted once per cache, ~20-40 s; then ~0 s)."""
    from pruning_core.lm.smollm2 import smollm2_dir

    return smollm2_dir()
