"""API tests: the process environment a job sets (offline, no telemetry) before Prefect is imported."""

from __future__ import annotations

from flows.runtime import configure_environment

configure_environment()
