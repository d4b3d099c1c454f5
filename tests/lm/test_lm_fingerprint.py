"""lm.fingerprint: from the content (never a stale manifest), memoized per file in the cache root."""

from __future__ import annotations

import os
import shutil

import pytest

from pruning_core.errors import ArtifactError
from pruning_core.io.manifest import Manifest
from pruning_core.lm import fingerprint
from pruning_core.lm.fingerprint import model_fingerprint
from pruning_core.lm.models import save_pretrained_atomic


@pytest.fixture
def saved(tmp_path, tiny_lm):
    model, tok = tiny_lm
    return save_pretrained_atomic(model, tok, tmp_path / "m")


@pytest.fixture
def hashed_files(monkeypatch):
    calls = []
    real = fingerprint.sha256_file
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p: calls.append(os.path.basename(p)) or real(p))
    return calls


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_stale_manifest_does_not_hide_a_modified_model(saved, tmp_path):
    cache = tmp_path / "cache"
    before = model_fingerprint(saved, cache_dir=cache)
    _flip_last_byte(saved / "model.safetensors")  # same size: a manifest check without checksums passes
    Manifest(saved).verify(checksums=False)
    after = model_fingerprint(saved, cache_dir=cache)
    assert after != before
    assert after == model_fingerprint(saved, memo=False)  # the memo agrees with hashing every byte


def test_the_fingerprint_ignores_the_manifest_itself(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    (copy / "manifest.json").unlink()
    assert model_fingerprint(copy, memo=False) == model_fingerprint(saved, memo=False)


def test_files_are_hashed_once_until_they_change(saved, tmp_path, hashed_files):
    cache = tmp_path / "cache"
    first = model_fingerprint(saved, cache_dir=cache)
    assert "model.safetensors" in hashed_files and (cache / fingerprint.MEMO_NAME).is_file()
    hashed_files.clear()
    assert model_fingerprint(saved, cache_dir=cache) == first and hashed_files == []
    weights = saved / "model.safetensors"
    stat = weights.stat()
    _flip_last_byte(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: ctime still moves
    assert model_fingerprint(saved, cache_dir=cache) != first
    assert hashed_files == ["model.safetensors"]


def test_an_unusable_memo_only_costs_time(saved, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    assert model_fingerprint(saved, cache_dir=blocker) == model_fingerprint(saved, memo=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / fingerprint.MEMO_NAME).write_text("{not json")
    assert model_fingerprint(saved, cache_dir=cache) == model_fingerprint(saved, memo=False)


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        model_fingerprint(tmp_path / "nope")
