"""The one-shot job's output stage: weight-only quantization of the pruned model (``quantization:``,
``joint: false``; the joint quantization in the prune step is :mod:`flows.oneshot.joint`, which
shares this module's export, report and cards).

    pruned checkpoint (model/) --stream block by block--> GPTQ (or RTN) each prunable unit with
    its pruning mask kept --> model-dequantized/ (same layout as model/, evaluated) and
    model-quantized/ (compressed-tensors pack-quantized, what vLLM and transformers load)

Sequential, as GPTQ's reference (``llama.py``'s ``llama_sequential``): block ``i``'s Hessians
``XᵀX`` are collected on the outputs of the already quantized blocks ``0..i-1``
(:func:`pruning_core.lm.stream.calibrate_blocks` with a :class:`~pruning_core.lm.writer.CheckpointWriter`,
which also makes the stage resumable block by block). The pruning mask is passed to the solver,
so pruned weights dequantize to exactly 0 and N:M groups stay N:M (0 is on every grid). Each
layer's report holds the Hessian-weighted relative error ``tr(ΔHΔᵀ) / tr(WHWᵀ)`` of the chosen
method and of round-to-nearest on the same weights and Hessian (GPTQ's baseline, same run).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from prefect import task
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flows import llm
from flows.execution import IO_TASK
from flows.oneshot.config import OneShotJob
from pruning_core.arch import prunable_units
from pruning_core.errors import ConfigError, UnsupportedOperation
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_dir, atomic_write_text
from pruning_core.io.manifest import MANIFEST_NAME, Manifest
from pruning_core.io.masks import load_masks
from pruning_core.io.tensors import load_tensors, save_tensors
from pruning_core.lm.card import write_model_card
from pruning_core.lm.checkpoint import CheckpointReader
from pruning_core.lm.speed import checkpoint_bytes
from pruning_core.lm.stream import LayerStream, calibrate_blocks
from pruning_core.lm.unit_stats import UnitStatistics
from pruning_core.lm.writer import CheckpointWriter
from pruning_core.quant import (
    QuantizedWeight,
    QuantSpec,
    pack_weight,
    quantize_rtn,
    write_quantization_config,
)
from pruning_core.solvers.gptq import gptq_quantize

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


def quant_spec(job: OneShotJob) -> QuantSpec:
    """The library's :class:`QuantSpec` of the job's ``quantization`` section (which must be set)."""
    q = job.quantization
    if q is None:
        raise ConfigError("quantization", "the job has no quantization section")
    return QuantSpec(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)


def check_quantization(job: OneShotJob, model_dir: str) -> None:
    """Before any long work: every prunable unit is an ``nn.Linear`` stored under its module name
    whose input size the group size divides (ConfigError names the layer and the numbers)."""
    spec = quant_spec(job)
    reader = CheckpointReader(model_dir)
    template = reader.template(reader.stored_dtype)
    for unit in prunable_units(template):
        module = template.get_submodule(unit.module)
        if not isinstance(module, nn.Linear) or f"{unit.module}.weight" not in reader.layout.tensors:
            raise UnsupportedOperation(f"'{unit.name}' ({type(module).__name__}) is not a Linear stored as "
                                       f"'{unit.module}.weight': the pack-quantized export stores Linear weights only")
        inputs = unit.shape[1]
        if not spec.per_channel and inputs % spec.group_size:
            smaller = [g for g in (128, 64, 32, 16) if inputs % g == 0]
            hint = f"; use {smaller[0]}" if smaller else "; use -1 (per output channel)"
            raise ConfigError("quantization.group_size", f"{spec.group_size} does not divide the {inputs} inputs of "
                                                         f"'{unit.name}' ({inputs} % {spec.group_size} = "
                                                         f"{inputs % spec.group_size}){hint}")


def hessian_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔHΔᵀ) / tr(WHWᵀ)`` with ``Δ = W - Ŵ`` (the relative output error on the calibration
    inputs: ``‖ΔX‖² / ‖WX‖²``), in float64; weights ``[out, in]``, Hessian ``[in, in]``."""
    w, h = weight.double(), hessian.double().to(weight.device)
    delta = w - approx.double()
    denom = float(((w @ h) * w).sum())
    return float(((delta @ h) * delta).sum()) / denom if denom > 0 else 0.0


def quantize_weight(job: OneShotJob, weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, *,
                    name: str, scale_dtype: torch.dtype) -> tuple[QuantizedWeight, dict[str, float]]:
    """One ``[out, in]`` weight quantized by the job's method with its keep ``mask`` held fixed;
    returns the quantized weight and its report (errors of this method and of RTN, sparsity)."""
    q, spec = job.quantization, quant_spec(job)
    assert q is not None
    rtn = quantize_rtn(weight, spec, mask=mask, scale_dtype=scale_dtype, name=name)
    if q.method == "rtn":
        qw = rtn
    else:
        blocksize = 128 if spec.per_channel else spec.group_size * max(1, 128 // spec.group_size)
        qw, _ = gptq_quantize(weight, hessian, spec, mask=mask, blocksize=blocksize, percdamp=q.percdamp,
                              scale_dtype=scale_dtype, name=name)
    new = qw.dequantize(scale_dtype).to(weight.dtype)
    report = {"error": hessian_error(weight, new, hessian),
              "rtn_error": hessian_error(weight, rtn.dequantize(scale_dtype).to(weight.dtype), hessian),
              "sparsity": 1.0 - float((new != 0).float().mean())}
    return qw, report


class BlockQuantizer:
    """``finish(i, block)`` for :func:`calibrate_blocks`: quantize block ``i``'s units in place
    (dequantized weights), save its packed tensors to ``quantized_blocks/NNN``; returns its report."""

    def __init__(self, job: OneShotJob, run_dir: str, reader: CheckpointReader, stats: UnitStatistics) -> None:
        self.job, self.run_dir, self.reader, self.stats = job, run_dir, reader, stats

    def __call__(self, index: int, block: nn.Module) -> dict[str, Any]:
        prefix = f"{self.reader.block_prefix}.{index}."
        context = self.stats.pop(index)
        units = prunable_units(block, prefix=prefix)
        masks = load_masks(paths.masks(self.run_dir), [u.name for u in units])
        packed, report = {}, {}
        for unit in units:
            weight = unit.read(block)
            qw, report[unit.name] = quantize_weight(
                self.job, weight, context.require_stats(unit.name).hessian, masks[unit.name].to(weight.device),
                name=unit.name, scale_dtype=self.reader.stored_dtype)
            unit.write(block, qw.dequantize(self.reader.stored_dtype).to(weight.dtype))
            packed[unit.module] = pack_weight(qw)
        save_tensors(paths.quantized_block(self.run_dir, index), self._block_tensors(index, block, packed))
        return report

    def _block_tensors(self, index: int, block: nn.Module, packed: dict[str, dict[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
        """The block's checkpoint tensors (stored dtypes) with each unit's ``weight`` replaced by its packing."""
        entries = self.reader.layout.tensors
        tensors = {k: v.detach().to("cpu", entries[k].torch_dtype)
                   for k, v in self.reader.to_checkpoint(index, block).items()}
        prefix = f"{self.reader.block_prefix}.{index}."
        for module, local in packed.items():
            del tensors[f"{prefix}{module}.weight"]
            tensors.update({f"{prefix}{module}.{k}": v.contiguous() for k, v in local.items()})
        return tensors


def _ignored_linears(reader: CheckpointReader) -> list[str]:
    """Linear modules outside the decoder blocks (the head): left unquantized, listed in ``ignore``."""
    template = reader.template(reader.stored_dtype)
    inside = reader.block_prefix + "."
    return sorted(n for n, m in template.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inside))


def _shell_tensors(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors outside the decoder blocks (embeddings, final norm, head), as stored."""
    in_blocks = {k for i in range(reader.num_blocks) for k in reader.block_names(i)}
    wanted = [k for k in reader.layout.tensors if k not in in_blocks]
    out = {}
    for key in wanted:
        with safe_open(str(reader.root / reader.layout.tensors[key].file), "pt") as f:
            out[key] = f.get_tensor(key)
    return out


def write_export(run_dir: str, reader: CheckpointReader, spec: QuantSpec) -> Path:
    """Assemble ``model-quantized/`` from the per-block packed files: one shard for the shell and one
    per block, the index, the input's config/tokenizer files, then compressed-tensors'
    ``quantization_config`` in ``config.json``; built aside and renamed into place."""
    final = paths.quantized_model(run_dir)
    groups = [_shell_tensors(reader)]
    groups += [load_tensors(paths.quantized_block(run_dir, i)) for i in range(reader.num_blocks)]
    weight_map, total = {}, 0
    with atomic_dir(final) as tmp:
        for k, tensors in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for f in sorted(reader.root.iterdir()):
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in {INDEX, MANIFEST_NAME}:
                shutil.copy2(f, tmp / f.name)
        write_quantization_config(tmp, spec, ignore=_ignored_linears(reader))
        manifest = Manifest(tmp)
        for f in sorted(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST_NAME):
            manifest.record(f.name, f, kind="model-file")
    return final


def quantization_summary(job: OneShotJob, run_dir: str, layers: dict[str, dict[str, float]], *,
                         joint: bool) -> dict[str, Any]:
    """The ``quantization`` entry of summary.json: spec, paths, bytes, mean errors, per-layer reports
    (``reference``: the errors are measured from the dense weight (joint) or the pruned one)."""
    q = job.quantization
    assert q is not None
    out = paths.quantized_model(run_dir)
    mean = {k: sum(r[k] for r in layers.values()) / max(1, len(layers)) for k in ("error", "rtn_error")}
    return {"method": q.method, "bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric,
            "joint": joint, "reference": "dense" if joint else "pruned", "format": "pack-quantized", "path": str(out), "dequantized_path": str(paths.dequantized_model(run_dir)),
            "file_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")), "num_layers": len(layers),
            "mean_error": mean["error"], "mean_rtn_error": mean["rtn_error"], "layers": layers}


def model_sizes(input_dir: str, run_dir: str, quantized: bool) -> dict[str, Any]:
    """Bytes on disk of the input model's weights and of the job's output(s), and their ratio."""
    output = paths.quantized_model(run_dir) if quantized else paths.model(run_dir)
    return {**llm.model_sizes(input_dir, str(output)), "pruned_bytes": checkpoint_bytes(paths.model(run_dir))}


def card_info(job: OneShotJob, summary: dict[str, Any]) -> dict[str, Any]:
    """The :func:`pruning_core.lm.card.render_model_card` keys of a one-shot job's summary."""
    config = job.model_dump(mode="json", exclude_defaults=True, exclude={"tracking", "runner", "name"})
    windows = ("text", "num_windows", "window_length")
    return {"kind": "oneshot", "base_model": job.model, "config": yaml.safe_dump(config, sort_keys=False),
            "command": "prune run job.yaml   # job.yaml: the configuration below",
            "calibration": {k: getattr(job.calibration, k) for k in windows},
            "evaluation": {k: getattr(job.evaluation, k) for k in windows} if job.evaluation.enabled else None,
            **{k: summary.get(k) for k in ("method", "pattern", "scope", "sparsity", "target_sparsity",
                                           "perplexity_before", "perplexity_after", "size", "speed")}}


@task(name="write-model-cards", **IO_TASK)
def write_cards(job: OneShotJob, run_dir: str, summary: dict[str, Any]) -> list[str]:
    """``README.md`` model cards in ``model/`` and (if quantized) ``model-quantized/``; the model
    directories' manifests are updated to include them. After a joint quantization ``model/``
    holds the quantized weights (dequantized), and its card says so."""
    info = card_info(job, summary)
    joint = bool(summary.get("quantization") and summary["quantization"].get("joint"))  # model/ is quantized
    targets = [("model", paths.model(run_dir), {**info, "quantization": summary["quantization"] if joint else None})]
    if summary.get("quantization"):
        targets.append(("model-quantized", paths.quantized_model(run_dir),
                        {**info, "quantization": summary["quantization"], "format": "pack-quantized"}))
    written = []
    for name, directory, details in targets:
        card = write_model_card(directory, details)
        Manifest(directory).record(card.name, card, kind="model-file")
        Manifest(run_dir).record(name, directory, kind="model")
        written.append(str(card))
    return written


@task(name="quantize", **IO_TASK)
def quantize(job: OneShotJob, run_dir: str) -> dict[str, Any]:
    """Quantize the pruned model block by block (resumable); returns the quantization summary
    (paths, bytes, mean errors of the method and of RTN, per-layer reports)."""
    report_path = paths.quantization_report(run_dir)
    if Manifest(run_dir).is_complete("quantization"):
        return json.loads(report_path.read_text())
    reader = CheckpointReader(paths.model(run_dir))
    stream = LayerStream(reader, llm.load_windows(run_dir, "calibration"), batch_size=job.calibration.batch_size,
                         device=job.device, head=False)
    stats = UnitStatistics(hessian=True, dataset=job.calibration.text)
    with CheckpointWriter(reader, paths.dequantized_model(run_dir), key=job.job_hash()) as writer:
        records = calibrate_blocks(stream, BlockQuantizer(job, run_dir, reader, stats), observe=stats,
                                   sequential=True, writer=writer)
        writer.finish()
    write_export(run_dir, reader, quant_spec(job))
    layers = {name: r for i in sorted(records) for name, r in records[i].items()}
    summary = record_quantization(run_dir, quantization_summary(job, run_dir, layers, joint=False))
    log.info("quantized %d layers (%s %s): mean relative error %.4g (RTN %.4g), %s", len(layers),
             summary["method"], quant_spec(job), summary["mean_error"], summary["mean_rtn_error"], summary["path"])
    return summary



def record_quantization(run_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the quantization report, record both output models and the report in the manifest and
    drop the per-block scratch files (the last step of the separate and of the joint pass)."""
    report_path = paths.quantization_report(run_dir)
    atomic_write_text(report_path, json.dumps(summary, indent=1))
    manifest = Manifest(run_dir)
    manifest.record("model-quantized", paths.quantized_model(run_dir), kind="model")
    manifest.record("model-dequantized", paths.dequantized_model(run_dir), kind="model")
    manifest.record("quantization", report_path, kind="json")
    shutil.rmtree(paths.quantized_block(run_dir, 0).parent, ignore_errors=True)
    return summary

__all__ = ["BlockQuantizer", "card_info", "check_quantization", "hessian_error", "model_sizes", "quant_spec",
           "quantization_summary", "quantize", "quantize_weight", "record_quantization", "write_cards", "write_export"]
