"""Joint pruning + quantization in the one-shot job's prune step (``quantization.joint``).

    calibrate (XᵀX of every unit, even for Wanda/magnitude) -> prune step: per unit
    :func:`pruning_core.pruning.prune_and_quantize` (SparseGPT + GPTQ in one OBS pass; other
    methods' masks, then GPTQ with the mask kept), the dequantized weight as the unit's result,
    codes/scales/report to ``quantized_layers/<unit>`` -> assemble writes ``model/`` (the pruned
    and quantized weights) -> :func:`export_joint`: ``model-quantized/`` (pack-quantized) and
    ``model-dequantized/`` (``model/``'s files) and ``quantization.json``

No second calibration pass: the Hessians are the pruning calibration's (one-pass: the dense
model's; sequential: block ``i``'s on the outputs of the already pruned and quantized blocks, as
the GPTQ and SparseGPT references). Each unit's report holds the Hessian-weighted relative error
``tr(ΔHΔᵀ) / tr(WHWᵀ)`` from the *dense* weight of the joint result and of the method's pruning
followed by round-to-nearest (``reference: dense``; the separate pass measures from the pruned
weight, ``reference: pruned``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from prefect import task
from safetensors import safe_open

from flows.execution import IO_TASK
from flows.oneshot import blocks as b
from flows.oneshot import output
from flows.oneshot.config import OneShotJob
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_dir
from pruning_core.io.manifest import Manifest
from pruning_core.io.tensors import load_tensors, read_metadata, save_tensors
from pruning_core.lm import CheckpointReader
from pruning_core.masks import SparsitySpec
from pruning_core.methods import Method
from pruning_core.pruning.quantize import prune_and_quantize
from pruning_core.quant import QuantizedWeight, pack_weight

log = logging.getLogger(__name__)


def quantize_unit(job: OneShotJob, run_dir: str, method: Method, weight: torch.Tensor, stats: Any,
                  spec: SparsitySpec, *, name: str, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and quantize one ``[out, in]`` unit; save its codes, scales and report (errors of the
    joint result and of prune-then-RTN, from the dense weight, on the unit's ``XᵀX``) to
    ``quantized_layers/<name>``; return ``(dequantized weight in weight's dtype, keep mask)``."""
    q = job.quantization
    assert q is not None
    result = prune_and_quantize(method, weight, stats, spec, output.quant_spec(job), solver=q.method,
                                percdamp=q.percdamp, scale_dtype=scale_dtype, baseline=True, name=name)
    new = result.quantized.dequantize(scale_dtype).to(weight.dtype)
    assert result.baseline is not None
    rtn = result.baseline.dequantize(scale_dtype).to(weight.dtype)
    report = {"error": output.hessian_error(weight, new, stats.xtx),
              "rtn_error": output.hessian_error(weight, rtn, stats.xtx),
              "sparsity": 1.0 - float((new != 0).float().mean())}
    _save_unit(paths.layer_quantized(run_dir, name), result.quantized, report)
    Manifest(run_dir).record(f"quantized:{name}", paths.layer_quantized(run_dir, name), kind="layer")
    return new, result.keep


def _save_unit(path: Path, qw: QuantizedWeight, report: dict[str, float]) -> None:
    tensors = {"codes": qw.codes, "scales": qw.scales, "zero_points": qw.zero_points}
    save_tensors(path, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                 metadata={"report": json.dumps(report)})


def load_unit(job: OneShotJob, run_dir: str, name: str) -> tuple[QuantizedWeight, dict[str, float]]:
    """A unit's :class:`QuantizedWeight` and report, as :func:`quantize_unit` saved them."""
    path = paths.layer_quantized(run_dir, name)
    tensors = load_tensors(path)
    qw = QuantizedWeight(tensors["codes"], tensors["scales"], tensors["zero_points"], output.quant_spec(job))
    return qw, json.loads(read_metadata(path)["report"])


def _pack_block(job: OneShotJob, run_dir: str, reader: CheckpointReader, index: int) -> dict[str, dict[str, float]]:
    """Block ``index``'s checkpoint tensors from ``model/`` (as stored) with each unit's ``weight``
    replaced by its packing, to ``quantized_blocks/NNN``; returns the block's unit reports."""
    names = reader.block_names(index)
    tensors = {}
    for key in names:
        with safe_open(str(reader.root / reader.layout.tensors[key].file), "pt") as f:
            tensors[key] = f.get_tensor(key)
    reports = {}
    for name, unit in b.model_units(reader).items():
        if b.block_index(reader, name) != index:
            continue
        qw, reports[name] = load_unit(job, run_dir, name)
        del tensors[f"{unit.module}.weight"]  # stored under its module name (output.check_quantization)
        tensors.update({f"{unit.module}.{k}": v.contiguous() for k, v in pack_weight(qw).items()})
    save_tensors(paths.quantized_block(run_dir, index), tensors)
    return reports


def _link_model(source: Path, target: Path) -> None:
    """``target`` with ``source``'s files: weights hard-linked where the file system allows (no
    second copy on disk), the small files copied; built aside and renamed into place."""
    with atomic_dir(target) as tmp:
        for f in sorted(p for p in source.iterdir() if p.is_file() and p.name != "README.md"):
            if f.suffix == ".safetensors":
                try:
                    os.link(f, tmp / f.name)
                    continue
                except OSError:  # another file system, or no hard links: copy
                    pass
            shutil.copy2(f, tmp / f.name)


@task(name="export-quantized", **IO_TASK)
def export_joint(job: OneShotJob, run_dir: str) -> dict[str, Any]:
    """After assemble (or the sequential pass): ``model-quantized/`` from the units' saved codes and
    ``model/``'s other tensors, ``model-dequantized/`` (``model/``'s weights, which are the
    dequantized ones) and ``quantization.json``; returns the quantization summary."""
    report_path = paths.quantization_report(run_dir)
    if Manifest(run_dir).is_complete("quantization"):
        return json.loads(report_path.read_text())
    reader = CheckpointReader(paths.model(run_dir))
    layers: dict[str, dict[str, float]] = {}
    for index in range(reader.num_blocks):
        layers.update(_pack_block(job, run_dir, reader, index))
    output.write_export(run_dir, reader, output.quant_spec(job))
    _link_model(paths.model(run_dir), paths.dequantized_model(run_dir))
    summary = output.record_quantization(run_dir, output.quantization_summary(job, run_dir, layers, joint=True))
    log.info("joint quantization of %d layers (%s %s): mean relative error %.4g (prune then RTN %.4g), %s",
             len(layers), summary["method"], output.quant_spec(job), summary["mean_error"],
             summary["mean_rtn_error"], summary["path"])
    return summary


__all__ = ["export_joint", "load_unit", "quantize_unit"]
