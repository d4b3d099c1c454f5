"""Tasks of the one-shot job, block by block: no task ever holds the whole model (issue 13 §3).

Each task loads its inputs from files, calls pruning_core, writes its outputs atomically, records
them in the run's manifest and returns small values (paths, names, numbers), so tasks can run in
threads, processes or on Dask workers alike. Every task is idempotent at the artifact level: if
the manifest already holds its verified outputs it returns them without recomputing, which is how
a crashed job resumes.

- ``prepare_inputs``: every check that needs no weight math, before any long work (causal LM,
  architecture support, window lengths, checkpoint names writable, patterns fit every unit,
  no NaN/Inf), then the token windows (starting with BOS where the tokenizer adds one).
- one-pass: ``calibrate`` streams the dense model once (:func:`calibrate_blocks`, statistics per
  unit, MoE experts on their routed tokens), ``prune_layer`` prunes one unit reading only its
  module's weights (fanned out on threads or Dask), ``select_global`` applies one threshold, and
  ``assemble`` streams again, writing each block with its results through a
  :class:`CheckpointWriter` (the input's shards, names and dtype) and measuring each unit's
  relative output error on ``evaluation.error_windows`` calibration windows.
- sequential: ``prune_sequential`` streams once, each block calibrated on the pruned blocks'
  outputs, pruned unit by unit and written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from prefect import task
from torch import nn

from flows import llm
from flows.execution import IO_TASK
from flows.oneshot import blocks as b
from flows.oneshot import joint
from flows.oneshot.allocation import allocation_targets, layer_target
from flows.oneshot.config import OneShotJob
from flows.oneshot.recovery import recovery_windows
from flows.report import layer_figure
from flows.tracking import Tracker
from pruning_core.calibration import ActivationStats, CalibrationContext
from pruning_core.calibration.inputs import InputSample
from pruning_core.errors import ConfigError
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_write_text
from pruning_core.io.layers import has_scores, load_layer_result, load_layer_scores, save_layer_result
from pruning_core.io.manifest import Manifest
from pruning_core.io.masks import load_masks, save_masks_from
from pruning_core.io.stats import (
    load_activation_stats,
    load_layer_stats,
    save_activation_stats,
    save_hessians,
)
from pruning_core.lm import (
    CheckpointReader,
    CheckpointWriter,
    LayerStream,
    UnitInputs,
    UnitStatistics,
    calibrate_blocks,
    check_model_dir,
    combined,
    inspect_model,
    model_fingerprint,
)
from pruning_core.masks import GlobalSelection, SparsitySpec, Unstructured, plan_global_selection
from pruning_core.methods import Method, get_method
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
    """Whether the prune step reads activation statistics, and whether it needs Hessians (XᵀX):
    the method's needs, and both for a joint quantization (GPTQ and its report read ``XᵀX``)."""
    method, quantize = method_of(job), job.joint_quantization
    return method.needs_stats or quantize, method.needs_hessian or quantize


def _method_for(job: OneShotJob, stats: Any, name: str) -> tuple[Method, Any]:
    """The job's method, except for a MoE expert no calibration token was routed to (statistics
    with ``count == 0``): that one is pruned by weight magnitude at the same spec (the library's
    rule, :func:`pruning_core.pruning.prune_module`), reported in the per-unit table."""
    method = method_of(job)
    if method.needs_stats and stats is not None and stats.count == 0:
        log.warning("%s: no calibration token was routed to this expert; pruned by magnitude", name)
        return get_method("magnitude"), None
    return method, stats


def prune_one(job: OneShotJob, weight: torch.Tensor, stats: Any, *, name: str,
              allocation: str | Mapping[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one ``[out, in]`` weight: ``(new weight, bool keep mask)``, both shaped like ``weight``."""
    method, stats = _method_for(job, stats, name)
    return method.prune_weight(weight, stats, spec_of(job, name, allocation), name=name)


def prune_unit(job: OneShotJob, run_dir: str, weight: torch.Tensor, stats: Any, *, name: str,
               allocation: str | None, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prune_one`, or with a joint quantization the pruned and quantized weight (its codes
    saved by :func:`flows.oneshot.joint.quantize_unit`); ``(new weight, keep mask)``."""
    if not job.joint_quantization:
        return prune_one(job, weight, stats, name=name, allocation=allocation)
    method, stats = _method_for(job, stats, name)
    return joint.quantize_unit(job, run_dir, method, weight, stats, spec_of(job, name, allocation), name=name,
                               scale_dtype=scale_dtype)


def score_one(job: OneShotJob, weight: torch.Tensor, stats: Any, *, name: str) -> torch.Tensor:
    """The method's importance scores of one weight (for a GLOBAL selection), shaped like ``weight``."""
    method, stats = _method_for(job, stats, name)
    return method.score(weight, stats, name=name)


# -- tasks ------------------------------------------------------------------------------------------
def _done(run_dir: str, *names: str) -> bool:
    manifest = Manifest(run_dir)
    return all(manifest.is_complete(n) for n in names)


def _metadata(job: OneShotJob, inputs: dict[str, Any]) -> dict[str, str]:
    return {"job_hash": job.job_hash(), "model_fingerprint": inputs["fingerprint"], "method": job.method,
            "config": job.model_dump_json(exclude={"tracking", "runner"})}


def _check_model(job: OneShotJob, model_dir: str) -> CheckpointReader:
    """Everything knowable without weight math; raises before any long work (see the module docstring)."""
    check_model_dir(model_dir)
    lengths = {"calibration.window_length": job.calibration.window_length}
    if job.evaluation.enabled:
        lengths["evaluation.window_length"] = job.evaluation.window_length
    inspect_model(model_dir, job="oneshot", window_lengths=lengths)
    reader = b.reader_for(model_dir)
    reader.check_writable()
    for name, unit in b.model_units(reader).items():  # raises InvalidPattern naming the unit and its shape
        job.sparsity_pattern.check_shape(torch.Size(unit.shape), name=name)
    _check_export(job, reader)
    b.check_weights_finite(reader)
    return reader


def _check_export(job: OneShotJob, reader: CheckpointReader) -> None:
    """A 2:4 export format stores groups of 4 along the saved rows: refuse, before any work, a model
    that saves a weight transposed (GPT-2's Conv1D ``[in, out]``), whose math groups run down columns."""
    fmt = job.export.sparse_format
    transposed = [n for n, u in b.model_units(reader).items() if u.transposed]
    if fmt in ("semi_structured", "compressed_tensors") and transposed:
        raise ConfigError("export.sparse_format", f"{fmt} stores 2:4 groups along each saved row, but "
                          f"'{transposed[0]}' (and {len(transposed) - 1} more) is saved transposed ([in, out], "
                          "GPT-2 Conv1D); use sparse_format csr or none")


@task(name="prepare-inputs", **IO_TASK)
def prepare_inputs(job: OneShotJob, run_dir: str) -> dict[str, Any]:
    """Resolve and check the model (see :func:`_check_model`), cut the token windows."""
    record = paths.inputs(run_dir)
    if _done(run_dir, "inputs", "windows"):
        return json.loads(record.read_text())
    model_dir = llm.input_model(job, run_dir)
    reader = _check_model(job, model_dir)
    llm.prepare_windows(run_dir, llm.load_tokenizer(model_dir), job.calibration, job.evaluation,
                        extra=recovery_windows(job))
    units = b.model_units(reader)
    info = {"model_dir": model_dir, "fingerprint": model_fingerprint(model_dir), "layers": list(units),
            "blocks_prefix": reader.block_prefix, "num_blocks": reader.num_blocks,
            "dtype": str(reader.stored_dtype).removeprefix("torch."), "units": b.unit_sources(reader),
            "parameters": sum(u.shape[0] * u.shape[1] for u in units.values())}
    atomic_write_text(record, json.dumps(info, indent=2))
    Manifest(run_dir).record("inputs", record, kind="json")
    return info


def _calibration_stream(job: OneShotJob, run_dir: str, reader: CheckpointReader, count: int | None = None) -> LayerStream:
    windows = llm.load_windows(run_dir, "calibration")[:count]
    return b.open_stream(reader, windows, job.calibration.batch_size, job.device)


@task(name="calibrate", **IO_TASK)
def calibrate(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> dict[str, str | None]:
    """One streamed pass over the dense model: per-unit statistics to Parquet (+ XᵀX per block for
    SparseGPT); returns ``{"stats": file, "hessians": folder or None}``."""
    _, hessian = needs_stats(job)
    out = {"stats": str(paths.stats(run_dir)),
           "hessians": str(paths.block_hessians(run_dir, 0).parent) if hessian else None}
    if _done(run_dir, "stats"):
        return out
    reader, meta = b.reader_for(inputs["model_dir"]), _metadata(job, inputs)
    observe, merged = UnitStatistics(hessian=hessian, dataset=job.calibration.text), CalibrationContext(job.calibration.text)

    def finish(i: int, block: nn.Module) -> None:
        context = observe.pop(i)
        if hessian:
            save_hessians(paths.block_hessians(run_dir, i), context, meta)
            Manifest(run_dir).record(f"hessians:{i}", paths.block_hessians(run_dir, i), kind="hessians")
        for name, s in context:  # XᵀX dropped: only the per-channel sums stay in memory
            merged.add_layer_stats(name, ActivationStats.from_arrays(s.sum_sq, s.sum_abs, s.count, name=name))
        merged.num_samples = context.num_samples

    calibrate_blocks(_calibration_stream(job, run_dir, reader), finish, observe=observe, sequential=False)
    save_activation_stats(paths.stats(run_dir), merged, meta)
    Manifest(run_dir).record("stats", paths.stats(run_dir), kind="stats")
    return out


def layer_inputs(job: OneShotJob, run_dir: str, model_dir: str, layer: str,
                 stats: dict[str, str | None]) -> tuple[torch.Tensor, ActivationStats | None]:
    """One unit's dense weight ``[out, in]`` (only its parameter is read, on the job's device) and its
    one-pass statistics (None: the method reads none; with XᵀX when ``stats`` has Hessians)."""
    inputs = json.loads(paths.inputs(run_dir).read_text())
    source = inputs["units"][layer]
    if source["key"] is not None:  # device: auto -> CUDA when present
        weight = b.read_saved_unit(model_dir, source, job.device, getattr(torch, inputs["dtype"]))
    else:  # built by a conversion (fused experts): through the checkpoint's name mapping
        weight = b.read_unit(b.reader_for(model_dir), layer, job.device)
    hessians = paths.block_hessians(run_dir, source["block"]) if stats.get("hessians") else None
    layer_stats = load_layer_stats(stats["stats"], layer, hessians) if stats.get("stats") else None
    return weight, layer_stats


def _stored_dtype(run_dir: str) -> torch.dtype:
    """The dtype the model is stored in (and loaded in), from the prepared inputs."""
    return getattr(torch, json.loads(paths.inputs(run_dir).read_text())["dtype"])


@task(name="prune-layer", task_run_name="prune-{layer}", **IO_TASK)
def prune_layer(job: OneShotJob, run_dir: str, model_dir: str, layer: str,
                stats: dict[str, str | None], scores_only: bool = False) -> str:
    """Prune (or, for a GLOBAL selection, only score) one unit; returns its output file.

    Reads only the unit's parameter from the checkpoint. ``stats`` holds the path of the statistics
    and the folder of the per-block Hessians (None: the method reads none).
    """
    key, out = f"layer:{layer}", paths.layer_scores(run_dir, layer)
    if _done(run_dir, key):
        return str(out)
    weight, layer_stats = layer_inputs(job, run_dir, model_dir, layer, stats)
    if scores_only:
        scores = score_one(job, weight, layer_stats, name=layer)
        save_layer_result(out, torch.ones_like(weight, dtype=torch.bool), scores=scores)
    else:
        new_weight, mask = prune_unit(job, run_dir, weight, layer_stats, name=layer,
                                      allocation=allocation_targets(job, run_dir),
                                      scale_dtype=_stored_dtype(run_dir))
        save_layer_result(out, mask, new_weight if needs_stats(job)[1] else None)
    Manifest(run_dir).record(key, out, kind="layer")
    return str(out)


def _global_plan(job: OneShotJob, run_dir: str, layers: list[str]) -> GlobalSelection:
    """The global threshold and each unit's kept ties, found reading one unit's scores at a time
    (:func:`pruning_core.masks.streamed.plan_global_selection`); recorded, so a resumed run reuses it."""
    record = paths.global_plan(run_dir)
    if _done(run_dir, "global-plan"):
        return GlobalSelection.from_dict(json.loads(record.read_text()))
    plan = plan_global_selection(layers, lambda n: load_layer_scores(paths.layer_scores(run_dir, n)),
                                 job.target_sparsity)
    atomic_write_text(record, json.dumps(plan.to_dict()))
    Manifest(run_dir).record("global-plan", record, kind="json")
    return plan


@task(name="select-global", **IO_TASK)
def select_global(job: OneShotJob, run_dir: str, layers: list[str]) -> list[str]:
    """One threshold across all units' scores (GLOBAL scope), with one unit's scores in memory at a
    time; rewrites each unit's file with its mask (a resumed run skips the files already rewritten)."""
    files = [str(paths.layer_scores(run_dir, layer)) for layer in layers]
    if _done(run_dir, "global-selection"):
        return files
    plan, manifest = _global_plan(job, run_dir, layers), Manifest(run_dir)
    for layer, f in zip(layers, files, strict=True):  # the scores file becomes the layer's result
        if has_scores(f):
            save_layer_result(f, plan.mask(layer, load_layer_scores(f)))
            manifest.record(f"layer:{layer}", f, kind="layer")
    marker = paths.global_selection(run_dir)
    atomic_write_text(marker, json.dumps({"layers": len(layers), "sparsity": job.target_sparsity}))
    manifest.record("global-selection", marker, kind="json")
    return files


def _write_model(job: OneShotJob, run_dir: str, stream: LayerStream, finish: Callable[[int, nn.Module], Any],
                 observe: Callable[..., Any], *, sequential: bool) -> None:
    """Stream every block through ``finish`` (returns its table rows) into the output checkpoint,
    resumable block by block; records the model and the per-unit table."""
    info = {"job_hash": job.job_hash(), "method": job.method, "pattern": job.pattern, "sparsity": job.target_sparsity}
    with CheckpointWriter(stream.reader, paths.model(run_dir), key=job.job_hash()) as writer:
        records = calibrate_blocks(stream, finish, observe=observe, sequential=sequential, writer=writer)
        rows = [row for i in sorted(records) for row in records[i]]
        writer.finish(extra={"pruning": info})
    atomic_write_text(paths.layers_table(run_dir), json.dumps(rows, indent=1))
    manifest = Manifest(run_dir)
    manifest.record("model", paths.model(run_dir), kind="model")
    manifest.record("layers", paths.layers_table(run_dir), kind="json")


def _token_counts(run_dir: str) -> dict[str, int]:
    """Calibration tokens per unit (MoE experts: the tokens routed to them); empty without statistics."""
    if not _done(run_dir, "stats"):
        return {}
    return {name: int(s.count) for name, s in load_activation_stats(paths.stats(run_dir))}


def _finalize(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """``masks.safetensors`` from the per-unit results (read one at a time); the per-unit table."""
    if not _done(run_dir, "masks"):
        items = ((n, load_layer_result(paths.layer_scores(run_dir, n))[0]) for n in inputs["layers"])
        save_masks_from(paths.masks(run_dir), items, metadata={"job_hash": job.job_hash()})
        Manifest(run_dir).record("masks", paths.masks(run_dir), kind="masks")
    return json.loads(paths.layers_table(run_dir).read_text())


@task(name="assemble", **IO_TASK)
def assemble(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One-pass mode: write the pruned model block by block (each unit's result applied to the dense
    block), measuring each unit's relative output error on the first ``evaluation.error_windows``
    calibration windows; save the masks and the per-unit table."""
    if not _done(run_dir, "model", "layers"):
        reader, counts = b.reader_for(inputs["model_dir"]), _token_counts(run_dir)
        observe = UnitInputs()  # rows or XᵀX per distinct input: ~0.2 GB for a 7 B block, not 1.8 GB

        def finish(i: int, block: nn.Module) -> list[dict[str, Any]]:
            return b.apply_results(run_dir, reader, i, block, observe.pop(i), counts)

        stream = _calibration_stream(job, run_dir, reader, job.evaluation.error_windows)
        _write_model(job, run_dir, stream, finish, observe, sequential=False)
    return _finalize(job, run_dir, inputs)


def _prune_in_block(job: OneShotJob, run_dir: str, unit: Any, block: nn.Module, context: CalibrationContext,
                    scale_dtype: torch.dtype, sample: InputSample | None) -> dict[str, Any]:
    """Sequential mode: prune one unit of a streamed block in place (or re-apply its saved result)."""
    key, file = f"layer:{unit.name}", paths.layer_scores(run_dir, unit.name)
    original = unit.read(block).clone()
    if _done(run_dir, key):  # finished before a crash: the same inputs gave this result
        mask, weight = load_layer_result(file)
        new = weight if weight is not None else original * mask.to(original.device)
    else:
        stats = context.require_stats(unit.name) if needs_stats(job)[0] else None
        new, mask = prune_unit(job, run_dir, original.clone(), stats, name=unit.name,
                               allocation=allocation_targets(job, run_dir), scale_dtype=scale_dtype)
        save_layer_result(file, mask, new if needs_stats(job)[1] else None)
        Manifest(run_dir).record(key, file, kind="layer")
    unit.write(block, new.to(original.device))
    return b.unit_row(unit, original, unit.read(block), mask, context, sample=sample)


@task(name="prune-blocks", **IO_TASK)
def prune_sequential(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> None:
    """Sequential mode: each streamed block is calibrated on the outputs of the pruned blocks before
    it (the Wanda/SparseGPT reference procedure), pruned unit by unit and written; resumable per
    block (the writer's journal) and per unit (the manifest)."""
    if _done(run_dir, "model", "layers"):
        return
    reader, meta = b.reader_for(inputs["model_dir"]), _metadata(job, inputs)
    hessian = needs_stats(job)[1]
    observe = UnitStatistics(hessian=hessian, dataset=job.calibration.text)
    samples = None if hessian else UnitInputs()  # the error column: from XᵀX when the method has it

    def finish(i: int, block: nn.Module) -> list[dict[str, Any]]:
        context, sample = observe.pop(i), samples.pop(i) if samples is not None else {}
        save_activation_stats(paths.block_stats(run_dir, i), context, meta)
        Manifest(run_dir).record(f"stats:{i}", paths.block_stats(run_dir, i), kind="stats")
        return [_prune_in_block(job, run_dir, unit, block, context, reader.stored_dtype, sample.get(unit.name))
                for unit in b.block_units(reader, block, i)]

    both = observe if samples is None else combined(observe, samples)
    _write_model(job, run_dir, _calibration_stream(job, run_dir, reader), finish, both, sequential=True)


@task(name="export-sparse", **IO_TASK)
def export_sparse_model(job: OneShotJob, run_dir: str) -> dict[str, Any] | None:
    """The pruned model in ``export.sparse_format`` (csr, semi_structured, compressed_tensors) under
    ``sparse/``; None when the format is ``none``. The masks are mapped onto the checkpoint's saved
    tensors (:func:`~flows.oneshot.blocks.saved_masks`: per-expert MoE tensors, Conv1D storage), so the
    export holds exactly the checkpoint's tensors. Returns the export's sizes (SparseExport.to_dict)."""
    fmt = job.export.sparse_format
    if fmt == "none":
        return None
    out = paths.sparse_export(run_dir)
    if _done(run_dir, "sparse_export") and read_export_info(out).format == fmt:
        return read_export_info(out).to_dict()
    masks = b.saved_masks(b.reader_for(str(paths.model(run_dir))), load_masks(paths.masks(run_dir)))
    info = export_sparse(paths.model(run_dir), masks, out, fmt)
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


__all__ = ["assemble", "calibrate", "export_sparse_model", "layer_inputs", "log_results", "method_of", "needs_stats",
           "prepare_inputs", "prune_layer", "prune_one", "prune_sequential", "prune_unit", "score_one", "select_global",
           "spec_of"]
