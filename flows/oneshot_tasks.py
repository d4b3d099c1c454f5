"""Tasks of the one-shot job. Each one loads its inputs from files, calls pruning_core, writes
its outputs atomically, records them in the run's manifest and returns small values (paths,
names, numbers), so tasks can run in threads, processes or on Dask workers alike.

Every task is idempotent at the artifact level: if the manifest already holds its verified
outputs it returns them without recomputing, which is how a crashed job resumes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import OneShotJob
from flows.runtime import TRANSIENT_RETRIES
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
from pruning_core.lm import (
    calibration_windows,
    evaluation_windows,
    load_causal_lm,
    load_text,
    model_fingerprint,
    perplexity,
    resolve_device,
    save_pretrained_atomic,
    smollm2_dir,
    tokenize_corpus,
)
from pruning_core.lm.weights import load_decoder_block, read_weight
from pruning_core.masks import MaskScope, generate_global_masks
from pruning_core.metrics import layer_output_errors
from pruning_core.pruning import (
    MagnitudePruner,
    Pruner,
    SparseGPTPruner,
    WandaPruner,
    prune_module,
    prune_weight,
    score_weight,
    target_layers,
)
from pruning_core.sparse import export_sparse, read_export_info

log = logging.getLogger(__name__)

# Prefect must not hash or persist our arguments: resumption is done with the run's manifest.
# Retries only for transient infrastructure errors, never for a PruningError (flows.runtime).
TASK = {"cache_policy": NO_CACHE, "persist_result": False, **TRANSIENT_RETRIES}
INPUTS = "inputs.json"


def make_pruner(job: OneShotJob) -> Pruner:
    """The pruner a job's ``method`` names."""
    if job.method == "magnitude":
        return MagnitudePruner()
    if job.method == "wanda":
        return WandaPruner()
    return SparseGPTPruner(blocksize=job.sparsegpt.blocksize, percdamp=job.sparsegpt.percdamp)


def _done(run_dir: str, name: str) -> bool:
    return Manifest(run_dir).is_complete(name)


def _metadata(job: OneShotJob, inputs: dict[str, Any]) -> dict[str, str]:
    return {"job_hash": job.job_hash(), "model_fingerprint": inputs["fingerprint"], "method": job.method,
            "config": job.model_dump_json(exclude={"tracking", "runner"})}


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(windows.split(batch_size))


@task(name="prepare-inputs", **TASK)
def prepare_inputs(job: OneShotJob, run_dir: str) -> dict[str, Any]:
    """Resolve the model, check everything that could fail later, tokenize and cut the windows.

    Fails before any long work on: a missing or corrupt model, NaN weights, a pattern that does
    not fit a layer, a text too short for the requested windows.
    """
    manifest = Manifest(run_dir)
    record = Path(run_dir) / INPUTS
    if manifest.is_complete("inputs") and manifest.is_complete("windows"):
        return json.loads(record.read_text())
    model_dir = smollm2_dir() if job.model == "smollm2" else Path(job.model)
    model, tokenizer = load_causal_lm(model_dir, device="cpu")  # checks files, shapes and NaN/Inf
    layers = target_layers(model)
    pattern = job.sparsity_pattern
    for name, module in layers.items():  # raises InvalidPattern naming the layer and its shape
        pattern.check_shape(module.weight.shape, name=name)
    cal, ev = job.calibration, job.evaluation
    cal_tokens = tokenize_corpus(tokenizer, load_text(cal.text, field=cal.text_field))
    windows = {"calibration": calibration_windows(cal_tokens, cal.num_windows, cal.window_length, cal.seed,
                                                  what=f"calibration text '{cal.text}'")}
    if ev.enabled:
        ev_tokens = tokenize_corpus(tokenizer, load_text(ev.text, field=ev.text_field))
        windows["evaluation"] = evaluation_windows(ev_tokens, ev.num_windows, ev.window_length,
                                                   what=f"evaluation text '{ev.text}'")
    save_tensors(Path(run_dir) / "windows.safetensors", windows)
    manifest.record("windows", Path(run_dir) / "windows.safetensors", kind="tokens")
    prefix, blocks = find_decoder_blocks(model) if job.calibration.mode == "sequential" else ("", [])
    info = {"model_dir": str(Path(model_dir).resolve()), "fingerprint": model_fingerprint(model_dir),
            "layers": list(layers), "blocks_prefix": prefix, "num_blocks": len(blocks),
            "parameters": sum(m.weight.numel() for m in layers.values())}
    atomic_write_text(record, json.dumps(info, indent=2))
    manifest.record("inputs", record, kind="json")
    return info


def _windows(run_dir: str, which: str) -> torch.Tensor:
    return load_tensors(Path(run_dir) / "windows.safetensors", [which])[which]


@task(name="evaluate", **TASK)
def evaluate(job: OneShotJob, run_dir: str, model_dir: str, key: str) -> float:
    """Perplexity of the model in ``model_dir`` on the evaluation windows (recorded as ``key``)."""
    out = Path(run_dir) / f"{key}.json"
    if _done(run_dir, key):
        return float(json.loads(out.read_text())["perplexity"])
    model, _ = load_causal_lm(model_dir, device=job.device)
    ppl = perplexity(model, _windows(run_dir, "evaluation"), batch_size=job.evaluation.batch_size)
    atomic_write_text(out, json.dumps({"perplexity": ppl, "model_dir": model_dir}))
    Manifest(run_dir).record(key, out, kind="metric")
    return ppl


@task(name="calibrate", **TASK)
def calibrate(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> dict[str, str | None]:
    """One pass over the dense model: per-layer statistics to Parquet (+ XᵀX for SparseGPT)."""
    hessian = make_pruner(job).requires_hessian
    stats_path, hess_path = paths.stats(run_dir), paths.hessians(run_dir)
    done = _done(run_dir, "stats") and (not hessian or _done(run_dir, "hessians"))
    if not done:
        model, _ = load_causal_lm(inputs["model_dir"], device=job.device)
        batches = _batches(_windows(run_dir, "calibration"), job.calibration.batch_size)
        ctx = collect_activation_stats(model, batches, layers=inputs["layers"], hessian=hessian,
                                       dataset=job.calibration.text)
        meta = _metadata(job, inputs)
        save_activation_stats(stats_path, ctx, meta)
        Manifest(run_dir).record("stats", stats_path, kind="stats")
        if hessian:
            save_hessians(hess_path, ctx, meta)
            Manifest(run_dir).record("hessians", hess_path, kind="hessians")
    return {"stats": str(stats_path), "hessians": str(hess_path) if hessian else None}


@task(name="prune-layer", **TASK)
def prune_layer(job: OneShotJob, run_dir: str, model_dir: str, layer: str,
                stats: dict[str, str | None], scores_only: bool = False) -> str:
    """Prune (or, for a GLOBAL selection, only score) one layer; returns its output file."""
    key, out = f"layer:{layer}", paths.layer_scores(run_dir, layer)
    if _done(run_dir, key):
        return str(out)
    pruner = make_pruner(job)
    weight = read_weight(model_dir, layer).to(resolve_device(job.device))  # device: auto -> CUDA when present
    layer_stats = None
    if job.method != "magnitude":
        layer_stats = load_layer_stats(stats["stats"], layer, stats.get("hessians"))
    if scores_only:
        scores = score_weight(pruner, weight, layer_stats, name=layer)
        save_layer_result(out, torch.ones_like(weight, dtype=torch.bool), scores=scores)
    else:
        new_weight, mask = prune_weight(pruner, weight, job.sparsity, job.sparsity_pattern, layer_stats,
                                        name=layer, scope=MaskScope(job.mask_scope))
        save_layer_result(out, mask.tensor, new_weight if pruner.requires_hessian else None)
    Manifest(run_dir).record(key, out, kind="layer")
    return str(out)


@task(name="select-global", **TASK)
def select_global(job: OneShotJob, run_dir: str, layers: list[str]) -> list[str]:
    """One threshold across all layers' scores (GLOBAL scope); rewrites each layer's file with its mask."""
    key = "global-selection"
    files = [str(paths.layer_scores(run_dir, layer)) for layer in layers]
    if _done(run_dir, key):
        return files
    scores = {layer: load_layer_scores(f) for layer, f in zip(layers, files, strict=True)}
    masks = generate_global_masks(scores, job.target_sparsity)
    manifest = Manifest(run_dir)
    for layer, f in zip(layers, files, strict=True):  # the scores file becomes the layer's result
        save_layer_result(f, masks[layer].tensor)
        manifest.record(f"layer:{layer}", f, kind="layer")
    marker = Path(run_dir) / "global-selection.json"
    atomic_write_text(marker, json.dumps({"layers": len(layers), "sparsity": job.target_sparsity}))
    manifest.record(key, marker, kind="json")
    return files


def _block_inputs_path(run_dir: str, index: int) -> Path:
    return Path(run_dir) / "block_inputs" / f"{index:03d}.safetensors"


@task(name="capture-block-inputs", **TASK)
def capture_inputs(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> str:
    """Sequential mode: record decoder block 0's inputs for every calibration batch."""
    out = _block_inputs_path(run_dir, 0)
    if not _done(run_dir, "block_inputs:0"):
        model, _ = load_causal_lm(inputs["model_dir"], device=job.device)
        batches = _batches(_windows(run_dir, "calibration"), job.calibration.batch_size)
        save_tensors(out, capture_block_inputs(model, batches).to_tensors())
        Manifest(run_dir).record("block_inputs:0", out, kind="activations")
    return str(out)


@task(name="prune-block", **TASK)
def prune_block(job: OneShotJob, run_dir: str, inputs: dict[str, Any], index: int) -> list[str]:
    """Sequential mode, block ``index``: statistics on its (already pruned-path) inputs, prune its
    layers, then run the pruned block to produce block ``index + 1``'s inputs."""
    model_dir = inputs["model_dir"]
    block = load_decoder_block(model_dir, index, device=resolve_device(job.device))
    prefix = f"{inputs['blocks_prefix']}.{index}."
    layers = [n for n in inputs["layers"] if n.startswith(prefix)]
    files = [str(paths.layer_scores(run_dir, n)) for n in layers]
    if _done(run_dir, f"block_inputs:{index + 1}") and all(_done(run_dir, f"layer:{n}") for n in layers):
        return files
    pruner = make_pruner(job)
    block_in = BlockInputs.from_tensors(load_tensors(_block_inputs_path(run_dir, index)))
    ctx = calibrate_block(block, block_in, hessian=pruner.requires_hessian, prefix=prefix,
                          dataset=job.calibration.text)
    stats_file = Path(run_dir) / "stats" / f"block_{index:03d}.parquet"
    save_activation_stats(stats_file, ctx, _metadata(job, inputs))
    result = prune_module(block, pruner, job.sparsity, job.sparsity_pattern, ctx, prefix=prefix,
                          filter_fn=lambda name, _m: name in layers, scope=job.scope, measure_memory=False)
    manifest = Manifest(run_dir)
    manifest.record(f"stats:{index}", stats_file, kind="stats")
    for name, file in zip(layers, files, strict=True):
        weight = block.get_submodule(name.removeprefix(prefix)).weight
        save_layer_result(file, result.masks[name].tensor, weight if pruner.requires_hessian else None)
        manifest.record(f"layer:{name}", file, kind="layer")
    nxt = _block_inputs_path(run_dir, index + 1)
    save_tensors(nxt, run_block(block, block_in).to_tensors())
    manifest.record(f"block_inputs:{index + 1}", nxt, kind="activations")
    manifest.discard(f"block_inputs:{index}")  # ~40 MB per block for SmolLM2; no longer needed
    _block_inputs_path(run_dir, index).unlink(missing_ok=True)
    return files


@task(name="assemble", **TASK)
def assemble(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Apply every layer's result to the dense model; save masks, the pruned model and the
    per-layer table (sparsity, relative output reconstruction error on calibration inputs)."""
    table_path = Path(run_dir) / "layers.json"
    if _done(run_dir, "model") and _done(run_dir, "masks") and _done(run_dir, "layers"):
        return json.loads(table_path.read_text())
    model, tokenizer = load_causal_lm(inputs["model_dir"], device=job.device)
    masks, new_weights = {}, {}
    for layer in inputs["layers"]:
        mask, weight = load_layer_result(paths.layer_scores(run_dir, layer))
        dense = model.get_submodule(layer).weight.detach()
        masks[layer] = mask
        new_weights[layer] = (weight if weight is not None else dense * mask.to(dense.device)).to(dense.device)
    error_windows = _windows(run_dir, "calibration")[: job.evaluation.error_windows]
    errors = layer_output_errors(model, new_weights, _batches(error_windows, job.calibration.batch_size))
    with torch.no_grad():
        for layer, weight in new_weights.items():
            model.get_submodule(layer).weight.copy_(weight)
    save_masks(paths.masks(run_dir), masks, metadata={"job_hash": job.job_hash()})
    save_pretrained_atomic(model, tokenizer, paths.model(run_dir),
                           extra={"pruning": {"job_hash": job.job_hash(), "method": job.method,
                                              "pattern": job.pattern, "sparsity": job.target_sparsity}})
    table = [{"name": layer, "shape": list(masks[layer].shape),
              "sparsity": 1.0 - float(masks[layer].float().mean()),
              "reconstruction_error": errors[layer]} for layer in inputs["layers"]]
    atomic_write_text(table_path, json.dumps(table, indent=1))
    manifest = Manifest(run_dir)
    manifest.record("masks", paths.masks(run_dir), kind="masks")
    manifest.record("model", paths.model(run_dir), kind="model")
    manifest.record("layers", table_path, kind="json")
    return table


@task(name="export-sparse", **TASK)
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
