"""Process-level setup for flow runs: offline/telemetry defaults, task runners, output dirs.

``configure_environment`` must run before Prefect or MLflow is imported (both read their
settings at import time); the ``prune`` CLI calls it first thing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.config import JobBase, RunnerConfig

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
