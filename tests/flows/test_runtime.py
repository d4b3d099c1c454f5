"""JobRun, the runtime every job's flow body stands on (used here outside a flow, on a SQLite
MLflow store): the claim, the parent run and its resumption, stages, summary.json, FINISHED and
FAILED closes that never mask the original error."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from flows.runtime import JobRun, StageClock
from flows.tracking import JOB_TAG, KIND_TAG, RUN_TAG, Tracker
from pruning_core.errors import ConfigError, ServiceUnavailable
from pruning_core.io import paths
from tests.flows.oneshot_helpers import tiny_job


@pytest.fixture
def job(tmp_path):
    return tiny_job(tmp_path / "model", method="wanda", sparsity=0.5, name="rt")


def _run(uri: str, run_id: str):
    return MlflowClient(uri).get_run(run_id)


def test_finish_writes_the_summary_and_closes_finished(mlflow_uri, job, tmp_path):
    with JobRun.open(job, tmp_path / "run", tags={"method": "wanda"}) as run:
        with run.stage("work"):
            time.sleep(0.01)
        summary = run.finish({"answer": 42, "seconds": run.clock.totals()}, headline="all good", load="pass")
    assert json.loads(paths.summary(run.dir).read_text()) == summary
    assert json.loads(paths.config(run.dir).read_text()) == json.loads(job.model_dump_json())
    record = _run(mlflow_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert {record.data.tags[k] for k in (JOB_TAG, KIND_TAG, RUN_TAG)} == {job.job_hash(), "oneshot", run.uid}
    assert record.data.tags["method"] == "wanda" and record.data.params["job_hash"] == job.job_hash()
    assert record.data.metrics["seconds_work"] >= 0.01 and "seconds_total" in record.data.metrics
    files = {f.path for f in MlflowClient(mlflow_uri).list_artifacts(run.run_id)}
    assert {"summary.json", "config.json"} <= files
    lines = run.closing_lines("all good", "pass")
    assert lines.splitlines()[0] == "rt: all good" and "python -c pass" in lines and mlflow_uri in lines


def test_the_same_directory_resumes_its_run_and_another_directory_starts_one(mlflow_uri, job, tmp_path):
    with JobRun.open(job, tmp_path / "a") as first:
        first.finish({}, headline="", load="")
    with JobRun.open(job, tmp_path / "a") as again:
        again.finish({}, headline="", load="")
    with JobRun.open(job, tmp_path / "b") as other:
        other.finish({}, headline="", load="")
    assert again.run_id == first.run_id and other.run_id != first.run_id
    assert _run(mlflow_uri, again.run_id).data.tags["pruning.resumed"] == "true"


def test_a_failure_closes_the_run_failed_and_is_not_masked(mlflow_uri, job, tmp_path, monkeypatch):
    with pytest.raises(ZeroDivisionError):
        with JobRun.open(job, tmp_path / "run") as run:
            1 / 0  # noqa: B018 - the original error
    assert _run(mlflow_uri, run.run_id).info.status == "FAILED"

    def unreachable(self, run_id, status="FINISHED"):
        raise ServiceUnavailable("MLflow", self.tracking_uri, "down")

    monkeypatch.setattr(Tracker, "end_run", unreachable)  # closing fails too: the original error wins
    with pytest.raises(KeyError, match="original"):
        with JobRun.open(job, tmp_path / "run"):
            raise KeyError("original")


def test_a_body_that_never_finishes_does_not_leave_the_run_running(mlflow_uri, job, tmp_path):
    with JobRun.open(job, tmp_path / "run") as run:
        pass
    assert _run(mlflow_uri, run.run_id).info.status == "FAILED"


def test_a_directory_of_another_job_is_refused_before_mlflow_is_touched(mlflow_uri, job, tmp_path):
    with JobRun.open(job, tmp_path / "run") as run:
        run.finish({}, headline="", load="")
    other = job.model_copy(update={"sparsity": 0.3})
    with pytest.raises(ConfigError, match="holds the artifacts of job"):
        with JobRun.open(other, tmp_path / "run"):
            pytest.fail("the block must not run")
    assert len(MlflowClient(mlflow_uri).search_runs([_run(mlflow_uri, run.run_id).info.experiment_id])) == 1


def test_an_unnamed_job_gets_its_kinds_default_name(mlflow_uri, job, tmp_path):
    with JobRun.open(job.model_copy(update={"name": None}), tmp_path / "run") as run:
        run.finish({}, headline="", load="")
    assert run.job.name == "oneshot" and _run(mlflow_uri, run.run_id).info.run_name == "oneshot"


def test_stage_clock_keeps_the_first_timings(tmp_path):
    clock = StageClock(tmp_path / "timings.json")
    with clock.stage("a"):
        time.sleep(0.02)
    again = StageClock(tmp_path / "timings.json")  # a resumed run
    with again.stage("a"):
        pass
    assert again.seconds["a"] == clock.seconds["a"] >= 0.02
    assert again.totals() == {"a": clock.seconds["a"], "total": clock.seconds["a"]}
