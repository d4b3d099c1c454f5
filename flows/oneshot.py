"""The main job: one-shot compression of a causal LM, as Prefect flows tracked in MLflow.

    prepare inputs -> dense perplexity -> calibrate (one pass, or block by block) ->
    per-layer pruning tasks on the configured task runner -> assemble the pruned model ->
    optional sparse export -> pruned perplexity -> MLflow run + summary.json

All math lives in pruning_core; the tasks (flows/oneshot_tasks.py) move files and call it.
A job's directory holds a checksummed manifest of everything finished, so running the same
config again resumes where it stopped and finds its MLflow run again by the job hash and the
directory's run uid (job.json).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped
from tqdm.auto import tqdm

from flows import oneshot_tasks as t
from flows.config import OneShotJob
from flows.report import layer_figure
from flows.runtime import claimed_output_dir, flow_run_output_dir, make_task_runner, torch_threads
from flows.tracking import JOB_TAG, KIND_TAG, RUN_TAG, Tracker, flatten
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_write_text
from pruning_core.io.manifest import Manifest

log = logging.getLogger(__name__)


class StageClock:
    """Seconds per stage, kept in the run directory so a resumed job reports the first timings."""

    def __init__(self, run_dir: Path) -> None:
        self.file = run_dir / "timings.json"
        self.seconds: dict[str, float] = json.loads(self.file.read_text()) if self.file.exists() else {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if name not in self.seconds:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            atomic_write_text(self.file, json.dumps(self.seconds, indent=1))


@flow(name="prune-layers")
def prune_layers(job: OneShotJob, run_dir: str, inputs: dict[str, Any], stats: dict[str, str | None]) -> list[str]:
    """One task per layer, mapped over this subflow's task runner (threads or Dask)."""
    layers = inputs["layers"]
    scores_only = job.mask_scope == "global"
    with torch_threads(job.runner):
        futures = t.prune_layer.map(unmapped(job), unmapped(run_dir), unmapped(inputs["model_dir"]), layers,
                                    unmapped(stats), unmapped(scores_only))
        for future in tqdm(as_completed(futures), total=len(layers), desc="pruning layers", unit="layer"):
            future.result()
    if scores_only:
        return t.select_global(job, run_dir, layers)
    return [str(paths.layer_scores(run_dir, layer)) for layer in layers]


@flow(name="prune-blocks")
def prune_blocks(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> list[str]:
    """Sequential mode: one task per decoder block, each fed by the previous pruned block."""
    t.capture_inputs(job, run_dir, inputs)
    files: list[str] = []
    for index in tqdm(range(inputs["num_blocks"]), desc="pruning blocks", unit="block"):
        files += t.prune_block.submit(job, run_dir, inputs, index).result()
    return files


def _worker_env() -> dict[str, str]:
    """Environment for local Dask worker processes: this flow's Prefect API (an ephemeral
    server's URL is not in os.environ), so their task runs land in this flow run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return {"PREFECT_API_URL": str(ctx.client.api_url)} if ctx is not None and ctx.client else {}


def _tracking(job: OneShotJob, run_uid: str) -> tuple[Tracker, str]:
    Tracker.check_available(job.tracking.tracking_uri)  # fail fast, before any long work
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)
    # the job and its output directory: rerunning the directory resumes the run, a new one starts one
    tags = {JOB_TAG: job.job_hash(), KIND_TAG: "oneshot", RUN_TAG: run_uid, **job.tracking.tags}
    run_id, resumed = tracker.start_run(tags, run_name=job.tracking.run_name or job.name)
    tracker.set_tags(run_id, {"method": job.method, "pattern": job.pattern, "model": job.model,
                              "calibration_mode": job.calibration.mode})
    tracker.log_params(run_id, flatten(job.model_dump(mode="json", exclude={"tracking"})))
    if resumed:
        log.info("resuming MLflow run %s", run_id)
    return tracker, run_id


def _summary(job: OneShotJob, inputs: dict[str, Any], table: list[dict[str, Any]], ppl: dict[str, float | None],
             clock: StageClock, run_id: str, run_dir: Path, export: dict[str, Any] | None) -> dict[str, Any]:
    sizes = [r["shape"][0] * r["shape"][1] for r in table]
    pruned = sum(r["sparsity"] * n for r, n in zip(table, sizes, strict=True))
    return {
        "job_hash": job.job_hash(),
        "name": job.name,
        "method": job.method,
        "pattern": job.pattern,
        "scope": job.mask_scope,
        "calibration_mode": job.calibration.mode,
        "target_sparsity": job.target_sparsity,
        "sparsity": pruned / sum(sizes),
        "parameters_targeted": sum(sizes),
        "parameters_pruned": round(pruned),
        "perplexity_before": ppl["before"],
        "perplexity_after": ppl["after"],
        "mlflow_run_id": run_id,
        "model_dir": inputs["model_dir"],
        "pruned_model_dir": str(paths.model(run_dir)),
        "masks": str(paths.masks(run_dir)),
        "sparse_export": export["path"] if export else None,
        "sparse_export_size": {k: export[k] for k in ("format", "layers", "file_bytes", "dense_bytes", "size_ratio")}
        if export else None,
        "seconds": {**clock.seconds, "total": round(sum(clock.seconds.values()), 3)},
        "layers": table,
    }


def _log_results(tracker: Tracker, run_id: str, job: OneShotJob, summary: dict[str, Any], run_dir: Path) -> None:
    metrics = {"sparsity": summary["sparsity"], "parameters_pruned": summary["parameters_pruned"]}
    metrics.update({f"perplexity_{k}": summary[f"perplexity_{k}"] for k in ("before", "after")
                    if summary[f"perplexity_{k}"] is not None})
    metrics.update({f"seconds_{k}": v for k, v in summary["seconds"].items()})
    tracker.log_metrics(run_id, metrics)
    tracker.log_table(run_id, summary["layers"], "tables/layers.json")
    if not tracker.has_artifact(run_id, "figures/layers.png"):
        fig = layer_figure(summary["layers"], f"{job.name}: {job.method} {job.pattern}, "
                                              f"sparsity {summary['sparsity']:.3f}")
        tracker.log_figure(run_id, fig, "figures/layers.png")
    for name in ("summary.json", "config.json"):
        tracker.log_artifact(run_id, run_dir / name)
    if not tracker.has_artifact(run_id, "masks.safetensors"):
        tracker.log_artifact(run_id, paths.masks(run_dir))
    if job.tracking.log_model and not tracker.has_artifact(run_id, "model/config.json"):
        tracker.log_artifacts(run_id, paths.model(run_dir), "model")
    if summary["sparse_export"]:
        size = summary["sparse_export_size"]
        tracker.log_metrics(run_id, {"sparse_export_bytes": size["file_bytes"],
                                     "sparse_export_size_ratio": size["size_ratio"]})
        if not tracker.has_artifact(run_id, "sparse/sparse_index.json"):
            tracker.log_artifacts(run_id, summary["sparse_export"], "sparse")


@flow(name="oneshot-prune")
def oneshot_flow(job: OneShotJob, output_dir: str | None = None) -> dict[str, Any]:
    """Prune ``job.model`` one-shot as ``job`` describes; artifacts and summary.json go to ``output_dir``.

    Without ``output_dir`` (a deployment's scheduled run) each flow run gets a directory of its
    own, which a retry of the flow run resumes (:func:`flows.runtime.flow_run_output_dir`).
    """
    # absolute: tasks on Dask workers (other working directories) get the same directory
    run_dir = (Path(output_dir) if output_dir else flow_run_output_dir(job)).resolve()
    # (prod) refuse a directory holding another job's artifacts; hold it while the job runs
    with claimed_output_dir(run_dir, job) as run_uid:
        return _oneshot(job, run_dir, run_uid)


def _oneshot(job: OneShotJob, run_dir: Path, run_uid: str) -> dict[str, Any]:
    atomic_write_text(paths.config(run_dir), job.model_dump_json(indent=2))
    tracker, run_id = _tracking(job, run_uid)
    clock = StageClock(run_dir)
    try:
        with clock.stage("prepare"):
            inputs = t.prepare_inputs(job, str(run_dir))
        ppl: dict[str, float | None] = {"before": None, "after": None}
        if job.evaluation.enabled:
            with clock.stage("evaluate_dense"):
                ppl["before"] = t.evaluate(job, str(run_dir), inputs["model_dir"], "perplexity_before")
            tracker.log_metrics(run_id, {"perplexity_before": ppl["before"]})
        runner = make_task_runner(job.runner, worker_env=_worker_env())
        if job.calibration.mode == "one_pass":
            with clock.stage("calibrate"):
                stats = t.calibrate(job, str(run_dir), inputs)
            with clock.stage("prune"):
                prune_layers.with_options(task_runner=runner)(job, str(run_dir), inputs, stats)
        else:
            with clock.stage("calibrate_and_prune"):
                prune_blocks.with_options(task_runner=runner)(job, str(run_dir), inputs)
        with clock.stage("assemble"):
            table = t.assemble(job, str(run_dir), inputs)
        export = None
        if job.export.sparse_format != "none":
            with clock.stage("export"):
                export = t.export_sparse_model(job, str(run_dir))
        if job.evaluation.enabled:
            with clock.stage("evaluate_pruned"):
                ppl["after"] = t.evaluate(job, str(run_dir), str(paths.model(run_dir)), "perplexity_after")
        Manifest(run_dir).verify(checksums=False)
        summary = _summary(job, inputs, table, ppl, clock, run_id, run_dir, export)
        atomic_write_text(paths.summary(run_dir), json.dumps(summary, indent=2))
        with clock.stage("log"):
            _log_results(tracker, run_id, job, summary, run_dir)
        summary["seconds"] = {**clock.seconds, "total": round(sum(clock.seconds.values()), 3)}
        atomic_write_text(paths.summary(run_dir), json.dumps(summary, indent=2))
        tracker.log_metrics(run_id, {"seconds_log": clock.seconds["log"], "seconds_total": summary["seconds"]["total"]})
        tracker.log_artifact(run_id, paths.summary(run_dir))
        tracker.end_run(run_id, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.end_run(run_id, "FAILED")
        raise
    log.info("%s: sparsity %.4f, perplexity %s -> %s (MLflow %s)", job.name, summary["sparsity"],
             ppl["before"], ppl["after"], tracker.run_url(run_id))
    return summary


def run_oneshot(job: OneShotJob, output_dir: Path) -> dict[str, Any]:
    """Entry point of ``prune run`` for ``job: oneshot``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return oneshot_flow(job, str(output_dir))
