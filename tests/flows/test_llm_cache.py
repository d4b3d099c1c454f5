"""The dense-perplexity cache: its key (the model's content hash, the windows, how it is computed),
the result cache, and two jobs on the same model and evaluation windows measuring the dense model
once."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flows.llm as llm
from flows.cache import ResultCache
from flows.config import CalibrationConfig, EvaluationConfig
from flows.jobs import run_job
from pruning_core.io import paths
from pruning_core.lm import load_causal_lm, perplexity, save_pretrained_atomic
from tests.flows.oneshot_helpers import tiny_job

REPO = Path(__file__).resolve().parents[2]
CAL = CalibrationConfig(num_windows=4, window_length=32, batch_size=4)
EVAL = EvaluationConfig(num_windows=4, window_length=32, batch_size=4)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """An empty cache root ($PRUNING_CACHE) for the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PRUNING_CACHE", str(root))
    return root


def _count(monkeypatch, module, name: str) -> list[int]:
    real, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


# -- the cache key -------------------------------------------------------------------------------------
def test_the_key_hashes_the_model_files_not_a_stale_manifest(cache_root, tmp_path, tiny_model_dir_session):
    model, tokenizer = load_causal_lm(tiny_model_dir_session)
    saved = save_pretrained_atomic(model, tokenizer, tmp_path / "model")  # writes a manifest
    windows = torch.zeros(2, 8, dtype=torch.int64)
    before = llm.dense_perplexity_key(str(saved), windows, 4, "cpu")
    weights = load_file(saved / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name] = weights[name] * 2  # the manifest is now stale
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    assert llm.dense_perplexity_key(str(saved), windows, 4, "cpu") != before


def test_result_cache_round_trip_and_corrupt_entries(tmp_path):
    results = ResultCache("perplexity", root=tmp_path)
    assert results.get("k") is None
    results.put("k", {"perplexity": 12.5})
    assert results.get("k") == {"perplexity": 12.5}
    (tmp_path / "results" / "perplexity" / "k.json").write_text("{trunc")
    assert results.get("k") is None


# -- the evaluate task --------------------------------------------------------------------------------
def _run_dir(tmp_path, name, model_dir):
    run_dir = tmp_path / name
    run_dir.mkdir()
    llm.prepare_windows(str(run_dir), llm.load_tokenizer(str(model_dir)), CAL, EVAL)
    return str(run_dir)


def test_dense_perplexity_is_measured_once_per_model_content_and_windows(cache_root, tmp_path, monkeypatch,
                                                                         tiny_model_dir_session):
    model_dir = str(tiny_model_dir_session)
    measured = _count(monkeypatch, llm, "streaming_perplexity")
    first = llm.evaluate_perplexity.fn(_run_dir(tmp_path, "a", model_dir), model_dir, "before", EVAL, "cpu", cached=True)
    model, _ = load_causal_lm(model_dir)
    windows = llm.load_windows(str(tmp_path / "a"), "evaluation")
    assert first == perplexity(model, windows, batch_size=4, progress=False)  # the measured value, exactly
    second = llm.evaluate_perplexity.fn(_run_dir(tmp_path, "b", model_dir), model_dir, "before", EVAL, "cpu",
                                        cached=True)
    assert second == first and len(measured) == 1  # another run on the same model and windows: the cache
    assert json.loads(paths.perplexity(tmp_path / "b", "before").read_text())["from_cache"] is True
    for entry in (cache_root / "results" / "perplexity").iterdir():
        entry.write_text('{"perplexity": NaN}')  # a corrupt entry is measured again and rewritten
    third = llm.evaluate_perplexity.fn(_run_dir(tmp_path, "c", model_dir), model_dir, "before", EVAL, "cpu",
                                       cached=True)
    assert third == first and len(measured) == 2
    assert json.loads(next((cache_root / "results" / "perplexity").iterdir()).read_text())["perplexity"] == first
    pruned = llm.evaluate_perplexity.fn(str(tmp_path / "c"), model_dir, "after", EVAL, "cpu")
    assert pruned == first and len(measured) == 3  # not cached: measured every time


def test_another_model_or_other_windows_miss_the_cache(cache_root, tmp_path, tiny_model_dir_session):
    model_dir = str(tiny_model_dir_session)
    run_dir = _run_dir(tmp_path, "a", model_dir)
    windows = llm.load_windows(run_dir, "evaluation")
    key = llm.dense_perplexity_key(model_dir, windows, 4, "cpu")
    assert key == llm.dense_perplexity_key(model_dir, windows.clone(), 4, "cpu")
    assert key != llm.dense_perplexity_key(model_dir, windows[:2], 4, "cpu")
    assert key != llm.dense_perplexity_key(model_dir, windows, 2, "cpu")
    other = shutil.copytree(tiny_model_dir_session, tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert llm.dense_perplexity_key(str(other), windows, 4, "cpu") != key


# -- two jobs on one model --------------------------------------------------------------------------------
@pytest.mark.flows
def test_a_second_job_reuses_the_dense_perplexity_and_magnitude_skips_calibration(
        prefect_server, mlflow_uri, cache_root, tiny_model_dir_session, tmp_path, monkeypatch, caplog):
    measured = _count(monkeypatch, llm, "streaming_perplexity")
    wanda = run_job(tiny_job(tiny_model_dir_session, method="wanda", sparsity=0.5), tmp_path / "wanda")
    assert len(measured) == 2  # dense and pruned
    import flows.oneshot.tasks as tasks

    calibrated = _count(monkeypatch, tasks, "save_activation_stats")
    magnitude = run_job(tiny_job(tiny_model_dir_session, method="magnitude", sparsity=0.5, name="mag"),
                        tmp_path / "mag")
    assert len(measured) == 3  # only the pruned model: the dense value came from the cache
    assert magnitude["perplexity_before"] == wanda["perplexity_before"]
    assert calibrated == [] and "calibrate" not in magnitude["seconds"]  # magnitude reads no statistics
    assert not (tmp_path / "mag" / "stats.parquet").exists()
    _check_closing_lines("\n".join(r.getMessage() for r in caplog.records), magnitude, tmp_path / "mag")


def _check_closing_lines(err: str, summary: dict, run_dir) -> None:
    """The lines a job ends with (logged to the flow run's log): headline, output, a load command that works, the MLflow UI command."""
    assert f"mag: magnitude unstructured, sparsity 0.500, perplexity {summary['perplexity_before']:.2f} -> " in err
    assert f"output:  {run_dir}/  (summary.json)" in err
    assert f"mlflow ui --backend-store-uri sqlite:///{run_dir.parent / 'mlflow.db'}" in err
    load = next(line for line in err.splitlines() if line.strip().startswith("load:"))
    argv = shlex.split(load.split("load:", 1)[1]) + [";", "print(sum(p.numel() for p in model.parameters()))"]
    code = " ".join(argv[2:])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    pruned, _ = load_causal_lm(run_dir / "model")
    assert int(proc.stdout.split()[-1]) == sum(p.numel() for p in pruned.parameters())
