"""The Lottery Ticket search as Prefect flows: one parent flow per search, one subflow per round.

    lottery (parent flow)              JobRun: the directory, the MLflow parent run
      resume-point                     last committed round in the output directory
      log-round (completed rounds)     records only what a crash left unrecorded
      round-r (subflow) x R            open child run -> train-round (commit) -> log-round
      figure, tables, publish-ticket   accuracy vs density, winning ticket + registry alias
      summary.json                     written atomically (JobRun.finish)

Rounds are sequential (each prunes the previous round's trained weights); the IMP retraining
and the controls of a round run one after the other inside the library's ``run_round`` (a
single library call, so a round's results are exactly the library's). A rerun with the same
config resumes after the last committed round: no finished round is retrained, and MLflow runs
and metric points are found again instead of duplicated.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from tqdm.auto import tqdm

from flows.lottery import tasks as t
from flows.lottery.config import LotteryJob
from flows.lottery.tasks import EvalObserver
from flows.publish import headline_metrics
from flows.runtime import JobRun
from flows.tracking import ROLE_TAG

log = logging.getLogger(__name__)

@flow(name="lottery-round", flow_run_name="round-{round_index}")
def lottery_round(job: LotteryJob, run_dir: str, round_index: int, parent_run_id: str,
                  on_eval: EvalObserver | None = None) -> dict[str, Any]:
    """One round: its MLflow child run, the training (committed on disk), then its MLflow record."""
    child = t.open_round_run(job, round_index, parent_run_id)
    try:
        state = t.train_round(job, run_dir, round_index, on_eval)
    except BaseException:
        try:  # mark the round failed without hiding the error that got us here
            t.close_run.fn(job, child, "FAILED")
        except Exception as exc:  # noqa: BLE001 - the original error is re-raised below
            log.warning("could not mark MLflow run %s FAILED: %s", child, exc)
        raise
    t.log_round(job, run_dir, round_index, parent_run_id)
    return state


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
        rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.summary_row(r).items()
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


def _rounds(run: JobRun, job: LotteryJob, on_eval: EvalObserver | None) -> tuple[dict[str, Any], int | None]:
    """Resume after the last committed round and run the rest; the final state and where it resumed."""
    state = t.resume_point(job, run.dir)
    resumed_from = state["round"] + 1 if state["round"] >= 0 else None
    if resumed_from is not None:
        log.info("resuming %s after round %d", run.dir, state["round"])
    for r in range(state["round"] + 1):  # what a crash may have left unrecorded (no-op otherwise)
        t.log_round(job, run.dir, r, run.run_id)
    progress = RoundProgress(job, state)
    try:
        while not state["done"]:
            state = lottery_round(job, run.dir, state["round"] + 1, run.run_id, on_eval)
            progress.update(state)
    finally:
        progress.close(complete=state["done"])
    return state, resumed_from


def _summary(job: LotteryJob, run: JobRun, rows: list[dict[str, Any]], registered: dict[str, Any] | None,
             resumed_from: int | None, seconds: float) -> dict[str, Any]:
    cfg, final = job.lottery_config(), rows[-1]
    return {
        "job": "lottery", "name": job.name, "job_hash": job.job_hash(), "model": job.model,
        "dense_accuracy": rows[0]["accuracy"], "ticket_path": str(t.ticket_dir(job, run.dir, final["round"])),
        "ticket_round": final["round"], "ticket_density": final["density"], "ticket_accuracy": final["accuracy"],
        "rounds": rows, "mlflow_run_id": run.run_id, "mlflow_tracking_uri": run.tracker.tracking_uri,
        "registered_model": registered, "resumed_from_round": resumed_from, "seconds": seconds,
        "training_seconds": sum(r["seconds"] for r in rows), "config_hash": cfg.hashname(),
        "search_config": cfg.to_dict(include_defaults=True),
    }


def _headline(summary: dict[str, Any]) -> str:
    return (f"ticket of round {summary['ticket_round']}: density {summary['ticket_density']:.2%}, "
            f"accuracy {summary['ticket_accuracy']:.4f} (dense {summary['dense_accuracy']:.4f})")


@flow(name="lottery", flow_run_name="lottery-{job.name}")
def lottery_flow(job: LotteryJob, output_dir: str | None = None, on_eval: EvalObserver | None = None) -> dict[str, Any]:
    """Run or resume the search of ``job`` in ``output_dir``; returns the summary (also summary.json).

    Args:
        job: the validated job.
        output_dir: where the round checkpoints, figures and ``summary.json`` go; None (a
            deployment's scheduled run): a directory of the flow run's own.
        on_eval: an in-process observer ``on_eval(spec, step, metrics)`` called at every test-set
            evaluation of every training run (``spec.round_index``, ``spec.run``); an exception it
            raises aborts the search, which a rerun resumes at the interrupted round.
    """
    started = time.perf_counter()
    params = {"config_hash": job.lottery_config().hashname()}
    with JobRun.open(job, output_dir, identity={ROLE_TAG: "search"}, params=params) as run:
        job = run.job
        state, resumed_from = _rounds(run, job, on_eval)
        rows = [t.summary_row(r) for r in state["records"]]
        t.log_search_results(job, run.dir, run.run_id, rows)
        registered = t.publish_ticket(job, run.dir, run.run_id, rows[-1])
        summary = _summary(job, run, rows, registered, resumed_from, time.perf_counter() - started)
        headline = headline_metrics(summary, ("ticket_accuracy", "ticket_density", "dense_accuracy"))
        run.tracker.log_metrics_once(run.run_id, [(k, v, 0) for k, v in headline.items()])  # once, also on resume
        load = (f"from flows.lottery import load_ticket_model; "
                f'model, ticket = load_ticket_model({run.quoted(summary["ticket_path"])}, "{job.model}")')
        return run.finish(summary, headline=_headline(summary), load=load)


__all__ = ["lottery_flow", "lottery_round"]
