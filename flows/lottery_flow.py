"""The Lottery Ticket search as Prefect flows: one parent flow per search, one subflow per round.

    lottery (parent flow)              MLflow parent run (found again by the job hash tag)
      resume-point                     last committed round in the output directory
      log-round (completed rounds)     records only what a crash left unrecorded
      round-r (subflow) x R            open child run -> train-round (commit) -> log-round
      figure, tables, publish-ticket   accuracy vs density, winning ticket + registry alias
      summary.json                     written atomically

Rounds are sequential (each prunes the previous round's trained weights); the IMP retraining
and the controls of a round run one after the other inside the library's ``run_round`` (a
single library call, so a round's results are exactly the library's). A rerun with the same
config resumes after the last committed round: no finished round is retrained, and MLflow runs
and metric points are found again instead of duplicated.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from tqdm.auto import tqdm

from flows.lottery import EvalObserver, LotteryJob
from flows.lottery_steps import (
    close_run,
    log_round,
    open_round_run,
    publish_ticket,
    resume_point,
    search_identity,
    search_paths,
    summary_row,
    tracker_for,
    train_round,
)
from flows.report import lottery_figure
from flows.tracking import flatten
from pruning_core.io.atomic import atomic_path, atomic_write_text


@flow(name="lottery-round", flow_run_name="round-{round_index}")
def lottery_round(job: LotteryJob, output_dir: str, round_index: int, parent_run_id: str,
                  on_eval: EvalObserver | None = None) -> dict[str, Any]:
    """One round: its MLflow child run, the training (committed on disk), then its MLflow record."""
    child = open_round_run(job, round_index, parent_run_id)
    try:
        state = train_round(job, output_dir, round_index, on_eval)
    except BaseException:
        _close_quietly(job, child, "FAILED")
        raise
    log_round(job, output_dir, round_index, parent_run_id)
    return state


@flow(name="lottery", flow_run_name="lottery-{job.name}")
def lottery_search(job: LotteryJob, output_dir: str, on_eval: EvalObserver | None = None) -> dict[str, Any]:
    """Run or resume the search of ``job`` in ``output_dir``; returns the summary (also summary.json)."""
    started = time.perf_counter()
    parent = open_search_run(job)
    try:
        state = resume_point(job, output_dir)
        resumed_from = state["round"] + 1 if state["round"] >= 0 else None
        if resumed_from is not None:
            get_run_logger().info("resuming %s after round %d", output_dir, state["round"])
        for r in range(state["round"] + 1):  # what a crash may have left unrecorded (no-op otherwise)
            log_round(job, output_dir, r, parent)
        progress = RoundProgress(job, state)
        try:
            while not state["done"]:
                state = lottery_round(job, output_dir, state["round"] + 1, parent, on_eval)
                progress.update(state)
        finally:
            progress.close(complete=state["done"])
        rows = [summary_row(r) for r in state["records"]]
        log_search_results(job, output_dir, parent, rows)
        registered = publish_ticket(job, output_dir, parent, rows[-1])
        summary = write_summary(job, output_dir, parent, rows, registered, resumed_from,
                                time.perf_counter() - started)
    except BaseException:
        _close_quietly(job, parent, "FAILED")
        raise
    close_run(job, parent, "FINISHED")
    return summary


def _close_quietly(job: LotteryJob, run_id: str, status: str) -> None:
    """Mark a run failed without hiding the error that got us here."""
    try:
        close_run.fn(job, run_id, status)
    except Exception as exc:  # noqa: BLE001 - the original error is re-raised by the caller
        get_run_logger().warning("could not mark MLflow run %s %s: %s", run_id, status, exc)


@task(name="open-search-run", cache_policy=NO_CACHE)
def open_search_run(job: LotteryJob) -> str:
    """The search's MLflow parent run (resumed by its tags); params are logged once."""
    tracker = tracker_for(job)
    run_name = job.tracking.run_name or f"lottery-{job.name}-{job.job_hash()}"
    run_id, resumed = tracker.start_run(search_identity(job), run_name=run_name)
    params = flatten(job.model_dump(mode="json", exclude={"tracking", "runner"}))
    tracker.log_params(run_id, {**params, "job_hash": job.job_hash(), "config_hash": job.lottery_config().hashname()})
    tags = {**job.tracking.tags, "pruning.name": job.name or "", "prefect.flow_run_id": flow_run.id or ""}
    if resumed:
        tags["pruning.resumed"] = "true"
    tracker.set_tags(run_id, tags)
    if tracker.tracking_uri.startswith(("http://", "https://")):
        create_link_artifact(tracker.run_url(run_id), link_text="MLflow run", key=f"lottery-{job.job_hash()}-mlflow")
    return run_id


class RoundProgress:
    """A tqdm bar over rounds plus Prefect progress (0-100) and table artifacts, updated per round."""

    def __init__(self, job: LotteryJob, state: dict[str, Any]) -> None:
        self.total = job.search.pruning_rounds + 1  # round 0 is the dense run
        self.key = f"lottery-{job.job_hash()}"
        done = state["round"] + 1
        self.bar = tqdm(total=self.total, initial=done, desc=f"lottery {job.name}", unit="round")
        self.artifact = create_progress_artifact(
            progress=self._percent(done), key=f"{self.key}-progress", description=f"rounds of {job.name}")
        if state["records"]:
            self._table(state)

    def _percent(self, done: int) -> float:
        return round(100.0 * min(done, self.total) / self.total, 1)

    def _table(self, state: dict[str, Any]) -> None:
        rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary_row(r).items()
                 if k != "layer_density"} for r in state["records"]]
        create_table_artifact(rows, key=f"{self.key}-rounds", description="accuracy per round (IMP and controls)")

    def update(self, state: dict[str, Any]) -> None:
        self.bar.update(1)
        update_progress_artifact(self.artifact, progress=self._percent(state["round"] + 1))
        self._table(state)

    def close(self, complete: bool) -> None:
        if complete:
            update_progress_artifact(self.artifact, progress=100.0)
        self.bar.close()


@task(name="log-search-results", cache_policy=NO_CACHE)
def log_search_results(job: LotteryJob, output_dir: str, parent_run_id: str, rows: list[dict[str, Any]]) -> None:
    """The accuracy-vs-density figure, the per-round table and the headline metrics on the parent run."""
    import matplotlib.pyplot as plt

    tracker, paths = tracker_for(job), search_paths(job, output_dir)
    fig = lottery_figure(rows, f"{job.model}, {job.search.rewind_strategy} rewinding ({job.name})")
    with atomic_path(paths.figure) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tracker.log_artifact(parent_run_id, paths.figure)
    flat = [{k: v for k, v in r.items() if k != "layer_density"} for r in rows]
    tracker.log_table(parent_run_id, flat, "rounds.json")
    final = rows[-1]
    tracker.log_metrics_once(parent_run_id, [("dense_accuracy", rows[0]["accuracy"], 0),
                                             ("ticket_accuracy", final["accuracy"], final["round"]),
                                             ("ticket_density", final["density"], final["round"])])


@task(name="write-summary", cache_policy=NO_CACHE)
def write_summary(job: LotteryJob, output_dir: str, parent_run_id: str, rows: list[dict[str, Any]],
                  registered: dict[str, Any] | None, resumed_from: int | None, seconds: float) -> dict[str, Any]:
    """summary.json (atomic), also logged on the parent run."""
    paths, cfg = search_paths(job, output_dir), job.lottery_config()
    tracker = tracker_for(job)
    final = rows[-1]
    summary = {
        "job": "lottery",
        "name": job.name,
        "job_hash": job.job_hash(),
        "model": job.model,
        "dense_accuracy": rows[0]["accuracy"],
        "ticket_path": str(paths.ticket_dir(final["round"])),
        "ticket_round": final["round"],
        "ticket_density": final["density"],
        "ticket_accuracy": final["accuracy"],
        "rounds": rows,
        "mlflow_run_id": parent_run_id,
        "mlflow_tracking_uri": tracker.tracking_uri,
        "registered_model": registered,
        "resumed_from_round": resumed_from,
        "seconds": seconds,
        "training_seconds": sum(r["seconds"] for r in rows),
        "config_hash": cfg.hashname(),
        "search_config": cfg.to_dict(include_defaults=True),
    }
    atomic_write_text(paths.summary, json.dumps(summary, indent=1))
    tracker.log_artifact(parent_run_id, paths.summary)
    return summary
