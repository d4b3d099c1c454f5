"""The API's end-to-end test reuses the flow tests' fixtures (Prefect test server, SQLite MLflow store)."""

from __future__ import annotations

import pytest

from flows.runtime import configure_environment

configure_environment()


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return uri
