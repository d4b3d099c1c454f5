"""The one-shot job end to end on a tiny random Llama: Prefect test server, SQLite MLflow store.

Asserts on what a user gets: the Parquet statistics, the masks, the pruned Hugging Face
directory, summary.json and the MLflow run; resumption; and clear errors before long work.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from flows.jobs import parse_config, run_job
from pruning_core.calibration import collect_activation_stats
from pruning_core.errors import ArtifactError, ConfigError, InvalidPattern, NumericalInstability
from pruning_core.io.manifest import Manifest
from pruning_core.io.masks import load_masks
from pruning_core.lm import load_causal_lm
from pruning_core.masks import NM

pytestmark = pytest.mark.flows

SMALL = {
    "calibration": {"num_windows": 8, "window_length": 32, "batch_size": 4},
    "evaluation": {"num_windows": 4, "window_length": 32, "batch_size": 4, "error_windows": 2},
    "device": "cpu",
}


def _job(model_dir, **fields):
    data = {"model": str(model_dir), **SMALL, **fields}
    job = parse_config(data, "test.yaml")
    return job.model_copy(update={"name": fields.get("name", "tiny")})


def _run(job, out):
    return run_job(job, out)


@pytest.fixture(scope="module")
def wanda_run(prefect_server, tiny_model_dir_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("wanda")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    job = _job(tiny_model_dir_session, method="wanda", sparsity=0.5)
    summary = _run(job, root / "run")
    yield job, root / "run", summary, uri
    mp.undo()


def test_summary_fields_and_values(wanda_run):
    job, run_dir, summary, _ = wanda_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["mlflow_run_id"] == summary["mlflow_run_id"]
    for key in ("method", "pattern", "sparsity", "perplexity_before", "perplexity_after", "mlflow_run_id",
                "seconds", "layers"):
        assert key in on_disk, key
    assert on_disk["method"] == "wanda" and on_disk["pattern"] == "unstructured" and on_disk["scope"] == "row"
    assert on_disk["sparsity"] == pytest.approx(0.5, abs=1e-9)  # every row of every layer loses exactly half
    assert 1.0 < on_disk["perplexity_before"] < 1e4 and 1.0 < on_disk["perplexity_after"] < 1e4
    names = [r["name"] for r in on_disk["layers"]]
    assert len(names) == 14 and "lm_head" not in names  # 2 blocks x 7 Linear layers; the head is never pruned
    assert all(0.0 < r["reconstruction_error"] < 1.0 for r in on_disk["layers"])
    for stage in ("prepare", "evaluate_dense", "calibrate", "prune", "assemble", "evaluate_pruned", "log", "total"):
        assert on_disk["seconds"][stage] >= 0.0, stage


def test_parquet_statistics_equal_a_direct_collection(wanda_run, tiny_model_dir_session):
    job, run_dir, summary, _ = wanda_run
    table = pq.read_table(run_dir / "stats.parquet")
    assert {"layer", "channel", "sum_sq", "sum_abs", "count"} <= set(table.column_names)
    meta = table.schema.metadata
    assert meta[b"job_hash"].decode() == job.job_hash() and b"model_fingerprint" in meta
    rows = table.to_pylist()
    assert {r["count"] for r in rows} == {8 * 32}  # every token of every calibration window
    layers = [r["name"] for r in summary["layers"]]
    assert sorted({r["layer"] for r in rows}) == sorted(layers)
    model, _ = load_causal_lm(tiny_model_dir_session)
    from pruning_core.io.tensors import load_tensors

    windows = load_tensors(run_dir / "windows.safetensors", ["calibration"])["calibration"]
    ctx = collect_activation_stats(model, list(windows.split(4)), layers=layers, progress=False)
    name = "model.layers.1.mlp.down_proj"
    mine = sorted((r["channel"], r["sum_sq"]) for r in rows if r["layer"] == name)
    assert torch.allclose(torch.tensor([v for _, v in mine], dtype=torch.float64), ctx.require_stats(name).sum_sq)


def test_masks_and_pruned_model(wanda_run, tiny_model_dir_session):
    _, run_dir, summary, _ = wanda_run
    masks = load_masks(run_dir / "masks.safetensors")
    assert set(masks) == {r["name"] for r in summary["layers"]}
    dense, _ = load_causal_lm(tiny_model_dir_session)
    pruned, _ = load_causal_lm(run_dir / "model")
    for name, mask in masks.items():
        assert (mask.sum(dim=1) == mask.shape[1] // 2).all(), name  # Wanda's per-output-row groups
        w, w0 = pruned.get_submodule(name).weight, dense.get_submodule(name).weight
        assert torch.equal(w, w0 * mask)  # Wanda only masks: kept weights are unchanged
    assert torch.equal(pruned.lm_head.weight, dense.lm_head.weight)


def test_mlflow_run(wanda_run):
    job, run_dir, summary, uri = wanda_run
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pruning.job_hash"] == job.job_hash()
    assert run.data.params["method"] == "wanda" and run.data.params["calibration.num_windows"] == "8"
    for key in ("perplexity_before", "perplexity_after", "sparsity", "seconds_total", "seconds_calibrate"):
        assert key in run.data.metrics, key
    assert run.data.metrics["perplexity_after"] == pytest.approx(summary["perplexity_after"])
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.json", "masks.safetensors", "model", "figures", "tables"} <= files
    model_files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert "model/config.json" in model_files and "model/model.safetensors" in model_files


def test_rerun_resumes_without_recomputing_or_duplicating(wanda_run, monkeypatch):
    job, run_dir, summary, uri = wanda_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import flows.llm as llm
    import flows.oneshot.tasks as tasks

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished stage was computed again")

    for name in ("calibrate_blocks", "prune_one", "CheckpointWriter"):
        monkeypatch.setattr(tasks, name, forbidden)
    monkeypatch.setattr(llm, "streaming_perplexity", forbidden)
    again = _run(job, run_dir)
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert again["perplexity_after"] == summary["perplexity_after"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id])
    assert len(runs) == 1


def test_crash_mid_pruning_resumes_where_it_stopped(prefect_server, mlflow_uri, tiny_model_dir_session,
                                                    tmp_path, monkeypatch):
    import flows.oneshot.tasks as tasks

    job = _job(tiny_model_dir_session, method="magnitude", sparsity=0.3)
    real = tasks.prune_one
    calls = []

    def crash_on_fifth(*args, **kwargs):
        calls.append(kwargs["name"])
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "prune_one", crash_on_fifth)
    with pytest.raises(Exception, match="simulated crash"):
        _run(job, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()
    finished = {n.removeprefix("layer:") for n in Manifest(tmp_path / "run").entries() if n.startswith("layer:")}
    assert calls[4] not in finished and len(finished) >= 4  # the crashed layer left no artifact
    rerun: list[str] = []
    monkeypatch.setattr(tasks, "prune_one", lambda *a, **k: (rerun.append(k["name"]), real(*a, **k))[1])
    summary = _run(job, tmp_path / "run")
    assert sorted(rerun) == sorted(set(r["name"] for r in summary["layers"]) - finished)  # only unfinished layers
    assert summary["sparsity"] == pytest.approx(0.3, abs=1e-3)
    client = MlflowClient(mlflow_uri)
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_sparsegpt_sequential_two_four(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    job = _job(tiny_model_dir_session, method="sparsegpt", pattern="2:4",
               calibration={**SMALL["calibration"], "mode": "sequential"})
    summary = _run(job, tmp_path / "run")
    assert summary["sparsity"] == pytest.approx(0.5)
    masks = load_masks(tmp_path / "run" / "masks.safetensors")
    dense, _ = load_causal_lm(tiny_model_dir_session)
    pruned, _ = load_causal_lm(tmp_path / "run" / "model")
    updated = 0
    for name, mask in masks.items():
        NM(2, 4).validate(mask, name=name)
        assert (mask.reshape(-1, 4).sum(dim=1) == 2).all()
        w, w0 = pruned.get_submodule(name).weight, dense.get_submodule(name).weight
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        updated += int(not torch.equal(w[mask], w0[mask]))  # OBS updates move the kept weights
    assert updated == len(masks)
    assert not list((tmp_path / "run" / "block_inputs").glob("000.*"))  # consumed intermediates are deleted


def test_global_scope_prunes_exactly_overall(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    job = _job(tiny_model_dir_session, method="magnitude", sparsity=0.6, scope="global",
               evaluation={**SMALL["evaluation"], "enabled": False})
    summary = _run(job, tmp_path / "run")
    total = sum(r["shape"][0] * r["shape"][1] for r in summary["layers"])
    assert round(summary["sparsity"] * total) == int(total * 0.6)
    assert len({round(r["sparsity"], 3) for r in summary["layers"]}) > 1  # layers differ under one threshold
    assert summary["perplexity_before"] is None and summary["perplexity_after"] is None
    # the streamed selection (one unit's scores at a time) gives the all-at-once selection's masks
    from pruning_core.arch import prunable_units
    from pruning_core.io.masks import load_masks
    from pruning_core.lm import load_causal_lm
    from pruning_core.masks import generate_global_masks

    dense, _ = load_causal_lm(tiny_model_dir_session)
    scores = {u.name: u.read(dense).abs() for u in prunable_units(dense)}  # magnitude, in the job's unit order
    want, got = generate_global_masks(scores, 0.6), load_masks(tmp_path / "run" / "masks.safetensors")
    assert list(scores) == [r["name"] for r in summary["layers"]]
    assert all(torch.equal(got[n], want[n].tensor) for n in scores)


@pytest.mark.parametrize(
    ("fields", "error", "fragment"),
    [
        ({"model": "/nonexistent/model"}, ArtifactError, "does not exist"),
        ({"pattern": "3:5"}, InvalidPattern, "not divisible by M=5"),
        ({"calibration": {"text": "SHORT", "window_length": 256}}, ConfigError, "too short"),
        ({"evaluation": {"num_windows": 100000, "window_length": 256}}, ConfigError, "too short"),
    ],
)
def test_bad_input_fails_before_long_work(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path,
                                          fields, error, fragment):
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged. " * 3)
    if "calibration" in fields:
        fields = {"calibration": {**fields["calibration"], "text": str(short)}}
    data = {"method": "wanda", "sparsity": 0.5, **fields}
    if "pattern" in data:
        data.pop("sparsity")
    job = _job(fields.get("model", tiny_model_dir_session), **{k: v for k, v in data.items() if k != "model"})
    with pytest.raises(error, match=fragment):
        _run(job, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "stats.parquet").exists()


def test_nan_weights_are_refused(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    model, tok = load_causal_lm(tiny_model_dir_session)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    job = _job(tmp_path / "nan", method="magnitude", sparsity=0.5)
    with pytest.raises(NumericalInstability, match=r"model.layers.1.mlp.up_proj.weight.*\[3, 5\]"):
        _run(job, tmp_path / "run")
