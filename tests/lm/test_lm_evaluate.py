"""lm.evaluate: perplexity against hand-computed references; greedy generation with a KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pruning_core.errors import ConfigError, NumericalInstability, ShapeMismatch
from pruning_core.lm.evaluate import generate_text, perplexity
from tests.conftest import make_tiny_llama
from tests.lm.conftest import TINY_VOCAB


def _windows(n, length, seed=0, vocab=TINY_VOCAB):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _prefix_reference(model, windows):
    """exp(mean NLL) where token t of each window is scored by a separate forward of its prefix 0..t-1."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            for t in range(1, len(w)):
                logits = model(w[None, :t]).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, dim=-1)[w[t]])
                count += 1
    return math.exp(nll / count)


def _wanda_reference(model, windows, bs):
    """Transcription of locuslab/wanda lib/eval.py eval_ppl_wikitext (seqlen = window length)."""
    nsamples, seqlen = windows.shape
    nlls = []
    with torch.no_grad():
        for i in range(0, nsamples, bs):
            j = min(i + bs, nsamples)
            inputs = windows[i:j]
            lm_logits = model(inputs).logits
            shift_logits = lm_logits[:, :-1, :].contiguous()
            shift_labels = inputs[:, 1:]
            loss = nn.CrossEntropyLoss()(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1)
            )
            nlls.append(loss.float() * seqlen * (j - i))
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


def test_perplexity_equals_prefix_by_prefix_cross_entropy(tiny_lm):
    model, _ = tiny_lm
    windows = _windows(3, 9)
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(
        _prefix_reference(model, windows), rel=1e-5
    )


def test_perplexity_matches_the_wanda_reference(tiny_lm):
    model, _ = tiny_lm
    windows = _windows(7, 16, seed=1)
    ours = perplexity(model, windows, batch_size=4, progress=False)
    assert ours == pytest.approx(_wanda_reference(model, windows, bs=1), rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size(tiny_lm):
    model, _ = tiny_lm
    windows = _windows(7, 12, seed=2)
    values = [perplexity(model, windows, batch_size=b, progress=False) for b in (1, 3, 7, 100)]
    assert max(values) - min(values) <= 1e-6 * values[0]


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size():
    model = make_tiny_llama(vocab_size=50, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity(model, _windows(4, 10, vocab=50), progress=False) == pytest.approx(
        50.0, rel=1e-6
    )  # float32 cross-entropy


def test_out_of_vocabulary_ids_fail_before_any_forward(tiny_lm):
    model, _ = tiny_lm
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    windows = _windows(2, 8)
    windows[1, 3] = TINY_VOCAB
    with pytest.raises(ConfigError, match=rf"\[0, {TINY_VOCAB - 1}\].*got \[\d+, {TINY_VOCAB}\]"):
        perplexity(model, windows, progress=False)
    assert calls == []


@pytest.mark.parametrize(
    ("windows", "error"),
    [
        (torch.zeros(8, dtype=torch.long), ShapeMismatch),
        (torch.zeros(2, 8), ConfigError),
        (torch.zeros(2, 1, dtype=torch.long), ConfigError),
        (torch.zeros(0, 8, dtype=torch.long), ConfigError),
    ],
)
def test_malformed_windows(tiny_lm, windows, error):
    with pytest.raises(error):
        perplexity(tiny_lm[0], windows, progress=False)


def test_bad_batch_size(tiny_lm):
    with pytest.raises(ConfigError, match="batch_size"):
        perplexity(tiny_lm[0], _windows(2, 4), batch_size=0, progress=False)


def test_int32_windows_are_accepted(tiny_lm):
    model, _ = tiny_lm
    w = _windows(2, 8)
    assert perplexity(model, w.int(), progress=False) == perplexity(model, w, progress=False)


def test_nan_weights_raise_numerical_instability_naming_the_windows(tiny_lm):
    model, _ = tiny_lm
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalInstability, match=r"windows 0\.\.2"):
        perplexity(model, _windows(5, 8), batch_size=3, progress=False)


def _greedy_without_cache(model, ids, max_new, eos):
    out = ids
    with torch.no_grad():
        for _ in range(max_new):
            nxt = model(out, use_cache=False).logits[0, -1].argmax()
            out = torch.cat([out, nxt.view(1, 1)], dim=1)
            if int(nxt) == eos:
                break
    return out[0, ids.shape[1] :]


def test_generate_text_is_greedy_and_the_kv_cache_changes_nothing(tiny_lm):
    model, tok = tiny_lm
    prompt = "Emma Woodhouse, handsome, clever"
    text = generate_text(model, tok, prompt, max_new_tokens=12)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    expected = _greedy_without_cache(model, ids, 12, tok.eos_token_id)
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert len(expected) >= 1


def test_generate_text_checks_max_new_tokens(tiny_lm):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_text(*tiny_lm, "hi", max_new_tokens=0)
