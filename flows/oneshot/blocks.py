"""Block-by-block helpers of the one-shot tasks: the checkpoint, its prunable units, one unit's
weight, the streams over the run's windows, and one block's per-unit results and table rows.

Nothing here holds the whole model: a :class:`~pruning_core.lm.CheckpointReader` (cached per
process and model directory: a meta-device skeleton and the name mapping, no weights) reads one
module, one decoder block or the shell at a time (issue 13 §3).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pruning_core.arch import PrunableUnit, decoder_blocks, prunable_units
from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.inputs import InputSample
from pruning_core.io import paths
from pruning_core.io.layers import load_layer_result
from pruning_core.lm import CheckpointReader, LayerStream, resolve_device
from pruning_core.metrics import reconstruction_error
from pruning_core.validate import check_finite

_READER_LOCK = threading.Lock()
FLOATING = frozenset({"F64", "F32", "BF16", "F16"})  # safetensors dtypes checked for NaN/Inf


@lru_cache(maxsize=4)
def _cached_reader(model_dir: str, stamp: tuple[tuple[str, int, int], ...]) -> CheckpointReader:
    return CheckpointReader(model_dir)


def reader_for(model_dir: str) -> CheckpointReader:
    """The checkpoint of ``model_dir`` (one per process while its files are unchanged; thread-safe)."""
    from pathlib import Path

    files = sorted(Path(model_dir).glob("*.safetensors"))
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    with _READER_LOCK:
        return _cached_reader(str(model_dir), stamp)


def model_units(reader: CheckpointReader) -> dict[str, PrunableUnit]:
    """Every prunable unit of the model by qualified name (from the meta skeleton: no weights read)."""
    return {u.name: u for u in prunable_units(reader.template(reader.stored_dtype))}


def block_index(reader: CheckpointReader, name: str) -> int:
    """The decoder block a unit named ``name`` lies in."""
    return int(name.removeprefix(reader.block_prefix + ".").split(".", 1)[0])


def unit_sources(reader: CheckpointReader) -> dict[str, dict[str, Any]]:
    """Per unit: its block, and where its parameter is saved (``file``, ``key``; None when a
    conversion builds it, e.g. fused MoE experts), ``expert`` and ``transposed``: enough for a
    task to read the unit with ``safe_open`` alone (:func:`read_saved_unit`)."""
    out = {}
    for name, unit in model_units(reader).items():
        key = reader.saved_name(unit.tensor_name)
        out[name] = {"block": block_index(reader, name), "key": key, "expert": unit.expert,
                     "file": reader.layout.tensors[key].file if key is not None else None,
                     "transposed": unit.transposed}
    return out


def read_saved_unit(model_dir: str, source: dict[str, Any], device: str, dtype: torch.dtype) -> torch.Tensor:
    """A unit's weight ``[out, in]`` read by its saved name (see :func:`unit_sources`), in the
    compute dtype (float32 on CPU, else ``dtype``) on ``device``; no model class is built."""
    from pathlib import Path

    with safe_open(str(Path(model_dir) / source["file"]), framework="pt", device="cpu") as f:
        weight = f.get_tensor(source["key"])
    if source["expert"] is not None:
        weight = weight[source["expert"]]
    weight = weight.T if source["transposed"] else weight
    target = resolve_device(device)
    return weight.to(target, torch.float32 if target.type == "cpu" else dtype).contiguous()


def block_units(reader: CheckpointReader, block: nn.Module, index: int) -> list[PrunableUnit]:
    """The units of decoder ``block`` (read/written on the block), named as in the whole model."""
    return prunable_units(block, prefix=f"{reader.block_prefix}.{index}.")


def compute_dtype(reader: CheckpointReader, device: str) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are ~40x slower there), the stored dtype on an accelerator."""
    return torch.float32 if resolve_device(device).type == "cpu" else reader.stored_dtype


def read_unit(reader: CheckpointReader, name: str, device: str) -> torch.Tensor:
    """Unit ``name``'s weight ``[out, in]`` (math orientation), read alone from the checkpoint (its
    parameter only: for a fused MoE parameter, every expert's slice in the stored dtype), then
    cast to the compute dtype on ``device``."""
    unit = model_units(reader)[name]
    tensors = reader.read_model_tensors(lambda n: n == unit.tensor_name, reader.stored_dtype)
    if unit.tensor_name not in tensors:  # a parameter built by a one-to-many conversion: its whole module
        prefix = unit.module + "."
        tensors = reader.read_model_tensors(lambda n: n.startswith(prefix), reader.stored_dtype)
    weight = tensors.pop(unit.tensor_name)
    del tensors
    if unit.expert is not None:
        weight = weight[unit.expert]
    weight = weight.T if unit.transposed else weight
    return weight.to(resolve_device(device), compute_dtype(reader, device)).contiguous()


def check_weights_finite(reader: CheckpointReader) -> None:
    """Raise NumericalInstability naming the first saved tensor holding NaN/Inf and its index.

    One tensor in memory at a time: each is read through its own ``safe_open`` (a mapping kept
    open over a whole shard would keep every page read so far resident).
    """
    for name, entry in reader.layout.tensors.items():
        if entry.dtype not in FLOATING:
            continue
        with safe_open(str(reader.root / entry.file), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(name)
        check_finite(tensor, method="prepare", what="weight", layer=name)
        del tensor


def open_stream(reader: CheckpointReader, windows: torch.Tensor, batch_size: int, device: str) -> LayerStream:
    """A calibration stream (no output head) over ``windows`` on ``device``."""
    return LayerStream(reader, windows, batch_size=batch_size, device=device, head=False)


def unit_row(unit: PrunableUnit, original: torch.Tensor, new: torch.Tensor, mask: torch.Tensor,
             stats: CalibrationContext | None, tokens: int | None = None, *,
             sample: InputSample | None = None) -> dict[str, Any]:
    """One row of the per-unit table: shape, sparsity, relative output reconstruction error
    (``‖(W - Ŵ)Xᵀ‖ / ‖WXᵀ‖`` on the unit's ``sample`` of inputs, else from its ``XᵀX`` in ``stats``;
    None without tokens), and the calibration tokens routed to it (``tokens``, default the count in
    ``stats``; None if unknown)."""
    layer = stats.get_stats(unit.name) if stats is not None else None
    if tokens is None and layer is not None:
        tokens = int(layer.count)
    error = None
    if sample is not None:
        error = sample.relative_error(original, new)
    elif layer is not None and layer.xtx is not None and layer.count > 0:
        error = reconstruction_error(original, new, layer, name=unit.name)
    return {"name": unit.name, "kind": unit.kind, "shape": list(unit.shape),
            "sparsity": 1.0 - float(mask.float().mean()), "reconstruction_error": error, "tokens": tokens,
            "zero_token_expert": unit.expert is not None and tokens == 0}


def saved_masks(reader: CheckpointReader, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The units' keep-masks (by unit name, ``[out, in]`` math orientation) as masks of the tensors the
    checkpoint saves (by saved name, in their storage layout): a GPT-2 ``Conv1D`` mask transposed, a
    fused MoE parameter's expert masks split into the per-expert tensors the checkpoint stores
    (Mixtral's ``experts.N.w1/w2/w3``) by the checkpoint's own name mapping. One block at a time.

    A saved tensor only partly covered by units is left out (the sparse export stores it dense).
    """
    out = {}
    for i, meta_block in enumerate(decoder_blocks(reader.template(torch.float32))[1]):
        block = copy.deepcopy(meta_block).to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*block.parameters(), *block.buffers()]:
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))  # whatever no unit writes stays NaN
            for unit in block_units(reader, block, i):
                unit.write(block, masks[unit.name].to(torch.float32))
        for name, tensor in reader.to_checkpoint(i, block).items():
            if tensor.is_floating_point() and not bool(tensor.isnan().any()):
                out[name] = tensor != 0
    return out


def apply_results(run_dir: str, reader: CheckpointReader, index: int, block: nn.Module,
                  samples: Mapping[str, InputSample], counts: dict[str, int]) -> list[dict[str, Any]]:
    """Write every unit's saved result (new weight, or the dense weight times its mask) into
    ``block`` in place; the block's table rows (errors on ``samples``, the units' inputs by name;
    ``counts``: calibration tokens per unit)."""
    rows = []
    for unit in block_units(reader, block, index):
        mask, weight = load_layer_result(paths.layer_scores(run_dir, unit.name))
        original = unit.read(block).clone()
        new = weight if weight is not None else original * mask.to(original.device)
        unit.write(block, new.to(original.device))
        rows.append(unit_row(unit, original, unit.read(block), mask, None, counts.get(unit.name),
                             sample=samples.get(unit.name)))
    return rows


__all__ = ["apply_results", "block_index", "block_units", "read_saved_unit", "unit_sources", "check_weights_finite", "compute_dtype", "model_units",
           "open_stream", "read_unit", "reader_for", "saved_masks", "unit_row"]
