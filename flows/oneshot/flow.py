"""The main job: one-shot compression of a causal LM, as Prefect flows tracked in MLflow.

    prepare inputs -> [allocation search (flows.oneshot.search) -> allocate: per-unit targets]
    -> dense perplexity (streamed, cached across jobs) -> calibrate (one streamed
    pass; none for methods that read no statistics) -> per-unit pruning tasks on the configured
    task runner -> assemble (stream the model again, writing each pruned block) -> optional
    sparse export -> optional quantization (joint: quantized in the prune step on the same
    Hessians, flows.oneshot.joint, only exported here; else a separate pass, flows.oneshot.output)
    -> pruned perplexity (streamed)
    -> speed -> model cards -> MLflow run + summary.json
    (sequential mode: one streamed pass calibrates, prunes and writes block after block)

The pruning stages never hold the whole model: memory is bounded by the embeddings/head + one
decoder block + one depth's activations (issue 13 §3). The allocation search's fitness (optional)
and recovery (optional) are the exceptions: they hold whole models.

All math lives in pruning_core; the tasks (:mod:`flows.oneshot.tasks`) move files and call it,
and :class:`flows.runtime.JobRun` claims the directory, tracks the run and writes the summary.
A job's directory holds a checksummed manifest of everything finished, so running the same
config again resumes where it stopped and finds its MLflow run again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped
from tqdm.auto import tqdm

from flows import llm
from flows.artifacts import layer_table
from flows.execution import make_task_runner, split_threads
from flows.oneshot import output
from flows.oneshot import tasks as t
from flows.oneshot.allocation import allocate, allocation_summary
from flows.oneshot.config import OneShotJob
from flows.oneshot.joint import export_joint
from flows.oneshot.recovery import recover, recovery_summary
from flows.oneshot.search import search_allocation, search_done
from flows.publish import publish_model
from flows.runtime import JobRun
from pruning_core.io import paths
from pruning_core.io.manifest import Manifest

HEADLINE = ("sparsity", "perplexity_before", "perplexity_after")  # rounded, as headline/<key> in MLflow
SPEED_NOTE = "dense kernels: unstructured/N:M zeros are multiplied like any weight"


@flow(name="prune-layers")
def prune_layers(job: OneShotJob, run_dir: str, inputs: dict[str, Any], stats: dict[str, str | None]) -> list[str]:
    """One task per prunable unit, mapped over this subflow's task runner (threads or Dask)."""
    layers = inputs["layers"]
    scores_only = job.mask_scope == "global"
    with split_threads(job.runner):
        futures = t.prune_layer.map(unmapped(job), unmapped(run_dir), unmapped(inputs["model_dir"]), layers,
                                    unmapped(stats), unmapped(scores_only))
        for future in tqdm(as_completed(futures), total=len(layers), desc="pruning layers", unit="layer"):
            future.result()
    if scores_only:
        return t.select_global(job, run_dir, layers)
    return [str(paths.layer_scores(run_dir, layer)) for layer in layers]


@flow(name="prune-blocks")
def prune_blocks(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> None:
    """Sequential mode: one streamed pass, each block calibrated on the pruned blocks' outputs."""
    t.prune_sequential(job, run_dir, inputs)


def _prune(run: JobRun, job: OneShotJob, inputs: dict[str, Any]) -> None:
    """Calibrate and prune every layer: one pass then one task per layer, or block by block."""
    runner = make_task_runner(job.runner)
    if job.calibration.mode == "sequential":
        with run.stage("calibrate_and_prune"):
            prune_blocks.with_options(task_runner=runner)(job, run.dir, inputs)
        return
    stats: dict[str, str | None] = {"stats": None, "hessians": None}
    if t.needs_stats(job)[0]:  # magnitude reads no statistics: no calibration pass
        with run.stage("calibrate"):
            stats = t.calibrate(job, run.dir, inputs)
    with run.stage("prune"):
        prune_layers.with_options(task_runner=runner)(job, run.dir, inputs, stats)


def _prepare(run: JobRun, job: OneShotJob) -> dict[str, Any]:
    with run.stage("prepare"):
        inputs = t.prepare_inputs(job, run.dir)
        if job.quantization is not None:  # typed errors (group size, layer kinds) before long work
            output.check_quantization(job, inputs["model_dir"])
    if job.allocation.kind == "search" and not search_done(run.dir):
        with run.stage("allocation_search"):
            search_allocation.with_options(task_runner=make_task_runner(job.runner))(job, run.dir, inputs, run.run_id)
    if job.allocation.non_uniform:
        with run.stage("allocate"):
            allocate(job, run.dir, inputs, run.run_id)
    return inputs


def _quantize(run: JobRun, job: OneShotJob) -> tuple[dict[str, Any] | None, Path]:
    """The optional quantization: a separate ``quantize`` stage (``joint: false``), or, when the prune
    step quantized (joint), only the ``export_quantized`` stage; returns its summary and the
    directory to evaluate."""
    if job.quantization is None:
        return None, paths.model(run.dir)
    if job.joint_quantization:
        with run.stage("export_quantized"):
            quant = export_joint(job, run.dir)
    else:
        with run.stage("quantize"):
            quant = output.quantize(job, run.dir)
    run.log_metrics({"quantized_bytes": quant["file_bytes"], "quantization_error": quant["mean_error"],
                     "quantization_rtn_error": quant["mean_rtn_error"]})
    return quant, paths.dequantized_model(run.dir)  # the quantized weights, loadable anywhere


def _speed(run: JobRun, job: OneShotJob, inputs: dict[str, Any], evaluated: Path) -> dict[str, Any] | None:
    return llm.speed_stage(run, job, inputs["model_dir"], str(evaluated), SPEED_NOTE)


def _with_outputs(run: JobRun, job: OneShotJob, inputs: dict[str, Any], summary: dict[str, Any],
                  quant: dict[str, Any] | None, speed: dict[str, Any] | None) -> dict[str, Any]:
    """The summary with quantization, speed and sizes; the model cards written from it."""
    summary = {**summary, "quantization": quant, "speed": speed,
               "size": output.model_sizes(inputs["model_dir"], run.dir, quant is not None)}
    with run.stage("model_card"):
        output.write_cards(job, run.dir, summary)
    return summary


def _summary(job: OneShotJob, inputs: dict[str, Any], table: list[dict[str, Any]], ppl: dict[str, float | None],
             run: JobRun, export: dict[str, Any] | None) -> dict[str, Any]:
    sizes = [r["shape"][0] * r["shape"][1] for r in table]
    pruned = sum(r["sparsity"] * n for r, n in zip(table, sizes, strict=True))
    return {
        "job_hash": job.job_hash(), "name": job.name, "method": job.method, "pattern": job.pattern,
        "scope": job.mask_scope, "calibration_mode": job.calibration.mode, "target_sparsity": job.target_sparsity,
        "sparsity": pruned / sum(sizes), "parameters_targeted": sum(sizes), "parameters_pruned": round(pruned),
        "perplexity_before": ppl["before"], "perplexity_after": ppl["after"], "mlflow_run_id": run.run_id,
        "model_dir": inputs["model_dir"], "dtype": inputs.get("dtype"), "pruned_model_dir": str(paths.model(run.dir)),
        "masks": str(paths.masks(run.dir)), "sparse_export": export["path"] if export else None,
        "sparse_export_size": {k: export[k] for k in ("format", "layers", "file_bytes", "dense_bytes", "size_ratio")}
        if export else None,
        "seconds": run.clock.totals(), "layers": table,
    }


def _headline(summary: dict[str, Any]) -> str:
    before, after = summary["perplexity_before"], summary["perplexity_after"]
    ppl = f", perplexity {before:.2f} -> {after:.2f}" if before is not None and after is not None else ""
    return f"{summary['method']} {summary['pattern']}, sparsity {summary['sparsity']:.3f}{ppl}"


@flow(name="oneshot-prune")
def oneshot_flow(job: OneShotJob, output_dir: str | None = None) -> dict[str, Any]:
    """Prune ``job.model`` one-shot as ``job`` describes; artifacts and summary.json go to ``output_dir``.

    Without ``output_dir`` (a deployment's scheduled run) each flow run gets a directory of its
    own, which a retry of the flow run resumes (:func:`flows.rundir.flow_run_output_dir`).
    """
    tags = {"method": job.method, "pattern": job.pattern, "model": job.model, "calibration_mode": job.calibration.mode}
    with JobRun.open(job, output_dir, tags=tags) as run:
        job = run.job
        inputs = _prepare(run, job)
        ppl: dict[str, float | None] = {"before": llm.evaluate_dense_stage(run, job, inputs["model_dir"]), "after": None}
        _prune(run, job, inputs)
        with run.stage("assemble"):
            table = t.assemble(job, run.dir, inputs)
        if job.recovery is not None:
            with run.stage("recover"):
                recover(job, run.dir, inputs, run.run_id)
        export = None
        if job.export.sparse_format != "none":
            with run.stage("export"):
                export = t.export_sparse_model(job, run.dir)
        quant, evaluated = _quantize(run, job)
        if job.evaluation.enabled:
            with run.stage("evaluate_pruned"):
                ppl["after"] = llm.evaluate_perplexity(run.dir, str(evaluated), "after", job.evaluation,
                                                       job.device)
        speed = _speed(run, job, inputs, evaluated)
        Manifest(run.dir).verify(checksums=False)
        summary = {**_summary(job, inputs, table, ppl, run, export), **allocation_summary(job, run.dir),
                   **recovery_summary(job, run.dir)}
        summary = _with_outputs(run, job, inputs, summary, quant, speed)
        with run.stage("log"):
            t.log_results(job, run.dir, run.run_id, summary)
            summary["registered_model"] = publish_model(job, run.dir, run.run_id, summary, HEADLINE)
            layer_table(job, summary["layers"])
        load = ("from pruning_core.lm import load_causal_lm; "
                f"model, tokenizer = load_causal_lm({run.quoted(paths.model(run.dir))})")
        return run.finish({**summary, "seconds": run.clock.totals()}, headline=_headline(summary), load=load)


__all__ = ["oneshot_flow", "prune_blocks", "prune_layers"]
