"""Dispatch a validated job config to the flow that runs it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from flows.config import JobBase
from flows.runtime import claimed_output_dir, default_output_dir

# job kind -> "module:function(job, output_dir) -> summary dict"
RUNNERS = {
    "oneshot": "flows.oneshot:run_oneshot",
    "minitron": "flows.minitron:run_minitron",
    "lottery": "flows.lottery:run_lottery",
}


def run_job(job: JobBase, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``job`` as its Prefect flow; returns the summary that is also written to summary.json.

    The output directory (default ``runs/<name>-<job hash>``: running a config again resumes it)
    is claimed first and its MLflow runs are scoped to it (:func:`flows.tracking.run_scope`).
    """
    from flows.tracking import run_scope

    out = (Path(output_dir) if output_dir is not None else default_output_dir(job)).resolve()
    module, _, attr = RUNNERS[job.job].partition(":")  # type: ignore[attr-defined]
    runner = getattr(importlib.import_module(module), attr)
    with claimed_output_dir(out, job) as run_uid, run_scope(run_uid):
        return runner(job, out)
