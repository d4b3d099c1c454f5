"""Flow tests: one Prefect test server per session, a temporary SQLite MLflow store per test."""

from __future__ import annotations

import pytest

from flows.runtime import configure_environment

configure_environment()


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (temporary SQLite database) shared by the session's flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store; flows pick it up through MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return uri
