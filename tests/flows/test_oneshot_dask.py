"""The per-layer fan-out on Dask: a temporary local cluster of worker processes, and an existing
scheduler with two ``dask worker`` processes. Both must give the threads runner's results bit for
bit, run every ``prune-layer`` task outside this process, report those task runs to this flow's
Prefect server, and ship only paths, names and the (small) job config to the workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from mlflow import MlflowClient

from flows.jobs import run_job as run_oneshot
from pruning_core.io import paths
from pruning_core.io.layers import load_layer_result
from pruning_core.io.masks import load_masks
from pruning_core.io.tensors import load_tensors
from tests.flows.oneshot_helpers import tiny_job

pytestmark = pytest.mark.flows

REPO = Path(__file__).resolve().parents[2]


def _job(model_dir, runner: dict):
    return tiny_job(model_dir, method="wanda", sparsity=0.5, runner=runner)


def _results(run_dir: Path, layers: list[str]) -> dict[str, torch.Tensor]:
    """Every per-layer result (mask, and weight if stored), the saved masks and the pruned weights.

    Compared by content: safetensors writes its metadata keys in no fixed order, so two files
    with identical tensors need not be identical bytes.
    """
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        mask, weight = load_layer_result(paths.layer_scores(run_dir, layer))
        out[f"result:{layer}"] = mask
        if weight is not None:
            out[f"result-weight:{layer}"] = weight
    out |= {f"masks:{k}": v for k, v in load_masks(paths.masks(run_dir)).items()}
    out |= {f"model:{k}": v for k, v in load_tensors(paths.model(run_dir) / "model.safetensors").items()}
    return out


@pytest.fixture(scope="module")
def threads_run(prefect_server, tiny_model_dir_session, tmp_path_factory):
    """The reference: the same job on the default threads runner."""
    root = tmp_path_factory.mktemp("threads")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        summary = run_oneshot(_job(tiny_model_dir_session, {"kind": "threads"}), root / "run")
    layers = [r["name"] for r in summary["layers"]]
    return summary, _results(root / "run", layers)


def _assert_same_as_threads(summary, run_dir: Path, threads_run) -> None:
    reference, expected = threads_run
    got = _results(run_dir, [r["name"] for r in summary["layers"]])
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():  # bit for bit (int views: -0.0 != 0.0, NaN == NaN)
        view = torch.uint8 if tensor.dtype == torch.bool else torch.int32
        assert got[key].dtype == tensor.dtype and torch.equal(got[key].view(view), tensor.view(view)), key
    for key in ("sparsity", "perplexity_before", "perplexity_after", "layers"):
        assert summary[key] == reference[key], key


def _record_task_processes(monkeypatch, log: Path) -> Path:
    """Make every per-layer prune append its process id to ``log``.

    The task function travels to the workers pickled by value (its module attribute is the
    Prefect Task, not the function), together with this wrapper, so the ids are those of the
    processes that really ran the layers.
    """
    import flows.oneshot.tasks as tasks

    real = tasks.prune_unit  # what the task calls directly: a deeper function would be imported by reference

    def recording(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "prune_unit", recording)
    return log


def _pids(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()]


def _record_submissions(monkeypatch) -> list[dict]:
    """Every parameter set the Prefect Dask client ships to the cluster (recorded client-side)."""
    from prefect.tasks import Task
    from prefect_dask.client import PrefectDaskClient

    sent: list[dict] = []
    real = PrefectDaskClient.submit

    def spy(self, func, *args, **kwargs):
        if isinstance(func, Task):
            sent.append({"task": func.name, **kwargs["parameters"]})
        return real(self, func, *args, **kwargs)

    monkeypatch.setattr(PrefectDaskClient, "submit", spy)
    return sent


def _assert_only_paths_were_sent(sent: list[dict], run_dir: Path, layers: list[str]) -> None:
    assert sorted(p["layer"] for p in sent) == sorted(layers) and {p["task"] for p in sent} == {"prune-layer"}
    for p in sent:
        assert Path(p["run_dir"]) == run_dir and Path(p["model_dir"]).is_dir()
        assert Path(p["stats"]["stats"]).is_file() and p["stats"]["hessians"] is None
        leaves = [v for k, v in p.items() if k not in ("task", "job")] + list(p["stats"].values())
        assert not any(isinstance(v, torch.Tensor | torch.nn.Module) for v in leaves)
        assert len(cloudpickle.dumps(p)) < 16_000  # the job config and a few paths, nothing bulky


def _prefect_layer_runs() -> list:
    """The task runs of the newest ``prune-layers`` subflow run, as this session's server has them."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["prune-layers"])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))


def test_dask_local_cluster(threads_run, tiny_model_dir_session, mlflow_uri, tmp_path, monkeypatch):
    log = _record_task_processes(monkeypatch, tmp_path / "pids.txt")
    sent = _record_submissions(monkeypatch)
    summary = run_oneshot(_job(tiny_model_dir_session, {"kind": "dask_local", "n_workers": 2}), tmp_path / "run")
    _assert_same_as_threads(summary, tmp_path / "run", threads_run)
    _assert_only_paths_were_sent(sent, tmp_path / "run", [r["name"] for r in summary["layers"]])
    pids = _pids(log)
    assert len(pids) == 14 and os.getpid() not in pids and len(set(pids)) == 2  # two worker processes
    runs = _prefect_layer_runs()  # the workers reported to this server, not to ephemeral ones of their own
    assert len(runs) == 14 and all(r.state.is_completed() for r in runs)
    assert MlflowClient(mlflow_uri).get_run(summary["mlflow_run_id"]).data.params["runner.kind"] == "dask_local"


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture
def dask_scheduler(prefect_server, tmp_path):
    """A real scheduler and two single-threaded workers, as separate processes; always torn down."""
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # this checkout's code
    dask = str(Path(sys.executable).parent / "dask")
    file = tmp_path / "scheduler.json"
    log = open(tmp_path / "dask.log", "wb")  # closed in the finalizer
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(file)], env=env, stdout=log, stderr=subprocess.STDOUT)]
    client = None
    try:
        procs += [subprocess.Popen([dask, "worker", "--scheduler-file", str(file), "--nworkers", "1", "--nthreads", "1",
                                    "--no-dashboard", "--name", f"w{i}"], env=env, stdout=log, stderr=subprocess.STDOUT)
                  for i in range(2)]
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        client = Client(scheduler_file=str(file), timeout=60)
        client.wait_for_workers(2, timeout=60)
        yield client
    finally:
        if client is not None:
            client.close()
        _stop(procs)
        log.close()


def test_existing_scheduler(threads_run, dask_scheduler, tiny_model_dir_session, mlflow_uri, tmp_path, monkeypatch):
    from distributed import get_task_stream
    from distributed.utils import key_split

    client = dask_scheduler
    workers = set(client.scheduler_info()["workers"])
    assert len(workers) == 2
    log = _record_task_processes(monkeypatch, tmp_path / "pids.txt")
    sent = _record_submissions(monkeypatch)
    job = _job(tiny_model_dir_session, {"kind": "dask", "address": client.scheduler.address})
    with get_task_stream(client=client) as stream:  # the scheduler's own record of what ran where
        summary = run_oneshot(job, tmp_path / "run")
    _assert_same_as_threads(summary, tmp_path / "run", threads_run)
    _assert_only_paths_were_sent(sent, tmp_path / "run", [r["name"] for r in summary["layers"]])
    ran = [t for t in stream.data if key_split(t["key"]) == "prune_layer"]
    assert len(ran) == 14
    assert {t["worker"] for t in ran} == workers  # both workers took layers, nothing ran elsewhere
    assert sorted(set(_pids(log))) == sorted(client.run(os.getpid).values())  # the two worker processes
    runs = _prefect_layer_runs()
    assert len(runs) == 14 and all(r.state.is_completed() for r in runs)
