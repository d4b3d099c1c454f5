"""The local production stack (scripts/stack.sh) as a session fixture: started once, on free
loopback ports, in a temporary state directory; stopped and deleted afterwards, also on failure."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.runtime import configure_environment

configure_environment()
REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "stack.sh"


@dataclass(frozen=True)
class Stack:
    state: Path
    env: dict[str, str]  # the environment the stack script ran with (STACK_* variables)
    prefect_api: str
    mlflow_uri: str
    dask_address: str
    startup_seconds: float

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(STACK), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def pid(self, service: str) -> int:
        return int((self.state / "pids" / f"{service}.pid").read_text())

    def client_env(self, **extra: str) -> dict[str, str]:
        """An environment for CLI clients (prefect, prune) pointed at the stack."""
        env = {**os.environ, "PREFECT_API_URL": self.prefect_api, "MLFLOW_TRACKING_URI": self.mlflow_uri,
               "PREFECT_HOME": str(self.state / "client-home"), "PYTHONPATH": str(REPO), "PWD": str(REPO)}
        env.update(extra)
        return env


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def postgres_available() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or bool(os.environ.get("STACK_PG_BIN"))


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """Start the whole stack (PostgreSQL, Prefect + MLflow servers, Dask scheduler + 2 workers,
    a Prefect process worker); stop it and delete its state at the end of the session."""
    if not postgres_available():
        pytest.skip("PostgreSQL binaries not found under /usr/lib/postgresql (apt-get install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")
    state = tmp_path_factory.mktemp("stack")
    pg, prefect, mlflow, dask = _free_ports(4)
    env = {**os.environ, "STACK_DIR": str(state), "STACK_PYTHON": sys.executable, "STACK_PG_PORT": str(pg),
           "STACK_PREFECT_PORT": str(prefect), "STACK_MLFLOW_PORT": str(mlflow), "STACK_DASK_PORT": str(dask),
           "STACK_PREFECT_UI": "false", "STACK_WORKER_POLL_SECONDS": "2", "STACK_DASK_MEMORY": "3GiB",
           "PRUNING_RUNS_DIR": str(state / "runs")}  # where deployment runs without output_dir write
    started = time.perf_counter()
    try:
        proc = subprocess.run([str(STACK), "start"], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"scripts/stack.sh start failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        yield Stack(state, env, f"http://127.0.0.1:{prefect}/api", f"http://127.0.0.1:{mlflow}",
                    f"tcp://127.0.0.1:{dask}", time.perf_counter() - started)
    finally:
        subprocess.run([str(STACK), "clean"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def stack_prefect(stack):
    """Point this process's Prefect client at the stack's server for one test."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api}):
        yield stack
