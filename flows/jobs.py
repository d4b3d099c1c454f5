"""Dispatch a validated job config to the flow that runs it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from flows.config import JobBase
from flows.runtime import default_output_dir

# job kind -> "module:function(job, output_dir) -> summary dict"
RUNNERS = {
    "oneshot": "flows.oneshot:run_oneshot",
    "minitron": "flows.minitron:run_minitron",
    "lottery": "flows.lottery:run_lottery",
}


def run_job(job: JobBase, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``job`` as its Prefect flow; returns the summary that is also written to summary.json."""
    out = Path(output_dir) if output_dir is not None else default_output_dir(job)
    module, _, attr = RUNNERS[job.job].partition(":")  # type: ignore[attr-defined]
    runner = getattr(importlib.import_module(module), attr)
    return runner(job, out.resolve())
