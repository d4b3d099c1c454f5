"""Calibration statistics on disk: Parquet for per-channel sums, safetensors for Hessians.

Stage: io. Layout of the Parquet file (one row per layer × input channel)::

    layer: string | channel: int32 | sum_sq: float64 | sum_abs: float64 | count: int64

``count`` (tokens) repeats on every row of a layer. The file's key/value metadata holds the
caller's identity entries (model, config hash, ...) plus ``pruning_core.num_samples``,
``pruning_core.dataset`` and ``pruning_core.stats_format``. One layer is read with a Parquet
filter (``filters=[("layer", "=", name)]``), so a scoring task never loads the whole file.

Hessians (``XᵀX`` sums, float64 by default) go to a safetensors file with one tensor per layer,
named by the layer, and the token counts as JSON in the metadata entry ``counts``; one layer is
loaded with ``safe_open``. Both files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import ArtifactError, ConfigError, MissingActivationStats
from pruning_core.io.atomic import atomic_path

PathLike = str | os.PathLike[str]
STATS_FORMAT = "1"
_META_PREFIX = "pruning_core."
SCHEMA = pa.schema([
    ("layer", pa.string()), ("channel", pa.int32()), ("sum_sq", pa.float64()),
    ("sum_abs", pa.float64()), ("count", pa.int64()),
])


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError("metadata", f"keys and values must be strings; bad keys: {bad[:5]}")
    return meta


def save_activation_stats(path: PathLike, context: CalibrationContext,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write every layer's ``sum_sq``/``sum_abs``/``count`` of ``context`` to a Parquet file.

    Args:
        path: target ``.parquet`` file (replaced atomically).
        context: the statistics; layers are written in insertion order.
        metadata: extra ``str -> str`` file metadata (model and config identity).
    """
    meta = _check_metadata(metadata)
    meta.update({f"{_META_PREFIX}num_samples": str(context.num_samples),
                 f"{_META_PREFIX}dataset": context.dataset,
                 f"{_META_PREFIX}stats_format": STATS_FORMAT})
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for name, stats in context:
        n = stats.in_features
        columns["layer"].append(pa.array([name] * n, pa.string()))
        columns["channel"].append(pa.array(range(n), pa.int32()))
        columns["sum_sq"].append(pa.array(stats.sum_sq.cpu().numpy(), pa.float64()))
        columns["sum_abs"].append(pa.array(stats.sum_abs.cpu().numpy(), pa.float64()))
        columns["count"].append(pa.array([stats.count] * n, pa.int64()))
    arrays = [pa.concat_arrays(columns[f.name]) if columns[f.name] else pa.array([], f.type) for f in SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=SCHEMA.with_metadata(meta))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def _read_table(path: PathLike, filters: list[tuple[str, str, Any]] | None) -> pa.Table:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(str(p), "statistics file does not exist")
    try:
        table = pq.read_table(p, filters=filters)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ArtifactError(str(p), f"not a readable Parquet statistics file ({exc})") from exc
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ArtifactError(str(p), f"missing columns {missing}")
    return table


def read_stats_metadata(path: PathLike) -> dict[str, str]:
    """The file's key/value metadata (caller entries and ``pruning_core.*``), decoded."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(str(p), "statistics file does not exist")
    try:
        raw = pq.read_schema(p).metadata or {}
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactError(str(p), f"not a readable Parquet file ({exc})") from exc
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW:")}


def _stats_from_rows(path: PathLike, name: str, cols: dict[str, torch.Tensor], rows: torch.Tensor) -> ActivationStats:
    channel = cols["channel"][rows]
    order = torch.argsort(channel)
    if not torch.equal(channel[order], torch.arange(channel.numel())):
        raise ArtifactError(str(path), f"layer '{name}': channels are not 0..{channel.numel() - 1}")
    counts = torch.unique(cols["count"][rows])
    if counts.numel() != 1:
        raise ArtifactError(str(path), f"layer '{name}': inconsistent token counts {counts[:5].tolist()}")
    rows = rows[order]
    return ActivationStats.from_arrays(cols["sum_sq"][rows], cols["sum_abs"][rows], int(counts[0]), name=name)


def load_activation_stats(path: PathLike, layers: Sequence[str] | None = None) -> CalibrationContext:
    """Read a statistics file (all layers, or only ``layers``) into a :class:`CalibrationContext`.

    Raises:
        ArtifactError: missing or corrupt file. MissingActivationStats: a requested layer is absent.
    """
    filters = None if layers is None else [("layer", "in", list(layers))]
    table = _read_table(path, filters)
    meta = read_stats_metadata(path)
    ctx = CalibrationContext(meta.get(f"{_META_PREFIX}dataset", ""))
    ctx.num_samples = int(meta.get(f"{_META_PREFIX}num_samples", "0"))
    cols = {k: torch.tensor(table.column(k).to_numpy()) for k in SCHEMA.names if k != "layer"}
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(table.column("layer").to_pylist()):
        groups.setdefault(name, []).append(i)
    for name in (layers if layers is not None else groups):
        if name not in groups:
            raise MissingActivationStats(name, available=list(groups))
        rows = torch.tensor(groups[name], dtype=torch.int64)
        ctx.add_layer_stats(name, _stats_from_rows(path, name, cols, rows))
    return ctx


def load_layer_stats(path: PathLike, name: str, hessian_path: PathLike | None = None) -> ActivationStats:
    """One layer's statistics (a filtered Parquet read), with its ``XᵀX`` if ``hessian_path`` is given."""
    stats = load_activation_stats(path, [name]).require_stats(name)
    if hessian_path is not None:
        xtx, count = load_hessian(hessian_path, name)
        if count != stats.count:
            raise ArtifactError(str(hessian_path), f"layer '{name}': {count} tokens, statistics have {stats.count}")
        stats = ActivationStats.from_arrays(stats.sum_sq, stats.sum_abs, stats.count, xtx, name=name)
    return stats


def save_hessians(path: PathLike, context: CalibrationContext, metadata: Mapping[str, str] | None = None,
                  *, dtype: torch.dtype = torch.float64) -> Path:
    """Write every layer's ``XᵀX`` sum (those that have one) to a safetensors file, atomically.

    Raises:
        ConfigError: no layer of the context has ``XᵀX``.
    """
    meta = _check_metadata(metadata)
    tensors = {name: s.xtx.detach().to("cpu", dtype).contiguous() for name, s in context if s.xtx is not None}
    if not tensors:
        raise ConfigError("hessian", "no layer in the context has XᵀX (collect with hessian=True)")
    meta["counts"] = json.dumps({name: context.require_stats(name).count for name in tensors})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_hessian(path: PathLike, name: str) -> tuple[torch.Tensor, int]:
    """``(XᵀX sum, token count)`` of one layer, read with ``safe_open`` (only that tensor).

    Raises:
        ArtifactError: missing or corrupt file. MissingActivationStats: the layer is not in it.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(str(p), "Hessian file does not exist")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if name not in keys:
                missing = MissingActivationStats(name, available=keys)
            else:
                counts = json.loads((f.metadata() or {}).get("counts", "{}"))
                return f.get_tensor(name), int(counts.get(name, 0))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(str(p), f"not a readable safetensors Hessian file ({exc})") from exc
    raise missing


__all__ = [
    "SCHEMA",
    "STATS_FORMAT",
    "load_activation_stats",
    "load_hessian",
    "load_layer_stats",
    "read_stats_metadata",
    "save_activation_stats",
    "save_hessians",
]
