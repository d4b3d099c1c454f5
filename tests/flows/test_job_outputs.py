"""What a one-shot and a Minitron job leave for their users (issue 15 §3), on the tiny random Llama:

the output model loads back through MLflow (``mlflow.pyfunc.load_model``, by run and by registry
alias), calibration and evaluation data are the run's dataset inputs, rounded headline metrics sit
apart from the timings, source tags are set; Prefect holds a markdown and a table summary of
every job and task runs named by what they prune; the closing lines say where the model is, how
to load it, how to open MLflow on this store, and the rounded headline.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from flows.artifacts import artifact_key
from flows.jobs import parse_config, run_job
from flows.publish import alias_of, registered_name
from pruning_core.lm import load_causal_lm
from tests.flows.oneshot_helpers import tiny_job

pytestmark = pytest.mark.flows

MINITRON = {
    "job": "minitron", "name": "mn-out", "device": "cpu", "target": {"layers": [1]}, "depth_criterion": "bi",
    "calibration": {"num_windows": 8, "window_length": 32, "batch_size": 4, "candidate_windows": 2},
    "evaluation": {"num_windows": 4, "window_length": 32, "batch_size": 4},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the registry of models:/ URIs
    yield root, uri
    mlflow.set_tracking_uri(None)
    mp.undo()


@pytest.fixture(scope="module")
def oneshot_run(prefect_server, store, tiny_model_dir_session):
    root, uri = store
    logger = logging.getLogger("prefect.flow_runs")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        job = tiny_job(tiny_model_dir_session, method="wanda", sparsity=0.5, name="out.wanda")
        summary = run_job(job, root / "oneshot")
    finally:
        logger.removeHandler(handler)
    return job, summary, uri, "\n".join(r.getMessage() for r in records)


@pytest.fixture(scope="module")
def minitron_run(prefect_server, store, tiny_model_dir_session):
    root, uri = store
    job = parse_config({**MINITRON, "model": str(tiny_model_dir_session)}, "test.yaml")
    return job, run_job(job, root / "minitron"), uri


def _check_model_loads_back(job, summary, model_dir) -> None:
    registered = summary["registered_model"]
    assert registered["name"] == registered_name(job) and registered["alias"] == alias_of(job)
    assert registered["uri"] == f"models:/{registered['name']}@{registered['alias']}"
    reference, _ = load_causal_lm(model_dir)
    for uri in (f"runs:/{summary['mlflow_run_id']}/model", registered["uri"]):
        lm = mlflow.pyfunc.load_model(uri)
        model, tokenizer = lm.get_raw_model()
        assert tokenizer("Emma")["input_ids"]
        for name, tensor in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
        out = lm.predict(["Emma Woodhouse"], params={"max_new_tokens": 3})
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)


def test_oneshot_model_loads_back_from_the_run_and_the_registry(oneshot_run):
    job, summary, _, _ = oneshot_run
    assert summary["registered_model"]["name"].startswith("oneshot-") and summary["registered_model"]["alias"] == "out-wanda"
    _check_model_loads_back(job, summary, summary["pruned_model_dir"])


def test_minitron_model_loads_back_from_the_run_and_the_registry(minitron_run):
    job, summary, _ = minitron_run
    assert summary["registered_model"]["name"].startswith("minitron-")
    _check_model_loads_back(job, summary, summary["chosen_model_dir"])


def test_registry_alias_points_at_the_runs_model(oneshot_run, minitron_run):
    for job, summary, uri in (oneshot_run[:3], minitron_run):
        client = MlflowClient(uri)
        reg = summary["registered_model"]
        version = client.get_model_version_by_alias(reg["name"], reg["alias"])
        assert version.run_id == summary["mlflow_run_id"] and str(version.version) == reg["version"]
        assert version.source == f"runs:/{summary['mlflow_run_id']}/model"
        assert version.tags["pruning.job_hash"] == job.job_hash()


def test_inputs_metrics_and_source_tags(oneshot_run, minitron_run):
    for job, summary, uri in (oneshot_run[:3], minitron_run):
        run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
        inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
                  for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"calibration", "evaluation"}
        assert inputs["calibration"].name == "emma (8 x 32 tokens)"
        assert inputs["evaluation"].name == "pride_and_prejudice (4 x 32 tokens)"
        assert inputs["calibration"].source_type == "local" and "emma.txt.gz" in inputs["calibration"].source and len(inputs["calibration"].digest) == 16
        assert inputs["calibration"].digest != inputs["evaluation"].digest
        metrics = run.data.metrics
        assert metrics["headline/perplexity_after"] == round(summary["perplexity_after"], 4)
        assert not any(k.startswith("headline/seconds") for k in metrics) and "seconds_total" in metrics
        tags = run.data.tags
        assert tags["mlflow.source.name"] == f"flows.{job.job}.flow" and tags["mlflow.source.type"] == "JOB"
    oneshot = MlflowClient(oneshot_run[2]).get_run(oneshot_run[1]["mlflow_run_id"]).data.metrics
    assert oneshot["headline/sparsity"] == 0.5


def _artifacts(keys: list[str]) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    return {a.key: a for a in sorted(found, key=lambda a: a.created)}  # a key's newest version (other modules may run the same job)


def test_prefect_summary_artifacts_for_every_llm_job(oneshot_run, minitron_run):
    for job, summary in ((oneshot_run[0], oneshot_run[1]), minitron_run[:2]):
        job = job.named()
        found = _artifacts([artifact_key(job, "summary"), artifact_key(job, "summary-table")])
        markdown, table = found[artifact_key(job, "summary")], found[artifact_key(job, "summary-table")]
        assert markdown.type == "markdown" and "mlflow ui --backend-store-uri" in markdown.data
        assert summary["registered_model"]["uri"] in markdown.data
        assert table.type == "table" and summary["mlflow_run_id"] in str(table.data)
    layers = _artifacts([artifact_key(oneshot_run[0], "layers")])[artifact_key(oneshot_run[0], "layers")]
    assert "model.layers.1.mlp.down_proj" in str(layers.data) and "down_proj" in str(layers.data)


def test_prune_task_runs_are_named_by_their_layer(oneshot_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="prune-model.layers.%")))
    names = {r.name for r in runs}
    assert {f"prune-{r['name']}" for r in oneshot_run[1]["layers"]} <= names


def test_closing_lines(oneshot_run):
    job, summary, uri, log = oneshot_run
    head = f"out.wanda: wanda unstructured, sparsity 0.500, perplexity {summary['perplexity_before']:.2f} -> "
    assert head + f"{summary['perplexity_after']:.2f}" in log
    assert f"model:   {summary['pruned_model_dir']}/" in log
    assert "load_causal_lm(" in log and f"registry: {summary['registered_model']['uri']}" in log
    assert f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/#/experiments/" in log
    assert summary["mlflow_run_id"] in log


def test_task_runs_log_no_completed_lines():
    """The runtime's defaults quiet Prefect's per-task "Finished in state Completed()" (INFO) lines."""
    code = ("from flows.runtime import configure_environment; configure_environment(); import logging, prefect; "
            "from prefect.logging.configuration import setup_logging; setup_logging(); "
            "print(logging.getLogger('prefect.task_runs').getEffectiveLevel())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING_LOGGERS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == logging.WARNING


@pytest.mark.parametrize("name, model, registered, alias", [
    ("wanda-50", "smollm2", "oneshot-smollm2", "wanda-50"),
    ("v1.2", "/models/My Model", "oneshot-My-Model", "v1-2"),
    ("latest", "smollm2", "oneshot-smollm2", "job-latest"),  # MLflow reserves 'latest' and v<N>
    ("v3", "org/name", "oneshot-name", "job-v3"),
])
def test_registry_names_and_aliases_are_valid(name, model, registered, alias):
    job = parse_config({"method": "magnitude", "sparsity": 0.5, "model": model, "name": name})
    assert (registered_name(job), alias_of(job)) == (registered, alias)
