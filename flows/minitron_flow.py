"""The Minitron architecture search as Prefect flows, tracked in MLflow.

    minitron (parent flow)               MLflow parent run (found again by the job-hash tag)
      prepare-inputs                     model, candidates (bad targets fail here), windows, graph
      evaluate-perplexity_before         dense perplexity on the evaluation windows
      compute-scores                     every importance score, once -> scores.parquet
      minitron-candidates (subflow)      one task per candidate on the configured task runner;
                                         one MLflow child run per candidate, logged as it finishes
      rank -> rebuild-chosen             best calibration loss -> Hugging Face directory model/
      evaluate-perplexity_after          chosen model's perplexity
      ranking table, figure, model       on the parent run; summary.json written atomically

All math lives in pruning_core; the tasks (flows/minitron_tasks.py) move files and call it. A
rerun of the same config resumes: finished artifacts are in the manifest (scores are never
recomputed, finished candidates never rescored) and MLflow runs are found again by their tags.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped
from tqdm.auto import tqdm

from flows import minitron_tasks as t
from flows.minitron import MinitronJob, short_architecture
from flows.oneshot import StageClock
from flows.report import candidate_figure
from flows.runtime import make_task_runner, torch_threads
from flows.tracking import JOB_TAG, KIND_TAG, ROLE_TAG, Tracker, flatten
from pruning_core.errors import ConfigError
from pruning_core.io.atomic import atomic_write_text
from pruning_core.io.manifest import Manifest
from pruning_core.minitron import Architecture

log = logging.getLogger(__name__)
CANDIDATE_TAG = "pruning.candidate"
LOGGED_TAG = "pruning.candidate_logged"  # set on a candidate's child run once everything of it is logged


def tracker_for(job: MinitronJob) -> Tracker:
    return Tracker(job.tracking.tracking_uri, job.tracking.experiment)


def candidate_identity(job: MinitronJob, cid: str) -> dict[str, str]:
    return {JOB_TAG: job.job_hash(), ROLE_TAG: "candidate", CANDIDATE_TAG: cid}


def open_search_run(job: MinitronJob) -> tuple[Tracker, str]:
    """The job's MLflow parent run (resumed by its tags); params are logged once."""
    Tracker.check_available(job.tracking.tracking_uri)  # fail fast, before any long work
    tracker = tracker_for(job)
    identity = {JOB_TAG: job.job_hash(), KIND_TAG: "minitron", ROLE_TAG: "search"}
    run_id, resumed = tracker.start_run({**identity, **job.tracking.tags}, run_name=job.tracking.run_name or job.name)
    tracker.set_tags(run_id, {"model": job.model, "depth_criterion": job.depth_criterion})
    tracker.log_params(run_id, flatten(job.model_dump(mode="json", exclude={"tracking"})))
    if resumed:
        log.info("resuming MLflow run %s", run_id)
    return tracker, run_id


def log_candidate(job: MinitronJob, parent_run_id: str, result: dict[str, Any]) -> str:
    """A candidate's child run (architecture as params; parameters, loss as metrics), logged once."""
    tracker, identity = tracker_for(job), candidate_identity(job, result["id"])
    done = tracker.find_run({**identity, "mlflow.parentRunId": parent_run_id, LOGGED_TAG: "true"})
    if done:
        return done
    child, _ = tracker.start_run(identity, run_name=result["id"], parent_run_id=parent_run_id)
    tracker.log_params(child, {**result["architecture"], "removed_layers": result["removed_layers"]})
    points = [("parameters", result["parameters"], 0), ("loss", result["loss"], 0), ("seconds", result["seconds"], 0)]
    points += [("distill_kl", v, i) for i, v in enumerate(result["distill_losses"])]
    tracker.log_metrics_once(child, points)
    tracker.set_tags(child, {LOGGED_TAG: "true"})
    tracker.end_run(child)
    return child


@flow(name="minitron-candidates")
def score_candidates(job: MinitronJob, run_dir: str, inputs: dict[str, Any], parent_run_id: str) -> list[dict[str, Any]]:
    """One task per candidate on this subflow's task runner; each result is logged as it arrives.

    A failed candidate does not stop the others: they finish and are recorded, then its error is
    raised (a rerun scores only what is missing)."""
    results, failure = [], None
    with torch_threads(job.runner):
        futures = t.score_candidate.map(unmapped(job), unmapped(run_dir), unmapped(inputs), inputs["candidates"])
        for future in tqdm(as_completed(futures), total=len(futures), desc="candidates", unit="candidate"):
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - re-raised below, once the others are recorded
                failure = failure or exc
                continue
            log_candidate(job, parent_run_id, results[-1])
    if failure is not None:  # every finished candidate is on disk and in MLflow; a rerun does the rest
        raise failure
    return results


def rank(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best (lowest calibration loss) first; ties go to the larger, then by name. Adds ``rank``."""
    ordered = sorted(results, key=lambda r: (r["loss"], -r["parameters"], r["id"]))
    return [{**r, "rank": i + 1} for i, r in enumerate(ordered)]


def claim(job: MinitronJob, run_dir: Path) -> None:
    """Refuse a directory that holds another job's artifacts; record this job's config in it."""
    config = run_dir / "config.json"
    if config.is_file():
        other = json.loads(config.read_text()).get("job_hash")
        if other != job.job_hash():
            raise ConfigError("output_dir", f"{run_dir} holds job {other}, not {job.job_hash()}; use another directory")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config, json.dumps({"job_hash": job.job_hash(), "job": job.model_dump(mode="json")}, indent=1))


def _summary(job: MinitronJob, inputs: dict[str, Any], ranked: list[dict[str, Any]], chosen: dict[str, Any],
             ppl: dict[str, float | None], run_id: str, run_dir: Path) -> dict[str, Any]:
    dense = Architecture(**inputs["dense_architecture"])
    return {
        "job": "minitron", "name": job.name, "job_hash": job.job_hash(), "model": job.model,
        "model_dir": inputs["model_dir"], "depth_criterion": job.depth_criterion,
        "architecture": ranked[0]["architecture"], "parameters": chosen["parameters"],
        "dense_architecture": short_architecture(dense), "dense_parameters": inputs["dense_parameters"],
        "budget": inputs["budget"], "perplexity_before": ppl["before"], "perplexity_after": ppl["after"],
        "chosen": ranked[0]["id"], "chosen_model_dir": chosen["model_dir"], "sample": chosen["sample"],
        "dense_loss": float(t.load_scores(run_dir / "scores.parquet")[1]["dense_candidate_loss"]),
        "candidates_enumerated": inputs["candidates_enumerated"],
        "candidates": [{k: r[k] for k in ("rank", "id", "architecture", "parameters", "loss", "removed_layers")}
                       | {"distill_loss": r["distill_losses"][-1] if r["distill_losses"] else None} for r in ranked],
        "mlflow_run_id": run_id,
    }


def log_results(tracker: Tracker, run_id: str, job: MinitronJob, summary: dict[str, Any], run_dir: Path) -> None:
    """Headline metrics, the ranking table and figure, the chosen model, on the parent run."""
    metrics = {"parameters": summary["parameters"], "dense_parameters": summary["dense_parameters"],
               "best_loss": summary["candidates"][0]["loss"], "dense_loss": summary["dense_loss"],
               "candidates": len(summary["candidates"])}
    metrics |= {f"perplexity_{k}": summary[f"perplexity_{k}"] for k in ("before", "after")
                if summary[f"perplexity_{k}"] is not None}
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(run_id, {"chosen": summary["chosen"]})
    rows = [{"rank": c["rank"], "id": c["id"], **c["architecture"], "parameters": c["parameters"], "loss": c["loss"]}
            for c in summary["candidates"]]
    tracker.log_table(run_id, rows, "tables/candidates.json")
    create_table_artifact(rows, key=f"minitron-{job.job_hash()}-candidates", description="candidates by loss")
    for child in tracker.child_runs(run_id):
        cid = child.data.tags.get(CANDIDATE_TAG)
        tracker.set_tags(child.info.run_id, {"rank": next(r["rank"] for r in rows if r["id"] == cid)})
    if not tracker.has_artifact(run_id, "figures/candidates.png"):
        fig = candidate_figure(rows, summary["chosen"], summary["dense_loss"],
                               f"{job.name}: {len(rows)} candidates, {job.depth_criterion} depth criterion")
        tracker.log_figure(run_id, fig, "figures/candidates.png")
    for name in ("config.json", "scores.parquet"):
        tracker.log_artifact(run_id, run_dir / name)
    if job.tracking.log_model and not tracker.has_artifact(run_id, "model/config.json"):
        tracker.log_artifacts(run_id, run_dir / "model", "model")


@flow(name="minitron", flow_run_name="minitron-{job.name}")
def minitron_flow(job: MinitronJob, output_dir: str) -> dict[str, Any]:
    """Search ``job``'s architectures and keep the best; artifacts and summary.json go to ``output_dir``."""
    run_dir = Path(output_dir)
    claim(job, run_dir)
    tracker, run_id = open_search_run(job)
    clock, ppl = StageClock(run_dir), {"before": None, "after": None}
    try:
        with clock.stage("prepare"):
            inputs = t.prepare_inputs(job, str(run_dir))
        if job.evaluation.enabled:
            with clock.stage("evaluate_dense"):
                ppl["before"] = t.evaluate(job, str(run_dir), inputs["model_dir"], "perplexity_before")
            tracker.log_metrics(run_id, {"perplexity_before": ppl["before"]})
        with clock.stage("scores"):
            t.compute_importance(job, str(run_dir), inputs)
        with clock.stage("candidates"):
            runner = make_task_runner(job.runner)
            ranked = rank(score_candidates.with_options(task_runner=runner)(job, str(run_dir), inputs, run_id))
        with clock.stage("rebuild"):
            chosen = t.rebuild_chosen(job, str(run_dir), inputs, ranked[0])
        if job.evaluation.enabled:
            with clock.stage("evaluate_chosen"):
                ppl["after"] = t.evaluate(job, str(run_dir), chosen["model_dir"], "perplexity_after")
        Manifest(run_dir).verify(checksums=False)
        summary = _summary(job, inputs, ranked, chosen, ppl, run_id, run_dir)
        with clock.stage("log"):
            log_results(tracker, run_id, job, summary, run_dir)
        summary["seconds"] = {**clock.seconds, "total": round(sum(clock.seconds.values()), 3)}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        tracker.log_metrics(run_id, {f"seconds_{k}": v for k, v in summary["seconds"].items()})
        tracker.log_artifact(run_id, run_dir / "summary.json")
        tracker.end_run(run_id, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.end_run(run_id, "FAILED")
        raise
    log.info("%s: chosen %s, %d parameters, perplexity %s -> %s (MLflow %s)", job.name, summary["chosen"],
             summary["parameters"], ppl["before"], ppl["after"], tracker.run_url(run_id))
    return summary


__all__ = ["minitron_flow", "rank", "score_candidates"]
