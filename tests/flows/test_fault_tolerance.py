"""Fault tolerance of the one-shot job, each fault injected for real:

- a Dask worker process SIGKILLed while it prunes a layer: Dask reschedules, the job completes
  with the same masks as an undisturbed run, and no finished layer is pruned twice;
- the flow process SIGKILLed mid-pruning: the rerun prunes only the layers the manifest does not
  hold, leaves every finished artifact untouched (same inode and mtime), and ends identical;
- a finished artifact corrupted between two runs: its checksum fails, so it is recomputed, not used;
- the MLflow server unreachable: retries with backoff, then ServiceUnavailable before any long work
  (and a server that comes up during the health check's retries is waited for);
- two jobs with different configs at once, same default output location and MLflow store: each
  gets its own run directory and MLflow run; two claiming one directory at once: only one wins;
- temporaries of killed atomic writes: swept when the directory is claimed, unless a run is alive.
Task retry policy: transient infrastructure errors are retried, PruningErrors never.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from flows.execution import TRANSIENT_RETRIES, is_transient, retry_on_transient
from flows.jobs import parse_config
from flows.jobs import run_job as run_oneshot
from flows.rundir import claim_output_dir, claimed_output_dir
from flows.tracking import JOB_TAG, Tracker
from pruning_core.errors import ArtifactError, ConfigError, NumericalInstability, ServiceUnavailable
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_dir, atomic_path, is_temporary
from pruning_core.io.manifest import Manifest
from pruning_core.io.masks import load_masks

pytestmark = pytest.mark.flows
REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("fault_helpers.py")
SMALL = {
    "calibration": {"num_windows": 8, "window_length": 32, "batch_size": 4},
    "evaluation": {"num_windows": 4, "window_length": 32, "batch_size": 4, "error_windows": 2},
    "device": "cpu",
}
N_LAYERS = 14


def job_dict(model_dir: Path, **fields) -> dict:
    return {"job": "oneshot", "name": "fault", "model": str(model_dir), "method": "wanda", "sparsity": 0.5,
            **SMALL, **fields}


def make_job(model_dir: Path, **fields):
    return parse_config(job_dict(model_dir, **fields), "test.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: this session's Prefect server, the worktree's code."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO), **extra}


def layer_entries(run_dir: Path) -> set[str]:
    return {n.removeprefix("layer:") for n in Manifest(run_dir).entries() if n.startswith("layer:")}


def count_calls(monkeypatch, name: str) -> list[str]:
    """Record the ``name=`` of every call of ``flows.oneshot.tasks.<name>`` (calls go through)."""
    import flows.oneshot.tasks as tasks

    real, calls = getattr(tasks, name), []
    monkeypatch.setattr(tasks, name, lambda *a, **k: (calls.append(k.get("name", "?")), real(*a, **k))[1])
    return calls


@pytest.fixture(scope="module")
def reference_masks(prefect_server, tiny_model_dir_session, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Masks of an undisturbed run of the job every fault test disturbs."""
    root = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    try:
        run_oneshot(make_job(tiny_model_dir_session), root / "run")
    finally:
        mp.undo()
    return load_masks(root / "run" / "masks.safetensors")


def assert_same_masks(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    masks = load_masks(run_dir / "masks.safetensors")
    assert masks.keys() == reference.keys()
    for name, mask in masks.items():
        assert torch.equal(mask, reference[name]), name


# -- retry policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("exc", "transient"), [
    (ConnectionRefusedError(111, "refused"), True),
    (TimeoutError("timed out"), True),
    (OSError(5, "Input/output error"), True),
    (FileNotFoundError(2, "missing"), False),
    (PermissionError(13, "denied"), False),
    (ArtifactError("scores/x.safetensors", "fails its checksum"), False),
    (NumericalInstability("sparsegpt", "Cholesky failed"), False),
    (ServiceUnavailable("MLflow", "http://x", "down"), False),  # the tracker already retried it
    (ConfigError("sparsity", "bad"), False),
    (RuntimeError("a bug"), False),
])
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


def test_dask_comm_errors_are_transient():
    from distributed.comm.core import CommClosedError

    assert is_transient(CommClosedError("worker connection closed"))


def test_task_retries_transient_errors_but_never_pruning_errors(prefect_server):
    from prefect import flow, task

    import flows.oneshot.tasks as tasks
    from flows.execution import IO_TASK

    assert tasks.prune_layer.retries == TRANSIENT_RETRIES["retries"] == 2
    assert tasks.prune_layer.retry_condition_fn is retry_on_transient
    attempts: list[int] = []

    @task(**{**IO_TASK, "retry_delay_seconds": 0})
    def fails_once(error: str) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionResetError(104, "reset") if error == "transient" else ArtifactError("x", "corrupt")
        return len(attempts)

    @flow
    def run(error: str) -> int:
        return fails_once(error)

    assert run("transient") == 2  # retried once, then succeeded
    attempts.clear()
    with pytest.raises(ArtifactError):
        run("pruning")
    assert len(attempts) == 1  # deterministic: not retried


# -- MLflow unreachable ---------------------------------------------------------------------------
def test_tracker_retries_with_backoff_then_raises(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"MLflow at http://127\.0\.0\.1:\d+ is unavailable: "
                                                 r"create experiment failed after 3 attempts"):
        Tracker(uri, retries=2, backoff_s=0.2)
    assert time.monotonic() - started >= 0.2 + 0.4  # two backoff waits, doubling


def test_health_check_waits_for_a_server_that_comes_up_during_its_retries():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args) -> None:
            pass

    port, servers = free_port(), []

    def start_later() -> None:
        time.sleep(1.2)  # the first attempts find nothing listening
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), Health))
        servers[0].serve_forever()

    threading.Thread(target=start_later, daemon=True).start()
    started = time.monotonic()
    try:
        Tracker.check_available(f"http://127.0.0.1:{port}", retries=5, backoff_s=0.2)  # waits 0.2, 0.4, 0.8, ...
    finally:
        while not servers and time.monotonic() - started < 10:
            time.sleep(0.05)
        if servers:
            servers[0].shutdown()
    assert time.monotonic() - started >= 1.2  # it waited for the server instead of failing at once


def test_health_check_gives_up_after_its_retries_with_a_clear_error(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"MLflow at http://127\.0\.0\.1:\d+ is unavailable: "
                                                 r"/health did not answer: .*\(3 attempts\)"):
        Tracker.check_available(uri, retries=2, backoff_s=0.2)
    assert time.monotonic() - started >= 0.2 + 0.4  # two backoff waits, doubling
    monkeypatch.setenv("PRUNING_TRACKING_HEALTH_RETRIES", "0")  # configurable: one attempt only
    with pytest.raises(ServiceUnavailable, match=r"\(1 attempts\)"):
        Tracker.check_available(uri)


def test_dead_mlflow_server_fails_fast_before_long_work(prefect_server, tiny_model_dir_session, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    job = make_job(tiny_model_dir_session, tracking={"tracking_uri": uri})
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"MLflow at .* is unavailable: /health did not answer"):
        run_oneshot(job, tmp_path / "run")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "run" / "windows.safetensors").exists()  # nothing was computed
    assert Manifest(tmp_path / "run").entries() == {}


# -- artifacts: corruption, SIGKILL of the flow process ---------------------------------------------
def test_corrupted_artifact_is_recomputed_not_used(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path,
                                                   monkeypatch, reference_masks):
    import flows.oneshot.tasks as tasks

    run_dir, job = tmp_path / "run", make_job(tiny_model_dir_session)
    real, calls = tasks.prune_one, []

    def crash_on_sixth(*args, **kwargs):
        calls.append(kwargs["name"])
        if len(calls) == 6:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "prune_one", crash_on_sixth)
    with pytest.raises(Exception, match="simulated crash"):
        run_oneshot(job, run_dir)
    finished = sorted(layer_entries(run_dir))
    victim = Manifest(run_dir).path(f"layer:{finished[0]}")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    monkeypatch.setattr(tasks, "prune_one", real)
    recomputed = count_calls(monkeypatch, "prune_one")
    run_oneshot(job, run_dir)
    expected = (set(reference_masks) - set(finished)) | {finished[0]}
    assert sorted(recomputed) == sorted(expected)
    Manifest(run_dir).verify()
    assert_same_masks(run_dir, reference_masks)


def test_sigkill_mid_pruning_then_rerun_resumes(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path,
                                                 monkeypatch, reference_masks):
    config, run_dir = tmp_path / "fault.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(job_dict(tiny_model_dir_session)))
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, str(HELPER), "run", str(config), "--output-dir", str(run_dir)],
                            env=child_env(PRUNING_TEST_LAYER_DELAY="0.4"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    deadline = time.monotonic() + 150
    while len(layer_entries(run_dir)) < 4:
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the job never reached the pruning stage"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    finished = layer_entries(run_dir)
    assert 4 <= len(finished) < N_LAYERS and not (run_dir / "summary.json").exists()
    recorded = {e.path for e in Manifest(run_dir).entries().values()}
    assert not any(p.endswith(".tmp") for p in recorded)  # a half-written file is never recorded
    kept = [Manifest(run_dir).path(f"layer:{n}") for n in finished] + [run_dir / "stats.parquet",
                                                                       run_dir / "windows.safetensors"]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}

    recomputed = count_calls(monkeypatch, "prune_one")
    recalibrated = count_calls(monkeypatch, "save_activation_stats")
    summary = run_oneshot(parse_config(job_dict(tiny_model_dir_session), str(config)), run_dir)
    assert sorted(recomputed) == sorted(set(reference_masks) - finished)  # only what was not finished
    assert recalibrated == []
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == stamps  # finished files untouched
    assert not list(run_dir.rglob(".*.tmp"))  # leftovers of the killed writes are gone or were never there
    assert_same_masks(run_dir, reference_masks)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]] and runs[0].info.status == "FINISHED"


# -- a Dask worker killed while it prunes a layer ---------------------------------------------------
@pytest.fixture
def slow_dask_cluster(prefect_server, tmp_path):
    """A scheduler and two single-threaded workers whose layer pruning takes 0.5 s (fault_helpers)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    address = f"tcp://127.0.0.1:{free_port()}"
    env = child_env(PRUNING_TEST_LAYER_DELAY="0.5", PRUNING_TEST_MARKERS=str(markers),
                    DASK_DISTRIBUTED__LOGGING__DISTRIBUTED="error")
    dask = str(Path(sys.executable).parent / "dask")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                               "--dashboard-address", "127.0.0.1:0"], env=env, start_new_session=True)]
    procs += [subprocess.Popen([dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--name", f"w{i}",
                                "--dashboard-address", "127.0.0.1:0", "--preload", str(HELPER),
                                "--local-directory", str(tmp_path / f"w{i}")], env=env, start_new_session=True)
              for i in (1, 2)]
    try:
        ready = subprocess.run([sys.executable, str(REPO / "scripts" / "stack_wait.py"), "dask", address,
                                "--workers", "2", "--timeout", "120"], capture_output=True, text=True)
        assert ready.returncode == 0, ready.stderr
        yield address, markers
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)


class KillWhilePruning(threading.Thread):
    """SIGKILL the first worker process seen in the middle of pruning a layer (started, not done)."""

    def __init__(self, markers: Path) -> None:
        super().__init__(daemon=True)
        self.markers, self.victim, self.stop = markers, None, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for start in self.markers.glob("*.start"):
                if not start.with_suffix(".done").exists():
                    pid, layer = start.stem.split("--")
                    os.kill(int(pid), signal.SIGKILL)
                    self.victim = (int(pid), layer)
                    return
            time.sleep(0.02)


def test_dask_worker_killed_mid_scoring_job_completes(slow_dask_cluster, mlflow_uri, tiny_model_dir_session,
                                                       tmp_path, reference_masks):
    address, markers = slow_dask_cluster
    job = make_job(tiny_model_dir_session, runner={"kind": "dask", "address": address})
    killer = KillWhilePruning(markers)
    killer.start()
    try:
        summary = run_oneshot(job, tmp_path / "run")
    finally:
        killer.stop.set()
    assert killer.victim is not None, "no layer was seen in flight"
    pid, layer = killer.victim
    done = [m.stem.split("--") for m in markers.glob("*.done")]
    assert sorted(name for _, name in done) == sorted(reference_masks)  # every layer pruned exactly once
    finisher = {name: int(p) for p, name in done}
    assert finisher[layer] != pid  # the killed layer was rescheduled on a live worker
    assert len(set(finisher.values())) >= 2
    assert summary["sparsity"] == pytest.approx(0.5)
    assert_same_masks(tmp_path / "run", reference_masks)


# -- two different jobs at the same time ---------------------------------------------------------------
def test_concurrent_jobs_do_not_share_artifacts(prefect_server, tiny_model_dir_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    configs = {"a": {"method": "wanda", "sparsity": 0.5}, "b": {"method": "magnitude", "sparsity": 0.25}}
    procs = {}
    for key, fields in configs.items():
        folder = tmp_path / key
        folder.mkdir()
        data = job_dict(tiny_model_dir_session, **fields)
        del data["name"]  # both named "job" (from the file name): only the config hash tells them apart
        (folder / "job.yaml").write_text(yaml.safe_dump(data))
        procs[key] = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(folder / "job.yaml")],
                                      cwd=tmp_path, env=child_env(MLFLOW_TRACKING_URI=uri),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {key: p.communicate(timeout=300) for key, p in procs.items()}
    for key, p in procs.items():
        assert p.returncode == 0, results[key][1][-3000:]
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2 and all(d.name.startswith("job-") for d in dirs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    assert len(runs) == 2
    for key, fields in configs.items():
        job = parse_config(yaml.safe_load((tmp_path / key / "job.yaml").read_text()))
        run_dir = tmp_path / "runs" / f"job-{job.job_hash()}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["method"] == fields["method"] and summary["sparsity"] == pytest.approx(fields["sparsity"])
        assert json.loads((run_dir / "job.json").read_text())["job_hash"] == job.job_hash()
        Manifest(run_dir).verify()
        run = client.get_run(summary["mlflow_run_id"])
        assert run.data.tags[JOB_TAG] == job.job_hash() and run.info.status == "FINISHED"
        assert run.data.metrics["sparsity"] == pytest.approx(fields["sparsity"])


def test_output_dir_of_another_job_is_refused(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    first = make_job(tiny_model_dir_session, evaluation={**SMALL["evaluation"], "enabled": False})
    run_oneshot(first, tmp_path / "run")
    other = make_job(tiny_model_dir_session, sparsity=0.3, evaluation={**SMALL["evaluation"], "enabled": False})
    with pytest.raises(ConfigError, match="holds the artifacts of job"):
        run_oneshot(other, tmp_path / "run")


# -- claiming an output directory: under a lock; stale temporaries swept ------------------------------
def test_two_jobs_claiming_one_directory_at_once_cannot_both_win(tmp_path, monkeypatch):
    import pruning_core.io.atomic as atomic

    real_write = atomic.atomic_write_text

    def slow_write(path, text):
        time.sleep(0.3)  # a wide check-then-write window: without the lock both claims would pass the check
        return real_write(path, text)

    monkeypatch.setattr(atomic, "atomic_write_text", slow_write)
    run_dir = tmp_path / "shared"
    jobs = [make_job(tmp_path, sparsity=0.5), make_job(tmp_path, sparsity=0.3)]
    assert jobs[0].job_hash() != jobs[1].job_hash()
    barrier, results = threading.Barrier(2), {}

    def claim(i: int) -> None:
        barrier.wait()
        try:
            results[i] = claim_output_dir(run_dir, jobs[i])
        except ConfigError as exc:
            results[i] = exc

    threads = [threading.Thread(target=claim, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [i for i, r in results.items() if isinstance(r, str)]
    assert len(results) == 2 and len(winners) == 1, results
    loser = results[1 - winners[0]]
    assert isinstance(loser, ConfigError) and "holds the artifacts of job" in str(loser)
    record = json.loads((run_dir / "job.json").read_text())
    assert record["job_hash"] == jobs[winners[0]].job_hash() and record["run_uid"] == results[winners[0]]


def test_a_directory_keeps_its_run_uid_and_a_new_directory_gets_a_new_one(tmp_path):
    job = make_job(tmp_path)
    first = claim_output_dir(tmp_path / "a", job)
    assert claim_output_dir(tmp_path / "a", job) == first
    assert claim_output_dir(tmp_path / "b", job) != first


def _killed_writes(run_dir: Path) -> tuple[list, list[Path]]:
    """Temporaries exactly as atomic_path/atomic_dir leave them when their process dies mid-write."""
    writers, temps = [], []
    for writer, target in ((atomic_path, run_dir / "masks.safetensors"), (atomic_dir, run_dir / "model"),
                           (atomic_path, run_dir / "scores" / "layer.0.safetensors")):
        cm = writer(target)
        tmp = cm.__enter__()  # never exited, as if the process had been killed inside the block
        (tmp / "config.json" if tmp.is_dir() else tmp).write_text("half written")
        writers.append(cm)  # keeps the generator alive: closing it would clean up like a normal error
        temps.append(tmp)
    old = run_dir / ".model.k7f2x9qa.old"  # atomic_dir killed between moving the old copy aside and deleting it
    (old / "model").mkdir(parents=True)
    temps.append(old)
    assert all(is_temporary(p.name) for p in temps)
    return writers, temps


def test_claim_sweeps_stale_temporaries_only_when_no_run_is_alive(tmp_path):
    run_dir, job = tmp_path / "run", make_job(tmp_path)
    claim_output_dir(run_dir, job)
    nested = run_dir / "nested"  # another job's directory inside this one: not this job's temporaries
    nested.mkdir()
    (nested / "job.json").write_text("{}")
    keep = [run_dir / "summary.json", run_dir / ".notes", run_dir / "scores" / "x.tmp", nested / ".a.b.c.tmp"]
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("kept")
    with claimed_output_dir(run_dir, job):  # a run is alive, writing: its temporaries are in use
        writers, temps = _killed_writes(run_dir)
        claim_output_dir(run_dir, job)  # e.g. a second run of the same job started on the directory
        assert all(p.exists() for p in temps)
    claim_output_dir(run_dir, job)  # every run has ended (or died): what they left is garbage
    assert [p for p in temps if p.exists()] == []
    assert all(p.read_text() == "kept" for p in keep)
    assert (run_dir / "job.json").is_file() and paths.run_lock(run_dir).is_file()
    del writers


def test_the_run_lock_of_a_killed_process_does_not_block_the_sweep(tmp_path):
    run_dir, job = tmp_path / "run", make_job(tmp_path)
    claim_output_dir(run_dir, job)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_SH); "
        "print('locked', flush=True); time.sleep(600)"), str(paths.run_lock(run_dir))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        stale = run_dir / ".summary.json.q8w7e6r5.tmp"
        stale.write_text("{")
        claim_output_dir(run_dir, job)
        assert stale.exists()  # the other process's run is alive
        holder.kill()  # SIGKILL: the kernel releases its lock
        holder.wait(timeout=30)
        claim_output_dir(run_dir, job)
        assert not stale.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
