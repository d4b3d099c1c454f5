"""Runs of a deployment (no ``output_dir`` parameter): each flow run is a run of its own.

A scheduled deployment starts the same job every night. Each flow run must get its own output
directory and its own MLflow run (not resume the first night's), a retried flow run must resume its
own directory, and a directory run again must resume its MLflow run. Checked for the three flows
the deployments call: ``oneshot_flow``, ``lottery_flow`` and ``minitron_flow`` (flows/<kind>/flow.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.jobs import parse_config
from flows.lottery.flow import lottery_flow as lottery_deployment
from flows.minitron.flow import minitron_flow as minitron_deployment
from flows.oneshot.flow import oneshot_flow
from flows.tracking import JOB_TAG, ROLE_TAG, RUN_TAG

pytestmark = pytest.mark.flows
N_LAYERS = 14


def oneshot_job(model_dir: Path):
    return parse_config({"job": "oneshot", "name": "nightly", "model": str(model_dir), "method": "wanda",
                         "sparsity": 0.5, "device": "cpu",
                         "calibration": {"num_windows": 8, "window_length": 32, "batch_size": 4},
                         "evaluation": {"enabled": False}})


def runs_by_id(uri: str, experiment: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}


def flow_run_dirs(base: Path, job) -> list[Path]:
    """The per-flow-run directories of ``job`` under $PRUNING_RUNS_DIR (``base``)."""
    parent = base / f"{job.name}-{job.job_hash()}"
    return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []


def run_uid(run_dir: Path) -> str:
    return json.loads((run_dir / "job.json").read_text())["run_uid"]


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    """$PRUNING_RUNS_DIR of the 'deployment' (what the container deployments set to /data/runs)."""
    base = tmp_path / "deployed"
    monkeypatch.setenv("PRUNING_RUNS_DIR", str(base))
    return base


def test_each_scheduled_run_gets_its_own_directory_and_mlflow_run(prefect_server, mlflow_uri, runs_dir,
                                                                  tiny_model_dir_session):
    job = oneshot_job(tiny_model_dir_session)
    nights = [oneshot_flow(job), oneshot_flow(job)]  # two occurrences of the schedule: same parameters
    dirs = flow_run_dirs(runs_dir, job)
    assert len(dirs) == 2  # the second night did not resume (and skip) the first night's directory
    assert {Path(n["masks"]).parent for n in nights} == set(dirs)
    assert run_uid(dirs[0]) != run_uid(dirs[1])
    runs = runs_by_id(mlflow_uri, "pruning")
    assert set(runs) == {n["mlflow_run_id"] for n in nights} and len(runs) == 2
    for night in nights:
        run = runs[night["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags[JOB_TAG] == job.job_hash()
        assert run.data.tags[RUN_TAG] == run_uid(Path(night["masks"]).parent)


def test_rerunning_a_directory_resumes_its_mlflow_run_and_another_directory_starts_one(
        prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    job = oneshot_job(tiny_model_dir_session)
    first = oneshot_flow(job, str(tmp_path / "pinned"))
    again = oneshot_flow(job, str(tmp_path / "pinned"))  # --param output_dir=...: a rerun resumes
    other = oneshot_flow(job, str(tmp_path / "elsewhere"))  # the same job from another deployment, say
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert other["mlflow_run_id"] != first["mlflow_run_id"]
    assert len(runs_by_id(mlflow_uri, "pruning")) == 2


def test_a_retried_flow_run_resumes_its_own_directory(prefect_server, mlflow_uri, runs_dir, tiny_model_dir_session,
                                                      monkeypatch):
    import flows.oneshot.tasks as tasks

    real, calls, crashed = tasks.prune_one, {"first": [], "retry": []}, []

    def crash_once(*args, **kwargs):
        if len(calls["first"]) == 6 and not crashed:
            crashed.append(kwargs["name"])
            raise RuntimeError("simulated crash")
        calls["retry" if crashed else "first"].append(kwargs["name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "prune_one", crash_once)
    job = oneshot_job(tiny_model_dir_session)
    summary = oneshot_flow.with_options(retries=1, retry_delay_seconds=0)(job)
    assert crashed  # the first attempt failed; Prefect retried the same flow run
    dirs = flow_run_dirs(runs_dir, job)
    assert len(dirs) == 1 and Path(summary["masks"]).parent == dirs[0]  # the retry found its directory
    assert len(summary["layers"]) == N_LAYERS
    assert len(calls["retry"]) < N_LAYERS  # layers finished before the crash were not pruned again
    runs = runs_by_id(mlflow_uri, "pruning")
    assert list(runs) == [summary["mlflow_run_id"]] and runs[summary["mlflow_run_id"]].info.status == "FINISHED"


LOTTERY = {
    "job": "lottery", "name": "lt-nightly", "model": "lenet300_100", "device": "cpu",
    "search": {"target_sparsity": None, "pruning_rounds": 1, "prune_rate_per_round": 0.5, "global_pruning": False,
               "rewind_strategy": "init", "training_steps": 20, "seed": 0},
    "training": {"batch_size": 60, "eval_every": 10, "threads": 1},
    "data": {"train_subset": 300, "test_subset": 200},
    "controls": [],
    "tracking": {"experiment": "lottery-deployment-tests", "log_model": False},
}


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
def test_lottery_deployment_runs_are_separate_searches(prefect_server, mlflow_uri, runs_dir):
    job = parse_config(LOTTERY)
    first, second = lottery_deployment(job), lottery_deployment(job)
    dirs = flow_run_dirs(runs_dir, job)
    assert len(dirs) == 2 and all((d / "summary.json").is_file() for d in dirs)
    assert first["mlflow_run_id"] != second["mlflow_run_id"]
    runs = runs_by_id(mlflow_uri, LOTTERY["tracking"]["experiment"]).values()
    parents = {r.info.run_id: r for r in runs if r.data.tags.get(ROLE_TAG) == "search"}
    assert set(parents) == {first["mlflow_run_id"], second["mlflow_run_id"]}
    assert {p.data.tags[RUN_TAG] for p in parents.values()} == {run_uid(d) for d in dirs}
    for parent in parents:  # each search has its own round runs (rounds 0 and 1), none shared
        rounds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
        assert sorted(int(r.data.tags["pruning.round"]) for r in rounds) == [0, 1]
    # a rerun of one of the directories (a retried flow run, or output_dir given) resumes its runs
    again = lottery_deployment(job, str(dirs[0]))
    assert again["mlflow_run_id"] == parents_of_dir(parents, dirs[0])
    assert len(runs_by_id(mlflow_uri, LOTTERY["tracking"]["experiment"])) == len(list(runs))


def parents_of_dir(parents: dict, run_dir: Path) -> str:
    return next(rid for rid, r in parents.items() if r.data.tags[RUN_TAG] == run_uid(run_dir))


def test_minitron_deployment_runs_are_separate_searches(prefect_server, mlflow_uri, runs_dir,
                                                        tiny_model_dir_session):
    job = parse_config({
        "job": "minitron", "name": "mn-weekly", "model": str(tiny_model_dir_session), "device": "cpu",
        "target": {"param_budget": 75000, "tolerance": 0.2, "hidden": 64, "kv_groups": 2, "max_candidates": 1},
        "divisibility": {"hidden": 16, "ffn": 32}, "depth_criterion": "bi",
        "calibration": {"num_windows": 4, "window_length": 16, "batch_size": 4, "score_windows": 2,
                        "loss_windows": 2, "candidate_windows": 2},
        "evaluation": {"enabled": False}, "tracking": {"experiment": "minitron-deployment-tests", "log_model": False},
    })
    first, second = minitron_deployment(job), minitron_deployment(job)
    dirs = flow_run_dirs(runs_dir, job)
    assert len(dirs) == 2 and all((d / "summary.json").is_file() for d in dirs)
    runs = runs_by_id(mlflow_uri, "minitron-deployment-tests").values()
    parents = {r.info.run_id: r for r in runs if r.data.tags.get(ROLE_TAG) == "search"}
    assert set(parents) == {first["mlflow_run_id"], second["mlflow_run_id"]} and len(parents) == 2
    assert {p.data.tags[RUN_TAG] for p in parents.values()} == {run_uid(d) for d in dirs}
