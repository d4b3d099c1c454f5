"""Shared helpers of the one-shot flow tests on the tiny random Llama (not a test module)."""

from __future__ import annotations

from typing import Any

from flows.jobs import parse_config
from flows.oneshot import OneShotJob

# Small enough that a whole flow run takes a few seconds on 2 cores.
SMALL: dict[str, Any] = {
    "calibration": {"num_windows": 8, "window_length": 32, "batch_size": 4},
    "evaluation": {"num_windows": 4, "window_length": 32, "batch_size": 4, "error_windows": 2},
    "device": "cpu",
}


def tiny_job(model_dir, **fields: Any) -> OneShotJob:
    """A validated one-shot job on ``model_dir`` with the SMALL windows; ``fields`` override."""
    job = parse_config({"model": str(model_dir), **SMALL, **fields}, "test.yaml")
    assert isinstance(job, OneShotJob)
    return job.model_copy(update={"name": fields.get("name", "tiny")})
