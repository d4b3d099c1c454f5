"""The one-shot job's optional sparse export: the ``export`` task after ``assemble``, its
resumption through the manifest, summary.json and the MLflow run (artifacts under ``sparse/``)."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient
from safetensors import safe_open

from flows.jobs import parse_config
from flows.jobs import run_job as run_oneshot
from pruning_core.errors import ConfigError
from pruning_core.io.manifest import Manifest
from pruning_core.sparse import load_sparse_export
from tests.flows.oneshot_helpers import SMALL, tiny_job
from tests.legacy_ct import run_legacy_check

pytestmark = pytest.mark.flows


def _checkpoint(model_dir) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, with -0.0 and +0.0 at pruned positions counted as equal (the export stores +0.0)."""
    return torch.equal((a + 0.0).view(torch.int32), (b + 0.0).view(torch.int32))


def _forbid(monkeypatch, *names: str) -> None:
    import flows.llm as llm
    import flows.oneshot.tasks as tasks

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished stage was computed again")

    for name in names:
        monkeypatch.setattr(llm if name == "streaming_perplexity" else tasks, name, forbidden)


def test_export_is_added_to_a_finished_job_and_then_resumed(prefect_server, mlflow_uri, tiny_model_dir_session,
                                                             tmp_path, monkeypatch):
    plain = tiny_job(tiny_model_dir_session, method="wanda", pattern="2:4")
    first = run_oneshot(plain, tmp_path / "run")
    assert first["sparse_export"] is None and first["sparse_export_size"] is None
    assert "export" not in first["seconds"]

    # Same job with an export: same job hash, so it resumes and only the export runs.
    job = tiny_job(tiny_model_dir_session, method="wanda", pattern="2:4", export={"sparse_format": "compressed_tensors"})
    assert job.job_hash() == plain.job_hash()
    with monkeypatch.context() as mp:
        _forbid(mp, "prune_one", "streaming_perplexity", "CheckpointWriter", "calibrate_blocks")
        summary = run_oneshot(job, tmp_path / "run")
    out = tmp_path / "run" / "sparse"
    assert summary["sparse_export"] == str(out) and summary["mlflow_run_id"] == first["mlflow_run_id"]
    size = summary["sparse_export_size"]
    assert size["format"] == "compressed_tensors" and size["layers"] == 14
    assert size["file_bytes"] == (out / "model.safetensors").stat().st_size
    assert 0.5 < size["size_ratio"] < 0.9  # pruned layers at ~0.53 of dense, the embedding dense
    assert summary["seconds"]["export"] >= 0.0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["sparse_export"] == str(out)
    assert "sparse_export" in Manifest(tmp_path / "run").entries()

    # The export holds exactly the pruned model's weights (lm_head is tied, not stored).
    pruned = _checkpoint(tmp_path / "run" / "model")
    loaded = load_sparse_export(out)
    assert set(loaded) == set(pruned)
    assert all(_same_bits(loaded[k], pruned[k]) for k in pruned)
    assert {"tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}

    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["sparse_export_size_ratio"] == pytest.approx(size["size_ratio"])
    assert run.data.metrics["sparse_export_bytes"] == size["file_bytes"]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "sparse")}
    assert {"sparse/sparse_index.json", "sparse/model.safetensors", "sparse/config.json"} <= files
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # Run again: nothing is computed, not even the export.
    with monkeypatch.context() as mp:
        _forbid(mp, "prune_one", "streaming_perplexity", "CheckpointWriter", "export_sparse")
        again = run_oneshot(job, tmp_path / "run")
    assert again["sparse_export_size"] == size


def test_library_decompresses_the_flow_export(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    """compressed-tensors' own decompressor (0.13, the last release that reads the legacy 2:4
    layout: tests/legacy_ct.py) reads the flow's export back into every pruned weight."""
    job = tiny_job(tiny_model_dir_session, method="magnitude", pattern="2:4",
                   export={"sparse_format": "compressed_tensors"},
                   evaluation={**SMALL["evaluation"], "enabled": False})
    summary = run_oneshot(job, tmp_path / "run")
    reference = tmp_path / "run" / "model" / "model.safetensors"
    assert run_legacy_check("decompress", summary["sparse_export"], reference) == "ok"


def test_csr_export_of_an_unstructured_job(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    job = tiny_job(tiny_model_dir_session, method="magnitude", sparsity=0.6, export={"sparse_format": "csr"},
                   evaluation={**SMALL["evaluation"], "enabled": False})
    summary = run_oneshot(job, tmp_path / "run")
    pruned = _checkpoint(tmp_path / "run" / "model")
    loaded = load_sparse_export(summary["sparse_export"])
    assert all(_same_bits(loaded[k], pruned[k]) for k in pruned)
    index = json.loads((tmp_path / "run" / "sparse" / "sparse_index.json").read_text())
    layouts = {n: e["layout"] for n, e in index["tensors"].items()}
    assert sum(v == "csr" for v in layouts.values()) == 14 and layouts["model.embed_tokens.weight"] == "dense"
    # 40% kept with int32 indices: 8 bytes per kept fp32 value, so the pruned layers shrink to ~0.8
    assert summary["sparse_export_size"]["size_ratio"] < 1.0


@pytest.mark.parametrize("fmt", ["semi_structured", "compressed_tensors"])
def test_two_four_export_needs_a_two_four_pattern(fmt):
    with pytest.raises(ConfigError, match=rf"export.sparse_format.*{fmt} stores 2:4 sparsity only") as err:
        parse_config({"method": "wanda", "sparsity": 0.5, "export": {"sparse_format": fmt}}, "job.yaml")
    assert err.value.field == "export.sparse_format"
    with pytest.raises(ConfigError, match="sparse_format"):
        parse_config({"method": "wanda", "pattern": "2:4", "export": {"sparse_format": "bsr"}}, "job.yaml")
    parse_config({"method": "wanda", "pattern": "2:4", "export": {"sparse_format": fmt}})  # accepted
