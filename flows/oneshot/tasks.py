"""Tasks of the one-shot job. Each one loads its inputs from files, calls pruning_core, writes
its outputs atomically, records them in the run's manifest and returns small values (paths,
names, numbers), so tasks can run in threads, processes or on Dask workers alike.

Every task is idempotent at the artifact level: if the manifest already holds its verified
outputs it returns them without recomputing, which is how a crashed job resumes. The tasks that
load the whole model (``prepare_inputs``, ``calibrate``, ``capture_inputs``, ``assemble``) are
separate, small functions so that block-by-block (streaming) versions can replace them one by one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from prefect import task

from flows import llm
from flows.execution import IO_TASK
from flows.oneshot.allocation import allocation_targets, layer_target
from flows.oneshot.config import OneShotJob
from flows.oneshot.recovery import recovery_windows
from flows.report import layer_figure
from flows.tracking import Tracker
from pruning_core.calibration import (
    BlockInputs,
    calibrate_block,
    capture_block_inputs,
    collect_activation_stats,
    run_block,
)
from pruning_core.calibration.sequential import find_decoder_blocks
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_write_text
from pruning_core.io.layers import load_layer_result, load_layer_scores, save_layer_result
from pruning_core.io.manifest import Manifest
from pruning_core.io.masks import load_masks, save_masks
from pruning_core.io.stats import load_layer_stats, save_activation_stats, save_hessians
from pruning_core.io.tensors import load_tensors, save_tensors
from pruning_core.lm import model_fingerprint, resolve_device, save_pretrained_atomic
from pruning_core.lm.weights import load_decoder_block, read_weight
from pruning_core.masks import SparsitySpec, Unstructured, generate_global_masks
from pruning_core.methods import Method, get_method
from pruning_core.metrics import layer_output_errors
from pruning_core.pruning import prune_module, target_layers
from pruning_core.sparse import export_sparse, read_export_info

log = logging.getLogger(__name__)


# -- the one place this job calls pruning_core's method API ---------------------------------------
def method_of(job: OneShotJob) -> Method:
    """The registered method a job's ``method`` names, with its options (SparseGPT's solver)."""
    options = job.sparsegpt.model_dump() if job.method == "sparsegpt" else {}
    return get_method(job.method, **options)


def spec_of(job: OneShotJob, name: str | None = None, allocation: str | Mapping[str, float] | None = None) -> SparsitySpec:
    """What to prune: the job's sparsity, pattern and (for unstructured masks) comparison scope.

    With ``allocation`` (the run's ``allocation_targets.json``, or ``{layer: sparsity}``) and a
    layer ``name``: that layer's allocated sparsity, rounded to its comparison groups
    (:mod:`flows.oneshot.allocation`).
    """
    pattern = job.sparsity_pattern
    scope = job.mask_scope if isinstance(pattern, Unstructured) else None
    spec = SparsitySpec.parse(job.sparsity, pattern, scope, default_scope=method_of(job).default_scope)
    return spec if allocation is None or name is None else spec.with_sparsity(layer_target(allocation, name))


def needs_stats(job: OneShotJob) -> tuple[bool, bool]:
    """Whether the method reads activation statistics, and whether it needs Hessians (XᵀX)."""
    method = method_of(job)
    return method.needs_stats, method.needs_hessian


def prune_one(job: OneShotJob, weight: torch.Tensor, stats: Any, *, name: str,
              allocation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one ``[out, in]`` weight: ``(new weight, bool keep mask)``, both shaped like ``weight``."""
    return method_of(job).prune_weight(weight, stats, spec_of(job, name, allocation), name=name)


def score_one(job: OneShotJob, weight: torch.Tensor, stats: Any, *, name: str) -> torch.Tensor:
    """The method's importance scores of one weight (for a GLOBAL selection), shaped like ``weight``."""
    return method_of(job).score(weight, stats, name=name)


def prune_block_layers(job: OneShotJob, block: torch.nn.Module, ctx: Any, prefix: str,
                       layers: list[str], allocation: str | None = None) -> dict[str, torch.Tensor]:
    """Prune ``layers`` of a decoder block in place (``prefix``: the block's module path + "."); their masks.

    With an ``allocation`` each layer is pruned at its own sparsity (one ``prune_module`` call per layer).
    """
    groups = [(layers, spec_of(job))] if allocation is None else [([n], spec_of(job, n, allocation)) for n in layers]
    masks: dict[str, torch.Tensor] = {}
    for names, spec in groups:
        result = prune_module(block, method_of(job), spec, ctx, prefix=prefix,
                              filter_fn=lambda name, _m, names=names: name in names, measure_memory=False)
        masks.update({name: result.masks[name].tensor for name in names})
    return masks


# -- tasks ------------------------------------------------------------------------------------------
def _done(run_dir: str, *names: str) -> bool:
    manifest = Manifest(run_dir)
    return all(manifest.is_complete(n) for n in names)


def _metadata(job: OneShotJob, inputs: dict[str, Any]) -> dict[str, str]:
    return {"job_hash": job.job_hash(), "model_fingerprint": inputs["fingerprint"], "method": job.method,
            "config": job.model_dump_json(exclude={"tracking", "runner"})}


def _calibration_batches(job: OneShotJob, run_dir: str, count: int | None = None) -> list[torch.Tensor]:
    return llm.window_batches(run_dir, "calibration", job.calibration.batch_size, count=count)


@task(name="prepare-inputs", **IO_TASK)
def prepare_inputs(job: OneShotJob, run_dir: str) -> dict[str, Any]:
    """Resolve the model, check everything that could fail later, cut the token windows.

    Fails before any long work on: a missing or corrupt model, NaN weights, a pattern that does
    not fit a layer, a text too short for the requested windows.
    """
    record = paths.inputs(run_dir)
    if _done(run_dir, "inputs", "windows"):
        return json.loads(record.read_text())
    model_dir = llm.model_dir(job.model)
    model, tokenizer = llm.load_model(model_dir, "cpu")  # checks files, shapes and NaN/Inf
    layers = target_layers(model)
    for name, module in layers.items():  # raises InvalidPattern naming the layer and its shape
        job.sparsity_pattern.check_shape(module.weight.shape, name=name)
    llm.prepare_windows(run_dir, tokenizer, job.calibration, job.evaluation, extra=recovery_windows(job))
    prefix, blocks = find_decoder_blocks(model) if job.calibration.mode == "sequential" else ("", [])
    info = {"model_dir": model_dir, "fingerprint": model_fingerprint(model_dir),
            "layers": list(layers), "blocks_prefix": prefix, "num_blocks": len(blocks),
            "parameters": sum(m.weight.numel() for m in layers.values())}
    atomic_write_text(record, json.dumps(info, indent=2))
    Manifest(run_dir).record("inputs", record, kind="json")
    return info


@task(name="calibrate", **IO_TASK)
def calibrate(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> dict[str, str | None]:
    """One pass over the dense model: per-layer statistics to Parquet (+ XᵀX for SparseGPT)."""
    _, hessian = needs_stats(job)
    stats_path, hess_path = paths.stats(run_dir), paths.hessians(run_dir)
    if not (_done(run_dir, "stats") and (not hessian or _done(run_dir, "hessians"))):
        model, _ = llm.load_model(inputs["model_dir"], job.device)
        ctx = collect_activation_stats(model, _calibration_batches(job, run_dir), layers=inputs["layers"],
                                       hessian=hessian, dataset=job.calibration.text)
        meta = _metadata(job, inputs)
        save_activation_stats(stats_path, ctx, meta)
        Manifest(run_dir).record("stats", stats_path, kind="stats")
        if hessian:
            save_hessians(hess_path, ctx, meta)
            Manifest(run_dir).record("hessians", hess_path, kind="hessians")
    return {"stats": str(stats_path), "hessians": str(hess_path) if hessian else None}


@task(name="prune-layer", task_run_name="prune-{layer}", **IO_TASK)
def prune_layer(job: OneShotJob, run_dir: str, model_dir: str, layer: str,
                stats: dict[str, str | None], scores_only: bool = False) -> str:
    """Prune (or, for a GLOBAL selection, only score) one layer; returns its output file.

    ``stats`` holds the paths of the statistics and Hessians (None: the method reads none).
    """
    key, out = f"layer:{layer}", paths.layer_scores(run_dir, layer)
    if _done(run_dir, key):
        return str(out)
    weight = read_weight(model_dir, layer).to(resolve_device(job.device))  # device: auto -> CUDA when present
    layer_stats = load_layer_stats(stats["stats"], layer, stats.get("hessians")) if stats.get("stats") else None
    if scores_only:
        scores = score_one(job, weight, layer_stats, name=layer)
        save_layer_result(out, torch.ones_like(weight, dtype=torch.bool), scores=scores)
    else:
        new_weight, mask = prune_one(job, weight, layer_stats, name=layer, allocation=allocation_targets(job, run_dir))
        save_layer_result(out, mask, new_weight if needs_stats(job)[1] else None)
    Manifest(run_dir).record(key, out, kind="layer")
    return str(out)


@task(name="select-global", **IO_TASK)
def select_global(job: OneShotJob, run_dir: str, layers: list[str]) -> list[str]:
    """One threshold across all layers' scores (GLOBAL scope); rewrites each layer's file with its mask."""
    files = [str(paths.layer_scores(run_dir, layer)) for layer in layers]
    if _done(run_dir, "global-selection"):
        return files
    scores = {layer: load_layer_scores(f) for layer, f in zip(layers, files, strict=True)}
    masks = generate_global_masks(scores, job.target_sparsity)
    manifest = Manifest(run_dir)
    for layer, f in zip(layers, files, strict=True):  # the scores file becomes the layer's result
        save_layer_result(f, masks[layer].tensor)
        manifest.record(f"layer:{layer}", f, kind="layer")
    marker = paths.global_selection(run_dir)
    atomic_write_text(marker, json.dumps({"layers": len(layers), "sparsity": job.target_sparsity}))
    manifest.record("global-selection", marker, kind="json")
    return files


@task(name="capture-block-inputs", **IO_TASK)
def capture_inputs(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> str:
    """Sequential mode: record decoder block 0's inputs for every calibration batch."""
    out = paths.block_inputs(run_dir, 0)
    if not _done(run_dir, "block_inputs:0"):
        model, _ = llm.load_model(inputs["model_dir"], job.device)
        save_tensors(out, capture_block_inputs(model, _calibration_batches(job, run_dir)).to_tensors())
        Manifest(run_dir).record("block_inputs:0", out, kind="activations")
    return str(out)


@task(name="prune-block", task_run_name="prune-block-{index}", **IO_TASK)
def prune_block(job: OneShotJob, run_dir: str, inputs: dict[str, Any], index: int) -> list[str]:
    """Sequential mode, block ``index``: statistics on its (already pruned-path) inputs, prune its
    layers, then run the pruned block to produce block ``index + 1``'s inputs."""
    block = load_decoder_block(inputs["model_dir"], index, device=resolve_device(job.device))
    prefix = f"{inputs['blocks_prefix']}.{index}."
    layers = [n for n in inputs["layers"] if n.startswith(prefix)]
    files = [str(paths.layer_scores(run_dir, n)) for n in layers]
    if _done(run_dir, f"block_inputs:{index + 1}", *(f"layer:{n}" for n in layers)):
        return files
    block_in = BlockInputs.from_tensors(load_tensors(paths.block_inputs(run_dir, index)))
    ctx = calibrate_block(block, block_in, hessian=needs_stats(job)[1], prefix=prefix, dataset=job.calibration.text)
    save_activation_stats(paths.block_stats(run_dir, index), ctx, _metadata(job, inputs))
    masks = prune_block_layers(job, block, ctx, prefix, layers, allocation_targets(job, run_dir))
    manifest = Manifest(run_dir)
    manifest.record(f"stats:{index}", paths.block_stats(run_dir, index), kind="stats")
    for name, file in zip(layers, files, strict=True):
        weight = block.get_submodule(name.removeprefix(prefix)).weight
        save_layer_result(file, masks[name], weight if needs_stats(job)[1] else None)
        manifest.record(f"layer:{name}", file, kind="layer")
    save_tensors(paths.block_inputs(run_dir, index + 1), run_block(block, block_in).to_tensors())
    manifest.record(f"block_inputs:{index + 1}", paths.block_inputs(run_dir, index + 1), kind="activations")
    manifest.discard(f"block_inputs:{index}")  # ~40 MB per block for SmolLM2; no longer needed
    paths.block_inputs(run_dir, index).unlink(missing_ok=True)
    return files


@task(name="assemble", **IO_TASK)
def assemble(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Apply every layer's result to the dense model; save masks, the pruned model and the
    per-layer table (sparsity, relative output reconstruction error on calibration inputs)."""
    table_path = paths.layers_table(run_dir)
    if _done(run_dir, "model", "masks", "layers"):
        return json.loads(table_path.read_text())
    model, tokenizer = llm.load_model(inputs["model_dir"], job.device)
    masks, new_weights = {}, {}
    for layer in inputs["layers"]:
        mask, weight = load_layer_result(paths.layer_scores(run_dir, layer))
        dense = model.get_submodule(layer).weight.detach()
        masks[layer] = mask
        new_weights[layer] = (weight if weight is not None else dense * mask.to(dense.device)).to(dense.device)
    errors = layer_output_errors(model, new_weights, _calibration_batches(job, run_dir, job.evaluation.error_windows))
    with torch.no_grad():
        for layer, weight in new_weights.items():
            model.get_submodule(layer).weight.copy_(weight)
    save_masks(paths.masks(run_dir), masks, metadata={"job_hash": job.job_hash()})
    save_pretrained_atomic(model, tokenizer, paths.model(run_dir),
                           extra={"pruning": {"job_hash": job.job_hash(), "method": job.method,
                                              "pattern": job.pattern, "sparsity": job.target_sparsity}})
    table = [{"name": layer, "shape": list(masks[layer].shape), "sparsity": 1.0 - float(masks[layer].float().mean()),
              "reconstruction_error": errors[layer]} for layer in inputs["layers"]]
    atomic_write_text(table_path, json.dumps(table, indent=1))
    manifest = Manifest(run_dir)
    manifest.record("masks", paths.masks(run_dir), kind="masks")
    manifest.record("model", paths.model(run_dir), kind="model")
    manifest.record("layers", table_path, kind="json")
    return table


@task(name="export-sparse", **IO_TASK)
def export_sparse_model(job: OneShotJob, run_dir: str) -> dict[str, Any] | None:
    """The pruned model in ``export.sparse_format`` (csr, semi_structured, compressed_tensors) under
    ``sparse/``; None when the format is ``none``. Returns the export's sizes (SparseExport.to_dict)."""
    fmt = job.export.sparse_format
    if fmt == "none":
        return None
    out = paths.sparse_export(run_dir)
    if _done(run_dir, "sparse_export") and read_export_info(out).format == fmt:
        return read_export_info(out).to_dict()
    info = export_sparse(paths.model(run_dir), load_masks(paths.masks(run_dir)), out, fmt)
    Manifest(run_dir).record("sparse_export", out, kind="sparse_export")
    log.info("sparse export (%s): %d layers, %.1f MB, %.3f of dense", fmt, info.layers, info.file_bytes / 1e6,
             info.size_ratio)
    return info.to_dict()


@task(name="log-results", **IO_TASK)
def log_results(job: OneShotJob, run_dir: str, run_id: str, summary: dict[str, Any]) -> None:
    """Headline metrics, the per-layer table and figure, the masks, the model and the export on the
    job's MLflow run (each artifact once: a resumed job does not upload it again)."""
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)
    metrics = {k: summary[k] for k in ("sparsity", "parameters_pruned", "perplexity_before", "perplexity_after")}
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if v is not None})
    tracker.log_table(run_id, summary["layers"], "tables/layers.json")
    if not tracker.has_artifact(run_id, "figures/layers.png"):
        title = f"{job.name}: {job.method} {job.pattern}, sparsity {summary['sparsity']:.3f}"
        tracker.log_figure(run_id, layer_figure(summary["layers"], title), "figures/layers.png")
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


__all__ = ["assemble", "calibrate", "capture_inputs", "export_sparse_model", "log_results", "method_of", "needs_stats",
           "prepare_inputs", "prune_block", "prune_block_layers", "prune_layer", "prune_one", "score_one",
           "select_global", "spec_of"]
