"""Flow tests: one Prefect test server per session, a temporary SQLite MLflow store per test
(the ``prefect_server`` and ``mlflow_uri`` fixtures live in tests/conftest.py, shared with the API tests)."""

from __future__ import annotations

from flows.runtime import configure_environment

configure_environment()
