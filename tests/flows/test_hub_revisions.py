"""Hub ids resolve through the local Hugging Face cache, and ``revision:`` pins a cached snapshot.

The cache is laid out by hand as ``huggingface_hub`` writes it: two snapshots of one repository
(a 2-layer and a 3-layer tiny Llama), ``refs/main`` pointing at the newer one and ``refs/v1`` at
the older. ``prune validate`` resolves the id, checks the resolved snapshot like any model
directory, and refuses an uncached model or revision with a ConfigError naming what is there.
"""

from __future__ import annotations

import time

import pytest
import yaml

from flows.cli import _parser, execute
from flows.hub import cached_revisions, resolve_model
from flows.jobs import parse_config
from pruning_core.errors import ArtifactError, ConfigError
from tests.conftest import TINY_VOCAB, make_tiny_llama

OLD, NEW = "a" * 40, "b" * 40
REPO_ID = "tiny-org/tiny-llama"


@pytest.fixture
def hub(tmp_path, tiny_tokenizer, monkeypatch):
    """A local hub cache holding two snapshots of ``tiny-org/tiny-llama``; HF_HUB_CACHE points at it."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    for commit, layers in ((OLD, 2), (NEW, 3)):
        model = make_tiny_llama(vocab_size=TINY_VOCAB, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
        model.save_pretrained(repo / "snapshots" / commit)
        tiny_tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(NEW)
    (repo / "refs" / "v1").write_text(OLD + "\n")
    (repo / "refs" / "broken").write_text("c" * 40)  # a ref whose snapshot never finished downloading
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def test_revisions_resolve_to_their_snapshots(hub):
    assert cached_revisions(hub) == {"main": NEW, "v1": OLD, OLD: OLD, NEW: NEW}
    assert resolve_model(REPO_ID) == (hub / "snapshots" / NEW).resolve()  # default: main
    assert resolve_model(REPO_ID, "main") == (hub / "snapshots" / NEW).resolve()
    assert resolve_model(REPO_ID, "v1") == (hub / "snapshots" / OLD).resolve()
    assert resolve_model(REPO_ID, OLD) == (hub / "snapshots" / OLD).resolve()


@pytest.mark.parametrize(("model", "revision", "field", "fragment"), [
    (REPO_ID, "v2", "revision", "'tiny-org/tiny-llama' has no revision 'v2' in the local hub cache"),
    (REPO_ID, "broken", "revision", f"cached revisions: main ({NEW}), v1 ({OLD}), {OLD}, {NEW}"),
    (REPO_ID, "c" * 40, "revision", "hf download tiny-org/tiny-llama --revision " + "c" * 40),
    ("tiny-org/not-downloaded", None, "model", "neither a directory nor a Hugging Face model in the local hub"),
    ("tiny-org/not-downloaded", "main", "model", "hf download tiny-org/not-downloaded"),
])
def test_uncached_models_and_revisions_are_config_errors(hub, model, revision, field, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_model(model, revision)
    assert err.value.field == field and fragment in str(err.value)


def test_a_revision_for_a_local_directory_is_refused(hub):
    with pytest.raises(ConfigError, match="is a local path; revision pins a Hugging Face hub id") as err:
        resolve_model(str(hub / "snapshots" / OLD), "main")
    assert err.value.field == "revision"


def _validate(tmp_path, **fields) -> str:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": REPO_ID, "method": "wanda", "sparsity": 0.5,
                                      "calibration": {"window_length": 32}, "evaluation": {"window_length": 32},
                                      **fields}))
    return str(config)


def test_prune_validate_resolves_and_checks_the_pinned_snapshot(hub, tmp_path, capsys):
    execute(_parser().parse_args(["validate", _validate(tmp_path, revision="v1")]))
    assert '"revision": "v1"' in capsys.readouterr().out
    start = time.monotonic()
    with pytest.raises(ConfigError, match="has no revision 'v9'") as err:
        execute(_parser().parse_args(["validate", _validate(tmp_path, revision="v9")]))
    assert err.value.field == "revision" and time.monotonic() - start < 5
    (hub / "snapshots" / OLD / "config.json").unlink()  # the pinned snapshot itself is checked
    with pytest.raises(ArtifactError, match="config.json"):
        execute(_parser().parse_args(["validate", _validate(tmp_path, revision="v1")]))
    execute(_parser().parse_args(["validate", _validate(tmp_path)]))  # main is intact


def test_the_job_reads_the_pinned_snapshot(hub, tmp_path):
    from flows import llm

    job = parse_config({"model": REPO_ID, "method": "wanda", "sparsity": 0.5, "revision": "v1"})
    assert llm.input_model(job, str(tmp_path / "run")) == str((hub / "snapshots" / OLD).resolve())
    job = parse_config({"model": REPO_ID, "method": "wanda", "sparsity": 0.5})
    assert llm.input_model(job, str(tmp_path / "run")) == str((hub / "snapshots" / NEW).resolve())
