"""lm.text: corpora in every supported format, tokenization, calibration and evaluation windows."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.errors import ArtifactError, ConfigError, ShapeMismatch
from pruning_core.lm.text import (
    calibration_windows,
    evaluation_windows,
    load_text,
    shipped_text_path,
    start_tokens,
    text_windows,
    tokenize_corpus,
)


@pytest.mark.parametrize(
    ("name", "opening", "min_chars"),
    [("emma", "EMMA", 800_000), ("pride_and_prejudice", "PRIDE AND PREJUDICE", 650_000)],
)
def test_shipped_texts_are_package_data(name, opening, min_chars):
    path = shipped_text_path(name)
    assert path.is_file() and "pruning_core" in path.parts and path.parent.name == "data"
    text = load_text(name)
    assert text.lstrip().startswith(opening)
    assert len(text) > min_chars


def test_txt_and_gz_read_the_same(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\nworld\n", encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("héllo\nworld\n")
    assert load_text(tmp_path / "a.txt") == load_text(str(tmp_path / "a.txt.gz")) == "héllo\nworld\n"


def test_jsonl_joins_documents_with_a_blank_line_and_skips_blank_lines(tmp_path):
    rows = [{"text": "one", "id": 1}, {"text": "two\nlines"}, {"body": "x", "text": "three"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_text(tmp_path / "d.jsonl") == "one\n\ntwo\nlines\n\nthree"
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "b1"}) + "\n" + json.dumps({"body": "b2"}) + "\n")
    assert load_text(tmp_path / "e.jsonl", field="body") == "b1\n\nb2"
    with gzip.open(tmp_path / "f.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert load_text(tmp_path / "f.jsonl.gz") == "zipped"


def test_jsonl_errors_name_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ConfigError, match="line 2 has no string field 'text'"):
        load_text(tmp_path / "d.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ArtifactError, match="line 2 is not valid JSON"):
        load_text(tmp_path / "bad.jsonl")


def test_parquet_column_and_nulls(tmp_path):
    pq.write_table(pa.table({"text": ["a b", None, "c"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert load_text(tmp_path / "d.parquet") == "a b\n\nc"
    with pytest.raises(ConfigError, match=r"no column 'body'; columns: \['text', 'n'\]"):
        load_text(tmp_path / "d.parquet", field="body")
    with pytest.raises(ConfigError, match="holds int"):
        load_text(tmp_path / "d.parquet", field="n")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ArtifactError, match="bad.parquet"):
        load_text(tmp_path / "bad.parquet")


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_text(tmp_path / "a.csv")
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_text("wikitext2")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="unknown shipped text"):
        shipped_text_path("war_and_peace")


def test_tokenize_corpus_adds_no_special_tokens(tiny_tokenizer):
    text = "It was a truth universally acknowledged.\n\nEmma Woodhouse"
    ids = tokenize_corpus(tiny_tokenizer, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.bos_token_id not in ids.tolist()
    assert tiny_tokenizer.decode(ids) == text


@given(
    n_tokens=st.integers(2, 60), length=st.integers(2, 60), n=st.integers(1, 20), seed=st.integers(0, 10**6)
)
def test_calibration_windows_are_contiguous_slices_and_reproducible(n_tokens, length, n, seed):
    tokens = torch.arange(1000, 1000 + n_tokens)  # distinct ids: a window's start is its first id - 1000
    if length > n_tokens:
        with pytest.raises(ConfigError, match=f"has {n_tokens} tokens.*{n} windows x {length} tokens"):
            calibration_windows(tokens, n, length, seed)
        return
    w = calibration_windows(tokens, n, length, seed)
    assert w.shape == (n, length) and w.dtype == torch.long
    starts = w[:, 0] - 1000
    assert bool((starts >= 0).all()) and bool((starts <= n_tokens - length).all())
    assert torch.equal(w, starts[:, None] + 1000 + torch.arange(length))
    assert torch.equal(w, calibration_windows(tokens, n, length, seed))


def test_calibration_windows_follow_the_seed_and_reach_both_ends():
    tokens = torch.arange(10)
    a = calibration_windows(tokens, 200, 4, seed=0)
    assert not torch.equal(a, calibration_windows(tokens, 200, 4, seed=1))
    assert set(a[:, 0].tolist()) == set(range(7))  # every start in [0, N - L] occurs
    expected = torch.randint(0, 7, (200,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[:, 0], expected)


def test_evaluation_windows_are_the_first_tokens_without_overlap():
    tokens = torch.arange(100)
    w = evaluation_windows(tokens, 3, 7)
    assert w.tolist() == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21))]
    assert torch.equal(evaluation_windows(tokens, 4, 25).reshape(-1), tokens)
    w[0, 0] = -1
    assert tokens[0] == 0  # a copy, not a view


def test_too_short_text_names_the_numbers():
    with pytest.raises(
        ConfigError, match=r"pride has 100 tokens, too short for 64 windows x 256 tokens \(needs 16384\)"
    ):
        evaluation_windows(torch.arange(100), 64, 256, what="pride")
    with pytest.raises(ConfigError, match="needs 101"):
        evaluation_windows(torch.arange(100), 1, 101)


@pytest.mark.parametrize(
    ("n", "length", "field"), [(0, 8, "'n'"), (2, 1, "'length'"), (2.0, 8, "'n'"), (True, 8, "'n'")]
)
def test_bad_window_requests(n, length, field):
    with pytest.raises(ConfigError, match=field):
        calibration_windows(torch.arange(100), n, length, seed=0)
    with pytest.raises(ConfigError, match=field):
        evaluation_windows(torch.arange(100), n, length)


def test_tokens_must_be_one_dimensional():
    with pytest.raises(ShapeMismatch):
        evaluation_windows(torch.arange(100).reshape(10, 10), 1, 4)


def test_undecodable_or_corrupt_text_is_an_artifact_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ArtifactError, match="latin1.txt"):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(ArtifactError, match="bad.txt.gz"):
        load_text(tmp_path / "bad.txt.gz")


# ------------------------------------------------------------------ windows start as the model expects
@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, but starting every sequence with ``<s>`` (id 1), as Gemma's and Llama's do."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tiny_tokenizer.backend_tokenizer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_start_tokens_come_from_the_tokenizer(tiny_tokenizer, bos_tokenizer):
    assert start_tokens(tiny_tokenizer) == ()
    assert start_tokens(bos_tokenizer) == (1,)
    assert bos_tokenizer("Emma")["input_ids"][0] == 1
    assert torch.equal(tokenize_corpus(bos_tokenizer, "Emma"), tokenize_corpus(tiny_tokenizer, "Emma"))  # no BOS


def _old_calibration_windows(tokens, n, length, seed):
    """The windows before start tokens existed (kept bit for bit for tokenizers without BOS)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length + 1, (n,), generator=generator)
    return tokens[starts[:, None] + torch.arange(length)]


def test_windows_without_start_tokens_are_unchanged_bit_for_bit():
    tokens = torch.arange(1000) * 7 % 383
    assert torch.equal(calibration_windows(tokens, 9, 32, 5), _old_calibration_windows(tokens, 9, 32, 5))
    assert torch.equal(calibration_windows(tokens, 9, 32, 5, start=()), _old_calibration_windows(tokens, 9, 32, 5))
    assert torch.equal(evaluation_windows(tokens, 4, 50, start=()), tokens[:200].reshape(4, 50))


def test_windows_with_a_bos_hold_it_plus_length_minus_one_text_tokens():
    tokens = torch.arange(3, 1003)
    cal = calibration_windows(tokens, 6, 16, 2, start=(1,))
    assert cal.shape == (6, 16) and bool((cal[:, 0] == 1).all())
    assert torch.equal(cal[:, 1:], _old_calibration_windows(tokens, 6, 15, 2))  # same draws, 15 text tokens
    ev = evaluation_windows(tokens, 4, 16, start=(1,))
    assert torch.equal(ev[:, 0], torch.ones(4, dtype=torch.long))
    assert torch.equal(ev[:, 1:], tokens[:60].reshape(4, 15))  # consecutive, nothing skipped
    with pytest.raises(ConfigError, match="needs 75"):
        evaluation_windows(tokens[:70], 5, 16, start=(1,))
    with pytest.raises(ConfigError, match="hold the 2 start tokens"):
        calibration_windows(tokens, 1, 2, 0, start=(1, 2))


def test_text_windows_start_every_window_as_the_tokenizer_does(tmp_path, tiny_tokenizer, bos_tokenizer):
    text = tmp_path / "t.txt"
    text.write_text(load_text("emma")[:20_000], encoding="utf-8")
    tokens = tokenize_corpus(tiny_tokenizer, load_text(text))
    plain = text_windows(tiny_tokenizer, text, 5, 24, kind="calibration", seed=4)
    assert torch.equal(plain, calibration_windows(tokens, 5, 24, 4))
    with_bos = text_windows(bos_tokenizer, text, 5, 24, kind="calibration", seed=4)
    assert bool((with_bos[:, 0] == 1).all()) and torch.equal(with_bos[:, 1:], calibration_windows(tokens, 5, 23, 4))
    ev = text_windows(bos_tokenizer, text, 3, 24, kind="evaluation")
    assert torch.equal(ev, evaluation_windows(tokens, 3, 24, start=(1,)))
    with pytest.raises(ConfigError, match="kind"):
        text_windows(tiny_tokenizer, text, 1, 8, kind="train")  # type: ignore[arg-type]
