"""Deployment entry points of the Lottery Ticket and Minitron jobs (deployments/prefect.yaml).

Each is a thin flow around the job's own flow (run as a subflow) that gives a scheduled run what
``prune run`` gives a command-line run: an output directory claimed for the job, and MLflow runs
scoped to that directory (:func:`flows.jobs.run_job`). Without ``output_dir`` every flow run gets
a directory of its own (:func:`flows.runtime.flow_run_output_dir`): each night's run is a new
run with a new MLflow run, and a retry of a flow run resumes its directory and its MLflow run.
The one-shot flow (``flows/oneshot.py:oneshot_flow``) does this itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.lottery import LotteryJob
from flows.minitron import MinitronJob
from flows.runtime import flow_run_output_dir


def _run(job: LotteryJob | MinitronJob, output_dir: str | None) -> dict[str, Any]:
    from flows.jobs import run_job

    return run_job(job, Path(output_dir) if output_dir else flow_run_output_dir(job))


@flow(name="lottery-deployment", flow_run_name="lottery-{job.name}")
def lottery_deployment(job: LotteryJob, output_dir: str | None = None) -> dict[str, Any]:
    """A Lottery Ticket search (``flows/lottery_flow.py:lottery_search`` as a subflow)."""
    return _run(job, output_dir)


@flow(name="minitron-deployment", flow_run_name="minitron-{job.name}")
def minitron_deployment(job: MinitronJob, output_dir: str | None = None) -> dict[str, Any]:
    """A Minitron architecture search (``flows/minitron_flow.py:minitron_flow`` as a subflow)."""
    return _run(job, output_dir)


__all__ = ["lottery_deployment", "minitron_deployment"]
