"""io.manifest and io.paths: checksummed run directories and the one place for file names."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from pruning_core.errors import ArtifactError
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_write_text
from pruning_core.io.manifest import Manifest, checksum
from pruning_core.io.tensors import save_tensors


def test_record_and_verify_round_trip(tmp_path):
    save_tensors(paths.hessians(tmp_path), {"h": torch.eye(3)})
    m = Manifest(tmp_path)
    entry = m.record("hessians", paths.hessians(tmp_path), kind="hessians")
    assert entry.path == "hessians.safetensors" and entry.kind == "hessians"
    assert entry.bytes == paths.hessians(tmp_path).stat().st_size
    raw = json.loads(paths.manifest(tmp_path).read_text())
    assert raw["artifacts"]["hessians"]["sha256"] == entry.sha256
    Manifest(tmp_path).verify()  # a fresh instance reads the file
    assert Manifest(tmp_path).is_complete("hessians")
    assert Manifest(tmp_path).path("hessians") == paths.hessians(tmp_path).resolve()


def test_same_size_modification_is_detected(tmp_path):
    f = atomic_write_text(tmp_path / "summary.json", '{"a": 1}')
    m = Manifest(tmp_path)
    m.record("summary", f)
    f.write_text('{"a": 2}')  # same length, different bytes
    with pytest.raises(ArtifactError, match="fails its checksum"):
        m.verify()
    m.verify(checksums=False)  # sizes alone cannot see it
    assert not m.is_complete("summary")


def test_truncated_and_missing_files_are_detected(tmp_path):
    f = atomic_write_text(tmp_path / "a.txt", "hello")
    m = Manifest(tmp_path)
    m.record("a", f)
    f.write_text("hell")
    with pytest.raises(ArtifactError, match="4 bytes, the manifest recorded 5"):
        m.verify(checksums=False)
    f.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        m.verify()
    assert not m.is_complete("a")
    assert not m.is_complete("never-recorded")


def test_directory_artifacts_use_a_tree_hash(tmp_path):
    d = paths.model(tmp_path)
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "sub").mkdir()
    (d / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    m = Manifest(tmp_path)
    m.record("model", d, kind="model")
    m.verify()
    (d / "sub" / "w.bin").write_bytes(b"\x01" * 10)
    with pytest.raises(ArtifactError, match="checksum"):
        m.verify(["model"])
    digest, size = checksum(d)
    assert size == 12


def test_names_and_paths_cannot_escape(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    run = tmp_path / "run"
    m = Manifest(run)
    with pytest.raises(ArtifactError, match="not inside"):
        m.record("x", outside)
    with pytest.raises(ArtifactError, match="not inside"):
        m.record("x", "../outside.txt")
    with pytest.raises(ArtifactError):
        Manifest(run, name="../manifest.json")
    # A tampered manifest that points outside is refused on verify.
    run.mkdir(exist_ok=True)
    paths.manifest(run).write_text(
        json.dumps(
            {
                "version": 1,
                "artifacts": {"x": {"path": "../outside.txt", "sha256": "0", "bytes": 1, "kind": "f"}},
            }
        )
    )
    with pytest.raises(ArtifactError, match="inside"):
        Manifest(run).verify()


def test_unknown_name_and_malformed_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no artifact named 'masks'"):
        Manifest(tmp_path).verify(["masks"])
    paths.manifest(tmp_path).write_text("{broken")
    with pytest.raises(ArtifactError, match="malformed manifest"):
        Manifest(tmp_path).entries()


def test_concurrent_records_lose_nothing(tmp_path):
    for i in range(12):
        (tmp_path / f"f{i}").write_text(str(i))

    def record(i):
        Manifest(tmp_path).record(f"f{i}", tmp_path / f"f{i}")

    threads = [threading.Thread(target=record, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(Manifest(tmp_path).entries()) == sorted(f"f{i}" for i in range(12))


def test_paths_are_distinct_and_inside_the_run_dir(tmp_path):
    files = [
        paths.manifest(tmp_path), paths.config(tmp_path), paths.summary(tmp_path), paths.stats(tmp_path),
        paths.hessians(tmp_path), paths.masks(tmp_path), paths.layers_table(tmp_path), paths.model(tmp_path),
        paths.sparse_export(tmp_path), paths.scores_dir(tmp_path), paths.round_dir(tmp_path, 3),
        paths.layer_scores(tmp_path, "model.layers.0.mlp.up_proj"),
    ]  # fmt: skip
    assert len(set(files)) == len(files)
    assert all(tmp_path in f.parents for f in files)
    assert (
        paths.layer_scores(tmp_path, "model.layers.0.mlp.up_proj").name
        == "model.layers.0.mlp.up_proj.safetensors"
    )
    assert paths.round_dir(tmp_path, 3).name == "003"


@pytest.mark.parametrize("layer", ["", "..", "a/b", "../x", "a\\b"])
def test_layer_names_that_would_leave_the_directory_are_refused(tmp_path, layer):
    with pytest.raises(ArtifactError):
        paths.layer_scores(tmp_path, layer)


@pytest.mark.parametrize("index", [-1, 1.5, True])
def test_round_index_must_be_a_non_negative_int(tmp_path, index):
    with pytest.raises(ArtifactError):
        paths.round_dir(tmp_path, index)
