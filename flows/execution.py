"""How tasks execute: their options (no Prefect caching, transient-error retries), the task runner
a job's fan-out runs on (threads, a local Dask cluster, an existing scheduler), and the torch
thread budget of concurrent tasks.

Every task that does I/O takes :data:`IO_TASK`: Prefect neither hashes nor persists arguments
(resumption is the run directory's manifest), and a failed run is retried only for transient
infrastructure errors (:func:`is_transient`), never for a :class:`PruningError`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from typing import Any

from prefect.cache_policies import NO_CACHE

from flows.config import RunnerConfig

# OSErrors that are deterministic (about a path): retrying them only wastes compute
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


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


# Retries for transient infrastructure errors only.
TRANSIENT_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_on_transient}
# Options of every task that does I/O: no Prefect caching or result persistence, transient retries.
IO_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False, **TRANSIENT_RETRIES}


def _worker_env() -> dict[str, str]:
    """Environment for local Dask worker processes: this flow's Prefect API (an ephemeral
    server's URL is not in os.environ), so their task runs land in this flow run. Without it
    every worker would start a temporary Prefect server of its own and report there."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return {"PREFECT_API_URL": str(ctx.client.api_url)} if ctx is not None and ctx.client else {}


def make_task_runner(runner: RunnerConfig):  # -> prefect TaskRunner
    """Threads (default), a temporary local Dask cluster, or an existing Dask scheduler.

    Workers of an existing scheduler keep the environment they were started with; a local
    cluster's workers get this flow's Prefect API (:func:`_worker_env`).
    """
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    from prefect_dask import DaskTaskRunner

    if runner.kind == "dask":
        return DaskTaskRunner(address=runner.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.n_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "env": _worker_env()})


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op CPU threads inside the block (None: leave torch's setting), then restore."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def split_threads(runner: RunnerConfig) -> contextlib.AbstractContextManager[None]:
    """While tasks run concurrently in threads, split the cores between them.

    torch's intra-op thread count is process-wide: two tasks each using every core would
    oversubscribe the machine (OpenMP threads then spin against each other).
    """
    import torch

    if runner.kind != "threads" or runner.max_workers <= 1:
        return contextlib.nullcontext()
    return torch_threads(max(1, torch.get_num_threads() // runner.max_workers))


# -- the temporary Prefect server dies with the process that started it -----------------------------
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """``preexec_fn`` of the server process: the kernel SIGKILLs it when its parent (the thread
    that forked it) dies, however the parent dies (SIGKILL included)."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nobody would ever stop us
        os._exit(1)


def start_prefect_server() -> str | None:
    """Start Prefect's temporary API server now, from this (the main) thread, tied to this process
    (Linux parent-death signal), unless ``PREFECT_API_URL`` names a server; returns its API URL.

    Prefect starts the same server lazily on first use (``SubprocessASGIServer()``, one per
    process) and stops it at exit, but a SIGKILLed process runs no exit handlers: its server
    (uvicorn, ~220 MB) would run on forever, one more per killed run. Started here, Prefect reuses
    this instance, and the server is killed by the kernel the moment this process dies.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        return None
    server = _tied_server_class()()
    server.start()
    return server.api_url


def _tied_server_class() -> type:
    import subprocess
    import types

    from prefect.server.api import server as prefect_server

    parent = os.getpid()

    class TiedServer(prefect_server.SubprocessASGIServer):
        """Prefect's temporary server whose process gets :func:`_die_with` as ``preexec_fn``."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            tied = types.SimpleNamespace(**vars(subprocess))
            tied.Popen = functools.partial(subprocess.Popen, preexec_fn=functools.partial(_die_with, parent))
            prefect_server.subprocess = tied  # only its Popen call of this method reads it
            try:
                return super()._run_uvicorn_command()
            finally:
                prefect_server.subprocess = subprocess

    return TiedServer


__all__ = ["IO_TASK", "TRANSIENT_RETRIES", "is_transient", "make_task_runner", "retry_on_transient",
           "split_threads", "start_prefect_server", "torch_threads"]
