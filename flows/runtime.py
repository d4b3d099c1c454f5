"""Process-level setup for flow runs: offline/telemetry defaults, task runners, output dirs.

``configure_environment`` must run before Prefect or MLflow is imported (both read their
settings at import time); the ``prune`` CLI calls it first thing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.config import JobBase, RunnerConfig

log = logging.getLogger(__name__)

# OSErrors that are deterministic (about a path): retrying them only wastes compute
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)

ENV_DEFAULTS = {
    # Prefect's ephemeral server needs ~20 s to migrate a fresh database; the default timeout is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pruning_core",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow's own HTTP retries default to 7 with backoff factor 2 (minutes of waiting); ours take over.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_environment() -> None:
    """Set offline and no-telemetry defaults without overriding anything the user exported."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def make_task_runner(runner: RunnerConfig, *, worker_env: dict[str, str] | None = None):  # -> prefect TaskRunner
    """Threads (default), a temporary local Dask cluster, or an existing Dask scheduler.

    ``worker_env`` is set in the local cluster's worker processes (e.g. the ``PREFECT_API_URL``
    of the flow's ephemeral server, which is not in the environment they inherit: without it
    every worker would start a temporary Prefect server of its own and report its task runs
    there). Workers of an existing scheduler keep the environment they were started with.
    """
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    from prefect_dask import DaskTaskRunner

    if runner.kind == "dask":
        return DaskTaskRunner(address=runner.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": runner.n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "env": dict(worker_env or {}),
        }
    )


def is_transient(exc: BaseException) -> bool:
    """True for infrastructure failures worth retrying: connections, timeouts, I/O errors that
    are not about a missing or forbidden path. Never for a :class:`PruningError` (bad input or a
    numerical failure: deterministic, a retry would fail the same way) nor for bugs."""
    from pruning_core.errors import PruningError

    if isinstance(exc, (PruningError, *_PERMANENT_OS_ERRORS)):
        return False
    return isinstance(exc, OSError | TimeoutError)  # ConnectionError, requests/distributed comm errors


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only if :func:`is_transient`."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classified
        return is_transient(exc)
    return False


# Options of every task that does real work: retries for transient infrastructure errors only.
TRANSIENT_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_on_transient}


RUN_LOCK = ".run.lock"  # held (shared) by every live run of a directory; see claimed_output_dir


def _legacy_owner(run_dir: Path, job: JobBase) -> str | None:
    """The job hash of a directory written before job.json existed, from its config.json."""
    config = run_dir / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    if isinstance(data, dict) and "job_hash" in data:  # {"job_hash": ..., "job": {...}} (Minitron)
        return str(data["job_hash"])
    return type(job).model_validate(data).job_hash()


def _no_live_run(run_dir: Path) -> bool:
    """True when no process holds the directory's run lock (every run of it has ended or died)."""
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases the lock if it was taken
    return True


def claim_output_dir(run_dir: Path, job: JobBase) -> str:
    """Bind ``run_dir`` to ``job`` and return the directory's run uid.

    A run directory resumes from its manifest, so another config's finished artifacts would be
    taken as this job's. ``job.json`` records the owner (its hash) and a random ``run_uid``, drawn
    the first time the directory is claimed: the MLflow run of the directory is found by job hash
    and uid, so rerunning a directory resumes its MLflow run and a new directory gets a new one.
    A directory written before ``job.json`` existed is identified by its ``config.json``.

    The check and the write happen under an exclusive lock on the directory (the manifest's
    ``flock``), so two jobs claiming one directory at once cannot both win. When no run of the
    directory is alive (see :func:`claimed_output_dir`), the temporaries that killed atomic writes
    left behind are deleted under the same lock.

    Raises:
        ConfigError: ``run_dir`` belongs to a job with another hash.
    """
    from pruning_core.errors import ConfigError
    from pruning_core.io.atomic import atomic_write_text, directory_lock, sweep_temporaries

    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / "job.json"
    with directory_lock(run_dir):
        record = json.loads(marker.read_text()) if marker.is_file() else {}
        owner = record.get("job_hash") or _legacy_owner(run_dir, job)
        if owner is not None and owner != job.job_hash():
            raise ConfigError("output_dir", f"{run_dir} holds the artifacts of job {owner}, not of this job "
                              f"({job.job_hash()}); use another output directory")
        uid = record.get("run_uid")
        if not uid:
            uid = uuid.uuid4().hex
            record = {"job_hash": job.job_hash(), "job": job.job, **record, "run_uid": uid}  # type: ignore[attr-defined]
            atomic_write_text(marker, json.dumps(record))
        if _no_live_run(run_dir):
            for path in sweep_temporaries(run_dir, skip=lambda d: (d / "job.json").is_file()):
                log.info("removed %s, left by an interrupted write", path)
    return str(uid)


@contextlib.contextmanager
def claimed_output_dir(run_dir: Path, job: JobBase) -> Iterator[str]:
    """Claim ``run_dir`` for ``job`` (:func:`claim_output_dir`) and hold its run lock (shared)
    until the block ends; yields the run uid.

    The run lock tells a later claim whether any run of the directory is still alive (its
    temporaries may be in use) or all have ended, so that what they left can be swept. It is a
    ``flock``: released by the kernel when the process dies, however it dies.
    """
    uid = claim_output_dir(run_dir, job)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield uid
    finally:
        os.close(fd)


def default_output_dir(job: JobBase) -> Path:
    """``runs/<name>-<job hash>``: jobs with different configs never share a directory."""
    return Path("runs") / f"{job.name or job.job}-{job.job_hash()}"  # type: ignore[attr-defined]


def flow_run_output_dir(job: JobBase) -> Path:
    """Where a flow run given no ``output_dir`` (a deployment's scheduled run) writes:
    ``$PRUNING_RUNS_DIR/<name>-<job hash>/<scheduled start>-<flow run id>``.

    Each flow run gets its own directory (and so its own MLflow run), and a retry of the flow run
    (same id) resumes it. ``PRUNING_RUNS_DIR`` defaults to ``runs/deployed`` in the working
    directory; the container deployments set ``/data/runs`` (a volume or PersistentVolumeClaim).
    """
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        raise RuntimeError("flow_run_output_dir() needs a Prefect flow run; pass output_dir instead")
    start = flow_run.get_scheduled_start_time()  # set once per flow run: the same on every retry
    leaf = f"{start.astimezone(UTC):%Y%m%dT%H%M%SZ}-{run_id}" if start else str(run_id)
    base = Path(os.environ.get("PRUNING_RUNS_DIR") or "runs/deployed")
    return base / f"{job.name or job.job}-{job.job_hash()}" / leaf  # type: ignore[attr-defined]


@contextlib.contextmanager
def torch_threads(runner: RunnerConfig) -> Iterator[None]:
    """While per-layer tasks run concurrently in threads, split the cores between them.

    torch's intra-op thread count is process-wide: two tasks each using every core would
    oversubscribe the machine (OpenMP threads then spin against each other).
    """
    import torch

    if runner.kind != "threads" or runner.max_workers <= 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // runner.max_workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)
