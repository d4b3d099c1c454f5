"""Process-level setup for flow runs: offline/telemetry defaults, task runners, output dirs.

``configure_environment`` must run before Prefect or MLflow is imported (both read their
settings at import time); the ``prune`` CLI calls it first thing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.config import JobBase, RunnerConfig

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


def claim_output_dir(run_dir: Path, job: JobBase) -> None:
    """Bind ``run_dir`` to ``job``: refuse a directory that holds another job's artifacts.

    A run directory resumes from its manifest, so another config's finished artifacts would be
    taken as this job's. ``job.json`` records the owner (its hash); a directory written before
    that file existed is identified by its ``config.json``.

    Raises:
        ConfigError: ``run_dir`` belongs to a job with another hash.
    """
    from pruning_core.errors import ConfigError
    from pruning_core.io.atomic import atomic_write_text

    marker, config = run_dir / "job.json", run_dir / "config.json"
    if marker.is_file():
        owner = json.loads(marker.read_text()).get("job_hash")
    elif config.is_file():
        owner = type(job).model_validate_json(config.read_text()).job_hash()
    else:
        owner = None
    if owner is not None and owner != job.job_hash():
        raise ConfigError("output_dir", f"{run_dir} holds the artifacts of job {owner}, not of this job "
                          f"({job.job_hash()}); use another output directory")
    if not marker.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"job_hash": job.job_hash(), "job": job.job}))  # type: ignore[attr-defined]


def default_output_dir(job: JobBase) -> Path:
    """``runs/<name>-<job hash>``: jobs with different configs never share a directory."""
    return Path("runs") / f"{job.name or job.job}-{job.job_hash()}"  # type: ignore[attr-defined]


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
