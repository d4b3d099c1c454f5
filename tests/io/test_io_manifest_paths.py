"""io.manifest and io.paths: checksummed run directories and the one place for file names."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from pruning_core.errors import ArtifactError
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_write_text
from pruning_core.io.manifest import MANIFEST_NAME, Manifest, checksum
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


def _every_path(root):
    """Every name io.paths knows, for one layer, candidate, block and round."""
    return [
        paths.job_record(root), paths.run_lock(root), paths.manifest(root), paths.config(root), paths.timings(root),
        paths.summary(root), paths.inputs(root), paths.windows(root), paths.perplexity(root, "before"),
        paths.perplexity(root, "after"), paths.model(root), paths.stats(root), paths.hessians(root),
        paths.layer_scores(root, "model.layers.0.mlp.up_proj"), paths.global_selection(root),
        paths.block_inputs(root, 3), paths.block_stats(root, 3), paths.block_hessians(root, 3), paths.masks(root), paths.layers_table(root),
        paths.sparse_export(root), paths.scores_table(root), paths.candidate_plan(root, "L2-H64-F64-Q4-KV2"),
        paths.candidate_result(root, "L2-H64-F64-Q4-KV2"), paths.chosen(root), paths.tickets(root, "0123abcd"),
        paths.round_record(root, 3), paths.accuracy_figure(root), paths.quantized_block(root, 3),
        paths.layer_quantized(root, "model.layers.0.mlp.up_proj"),
        paths.quantized_model(root), paths.dequantized_model(root), paths.quantization_report(root), paths.speed(root),
        paths.allocation(root), paths.allocation_targets(root), paths.allocation_figure(root),
        paths.search_state(root), paths.search_variants(root, 3), paths.input_model(root), paths.global_plan(root),
        paths.recovery_state(root), paths.recovery_curve(root), paths.recovery_figure(root),
    ]  # fmt: skip


def test_paths_are_distinct_and_inside_the_run_dir(tmp_path):
    files = _every_path(tmp_path)
    assert len(set(files)) == len(files)
    assert all(tmp_path in f.parents for f in files)
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    assert {"job.json", "manifest.json", "summary.json", "windows.safetensors", "perplexity_before.json",
            "layers.json", "scores.parquet", "block_inputs/003.safetensors", "stats/block_003.parquet",
            "candidates/L2-H64-F64-Q4-KV2/plan.json", "tickets/0123abcd", "rounds/round_003.json",
            "search/state.json", "search/variants/unit_003.safetensors"} <= names
    assert paths.manifest(tmp_path).name == MANIFEST_NAME  # the name io.manifest writes
    assert (
        paths.layer_scores(tmp_path, "model.layers.0.mlp.up_proj").name
        == "model.layers.0.mlp.up_proj.safetensors"
    )


def test_every_public_function_is_covered():
    names = {n for n, f in vars(paths).items() if callable(f) and not n.startswith("_") and f.__module__ == paths.__name__}
    called = {p for p in _every_path.__code__.co_names} | {"perplexity"}
    assert names <= called, names - called


@pytest.mark.parametrize("layer", ["", "..", "a/b", "../x", "a\\b"])
def test_layer_names_that_would_leave_the_directory_are_refused(tmp_path, layer):
    with pytest.raises(ArtifactError):
        paths.layer_scores(tmp_path, layer)
    with pytest.raises(ArtifactError):
        paths.candidate_plan(tmp_path, layer)


@pytest.mark.parametrize("index", [-1, 1.5, True])
def test_block_and_round_indices_must_be_non_negative_ints(tmp_path, index):
    for name in (paths.block_inputs, paths.block_stats, paths.block_hessians, paths.round_record):
        with pytest.raises(ArtifactError):
            name(tmp_path, index)


def test_perplexity_is_before_or_after(tmp_path):
    with pytest.raises(ArtifactError, match="'before' or 'after'"):
        paths.perplexity(tmp_path, "during")
