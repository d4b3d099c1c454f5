"""The Minitron architecture search as Prefect flows, tracked in MLflow.

    minitron (parent flow)               JobRun: the directory, the MLflow parent run
      prepare-inputs                     model, candidates (bad targets fail here), windows, graph
      evaluate-perplexity-before         dense perplexity on the evaluation windows (cached across jobs)
      compute-scores                     every importance score, once -> scores.parquet
      minitron-candidates (subflow)      one task per candidate on the configured task runner;
                                         one MLflow child run per candidate, logged as it finishes
      rank -> rebuild-chosen             best calibration loss -> Hugging Face directory model/
      evaluate-perplexity-after          chosen model's perplexity
      measure-speed                      prefill/decode tokens/s of the chosen vs the dense model, and
                                         the bytes on disk (``evaluation.speed``, shared with one-shot)
      ranking table, figure, model       on the parent run; summary.json written atomically

All math lives in pruning_core; the tasks (:mod:`flows.minitron.tasks`) move files and call it. A
rerun of the same config resumes: finished artifacts are in the manifest (scores are never
recomputed, finished candidates never rescored) and MLflow runs are found again by their tags.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped
from tqdm.auto import tqdm

from flows import llm
from flows.execution import make_task_runner, split_threads
from flows.minitron import tasks as t
from flows.minitron.config import MinitronJob, short_architecture
from flows.publish import publish_model
from flows.runtime import JobRun
from flows.tracking import ROLE_TAG
from pruning_core.io import paths
from pruning_core.io.manifest import Manifest
from pruning_core.minitron import Architecture

# rounded, as headline/<key> in MLflow
HEADLINE = ("parameters", "dense_parameters", "perplexity_before", "perplexity_after", "dense_loss")
SPEED_NOTE = "a smaller dense model: fewer layers and narrower matrices run faster with the same kernels"


@flow(name="minitron-candidates")
def score_candidates(job: MinitronJob, run_dir: str, inputs: dict[str, Any], parent_run_id: str) -> list[dict[str, Any]]:
    """One task per candidate on this subflow's task runner; each result is logged as it arrives.

    A failed candidate does not stop the others: they finish and are recorded, then its error is
    raised (a rerun scores only what is missing)."""
    results, failure = [], None
    with split_threads(job.runner):
        futures = t.score_candidate.map(unmapped(job), unmapped(run_dir), unmapped(inputs), inputs["candidates"])
        for future in tqdm(as_completed(futures), total=len(futures), desc="candidates", unit="candidate"):
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - re-raised below, once the others are recorded
                failure = failure or exc
                continue
            t.log_candidate(job, parent_run_id, results[-1])
    if failure is not None:  # every finished candidate is on disk and in MLflow; a rerun does the rest
        raise failure
    return results


def rank(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best (lowest calibration loss) first; ties go to the larger, then by name. Adds ``rank``."""
    ordered = sorted(results, key=lambda r: (r["loss"], -r["parameters"], r["id"]))
    return [{**r, "rank": i + 1} for i, r in enumerate(ordered)]


def _summary(job: MinitronJob, inputs: dict[str, Any], ranked: list[dict[str, Any]], chosen: dict[str, Any],
             ppl: dict[str, float | None], run: JobRun) -> dict[str, Any]:
    dense = Architecture(**inputs["dense_architecture"])
    return {
        "job": "minitron", "name": job.name, "job_hash": job.job_hash(), "model": job.model,
        "model_dir": inputs["model_dir"], "depth_criterion": job.depth_criterion,
        "architecture": ranked[0]["architecture"], "parameters": chosen["parameters"],
        "dense_architecture": short_architecture(dense), "dense_parameters": inputs["dense_parameters"],
        "budget": inputs["budget"], "perplexity_before": ppl["before"], "perplexity_after": ppl["after"],
        "chosen": ranked[0]["id"], "chosen_model_dir": chosen["model_dir"], "sample": chosen["sample"],
        "dense_loss": float(t.load_scores(paths.scores_table(run.dir))[1]["dense_candidate_loss"]),
        "candidates_enumerated": inputs["candidates_enumerated"],
        "candidates": [{k: r[k] for k in ("rank", "id", "architecture", "parameters", "loss", "removed_layers")}
                       | {"distill_loss": r["distill_losses"][-1] if r["distill_losses"] else None} for r in ranked],
        "mlflow_run_id": run.run_id,
    }


def _headline(summary: dict[str, Any]) -> str:
    size = f"{summary['parameters'] / 1e6:.2f}M of {summary['dense_parameters'] / 1e6:.2f}M parameters"
    before, after = summary["perplexity_before"], summary["perplexity_after"]
    ppl = f", perplexity {before:.2f} -> {after:.2f}" if before is not None and after is not None else ""
    return f"chose {summary['chosen']} ({size}){ppl}"


@flow(name="minitron", flow_run_name="minitron-{job.name}")
def minitron_flow(job: MinitronJob, output_dir: str | None = None) -> dict[str, Any]:
    """Search ``job``'s architectures and keep the best; artifacts and summary.json go to ``output_dir``.

    Without ``output_dir`` (a deployment's scheduled run) each flow run gets a directory of its
    own, which a retry of the flow run resumes (:func:`flows.rundir.flow_run_output_dir`).
    """
    tags = {"model": job.model, "depth_criterion": job.depth_criterion}
    with JobRun.open(job, output_dir, identity={ROLE_TAG: "search"}, tags=tags) as run:
        job = run.job
        with run.stage("prepare"):
            inputs = t.prepare_inputs(job, run.dir)
        ppl: dict[str, float | None] = {"before": llm.evaluate_dense_stage(run, job, inputs["model_dir"]), "after": None}
        with run.stage("scores"):
            t.compute_importance(job, run.dir, inputs)
        with run.stage("candidates"):
            runner = make_task_runner(job.runner)
            ranked = rank(score_candidates.with_options(task_runner=runner)(job, run.dir, inputs, run.run_id))
        with run.stage("rebuild"):
            chosen = t.rebuild_chosen(job, run.dir, inputs, ranked[0])
        if job.evaluation.enabled:
            with run.stage("evaluate_chosen"):
                ppl["after"] = llm.evaluate_perplexity(run.dir, chosen["model_dir"], "after", job.evaluation,
                                                       job.device)
        speed = llm.speed_stage(run, job, inputs["model_dir"], chosen["model_dir"], SPEED_NOTE)
        Manifest(run.dir).verify(checksums=False)
        summary = {**_summary(job, inputs, ranked, chosen, ppl, run), "speed": speed,
                   "size": llm.model_sizes(inputs["model_dir"], chosen["model_dir"])}
        with run.stage("log"):
            t.log_results(job, run.dir, run.run_id, summary)
            summary["registered_model"] = publish_model(job, run.dir, run.run_id, summary, HEADLINE)
        load = ("from pruning_core.lm import load_causal_lm; "
                f"model, tokenizer = load_causal_lm({run.quoted(paths.model(run.dir))})")
        return run.finish({**summary, "seconds": run.clock.totals()}, headline=_headline(summary), load=load)


__all__ = ["minitron_flow", "rank", "score_candidates"]
