"""Export a pruned model's weights in a sparse format, and load them back as exact dense weights.

Stage: formats -> disk. Every pruned layer (a weight with a keep-mask) is stored sparsely, every
other tensor densely, in one safetensors file; ``sparse_index.json`` names each tensor's layout,
shape, dtype and stored arrays. The directory is written atomically (a crash leaves no partial
export). Formats:

* ``csr``: :class:`~pruning_core.sparse.CSRTensor` arrays ``<param>.values``,
  ``<param>.col_indices``, ``<param>.row_ptrs`` in ``weights.safetensors`` (any mask).
* ``semi_structured``: :class:`~pruning_core.sparse.SemiStructuredTensor` arrays
  ``<param>.values``, ``<param>.meta`` in ``weights.safetensors`` (2:4 masks only).
* ``compressed_tensors``: a Hugging Face directory in compressed-tensors' ``sparse-24-bitmask``
  layout (``model.safetensors`` + ``config.json`` with a ``quantization_config``; see
  :mod:`pruning_core.sparse.bitmask24`), 2:4 masks only.

Exactness: :func:`load_sparse_export` returns every tensor bit for bit, except that a pruned
position always comes back as +0.0 (a -0.0 left by ``w * mask`` is not kept). A weight that is
non-zero outside its mask is refused: the export stores pruned weights, never silently prunes.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pruning_core.errors import ArtifactError, ConfigError, InvalidMask, InvalidPattern, ShapeMismatch
from pruning_core.io.atomic import atomic_dir
from pruning_core.io.tensors import load_tensors, save_tensors
from pruning_core.masks.pattern import NM
from pruning_core.sparse import bitmask24
from pruning_core.sparse.csr import CSRTensor
from pruning_core.sparse.semi import SemiStructuredTensor

PathLike = str | os.PathLike[str]
INDEX = "sparse_index.json"
_KIND, _VERSION = "pruning_core.sparse_export", 1
_SKIP = {"model.safetensors.index.json", "manifest.json", INDEX}  # never copied from a model directory


class ExportFormat(enum.Enum):
    """Sparse export formats (``export.sparse_format`` of a one-shot job, besides ``none``)."""

    CSR = "csr"
    SEMI_STRUCTURED = "semi_structured"
    COMPRESSED_TENSORS = "compressed_tensors"

    @classmethod
    def parse(cls, value: ExportFormat | str) -> ExportFormat:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(f.value for f in cls)
            raise ConfigError("format", f"sparse export format must be one of {allowed}; got {value!r}") from None


@dataclass(frozen=True, slots=True)
class SparseExport:
    """What an export holds: ``file_bytes`` of its weights file vs ``dense_bytes`` of the same tensors."""

    path: str
    format: str
    layers: int
    file_bytes: int
    dense_bytes: int

    @property
    def size_ratio(self) -> float:
        """``file_bytes / dense_bytes`` (< 1 means the export is smaller than dense storage)."""
        return self.file_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.size_ratio}


# ----------------------------------------------------------------------------- inputs
def _read_source(
    source: Any, config: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict | None, list[Path]]:
    """``(state, config, files to copy)`` from a model, a state dict or a model directory."""
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        weights = sorted(root.glob("*.safetensors"))
        if not root.is_dir() or not weights:
            raise ArtifactError(str(root), "not a model directory with *.safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for f in weights:
            state.update(load_tensors(f))
        cfg = root / "config.json"
        found = dict(config) if config is not None else (json.loads(cfg.read_text()) if cfg.is_file() else None)
        files = [p for p in sorted(root.iterdir()) if p.is_file() and p.suffix != ".safetensors"
                 and p.name not in _SKIP and p.name != "config.json"]
        return state, found, files
    if isinstance(source, torch.nn.Module):
        hf = getattr(source, "config", None)
        found = dict(config) if config is not None else (
            json.loads(hf.to_json_string(use_diff=False)) if hasattr(hf, "to_json_string") else None)
        return {k: v.detach().cpu() for k, v in source.state_dict().items()}, found, []
    if isinstance(source, Mapping):
        return dict(source), dict(config) if config is not None else None, []
    raise ConfigError("source", f"expected a model, a state dict or a model directory, got {type(source).__name__}")


def _param(key: str, state: Mapping[str, torch.Tensor]) -> str:
    for name in (key, f"{key}.weight"):
        if name in state and state[name].dim() == 2:
            return name
    raise ConfigError("masks", f"mask '{key}' names no 2-D tensor of the model (tried '{key}' and '{key}.weight')")


def _checked_masks(
    masks: Mapping[str, Any], state: Mapping[str, torch.Tensor], fmt: ExportFormat
) -> dict[str, torch.Tensor]:
    """Param name -> bool mask; every check happens here, before anything is written."""
    out: dict[str, torch.Tensor] = {}
    for key, raw in masks.items():
        name = _param(key, state)
        mask = getattr(raw, "tensor", raw)  # a SparsityMask or a tensor
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InvalidMask(f"masks must be bool tensors, got {getattr(mask, 'dtype', type(mask).__name__)}", name=key)
        weight = state[name]
        if mask.shape != weight.shape:
            raise ShapeMismatch(list(weight.shape), list(mask.shape), name=f"mask of {name}")
        if fmt is not ExportFormat.CSR:
            try:
                NM(2, 4).validate(mask, name=name)
            except InvalidPattern as e:
                raise InvalidPattern(f"the {fmt.value} export stores 2:4 sparsity only; {e.message}", name=name) from e
        stray = int(((weight != 0) & ~mask.to(weight.device)).sum())
        if stray:
            raise InvalidMask(f"{stray} weights outside the mask are non-zero; export the pruned weights "
                              "(weight * mask), not the dense ones", name=name)
        out[name] = mask.cpu()
    return out


# ----------------------------------------------------------------------------- encoding
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode(
    name: str, weight: torch.Tensor, mask: torch.Tensor, fmt: ExportFormat
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The index entry and the stored arrays of one pruned weight."""
    weight = weight.detach().cpu()
    if fmt is ExportFormat.CSR:
        csr = CSRTensor.from_dense(weight, mask)
        parts, layout, nnz = {"values": csr.values, "col_indices": csr.col_indices, "row_ptrs": csr.row_ptrs}, "csr", csr.nnz
    elif fmt is ExportFormat.SEMI_STRUCTURED:
        semi = SemiStructuredTensor.from_dense(weight, mask)
        parts, layout, nnz = {"values": semi.values, "meta": semi.meta}, "semi_structured", semi.nnz
    else:
        parts, layout, nnz = bitmask24.encode(weight, mask), bitmask24.FORMAT, int(mask.sum())
    prefix = name.removesuffix(".weight") if fmt is ExportFormat.COMPRESSED_TENSORS else name
    arrays = {f"{prefix}.{role}": t.contiguous() for role, t in parts.items()}
    entry = {"layout": layout, "shape": list(weight.shape), "dtype": _dtype_name(weight.dtype), "nnz": nnz,
             "arrays": {role: f"{prefix}.{role}" for role in parts}}
    return entry, arrays


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _encode_all(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], fmt: ExportFormat):
    """Index entries (in state order) and every array to store; tied tensors are stored once."""
    entries: dict[str, dict] = {}
    arrays: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        if name in masks:
            entries[name], parts = _encode(name, tensor, masks[name], fmt)
            arrays.update(parts)
            continue
        key = _storage_key(tensor) if tensor.numel() else (name,)
        if key in seen:  # e.g. lm_head.weight tied to model.embed_tokens.weight
            entries[name] = {"layout": "alias", "of": seen[key]}
            continue
        seen[key] = name
        entries[name] = {"layout": "dense", "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
                         "arrays": {"data": name}}
        arrays[name] = tensor.detach().cpu().contiguous()
    return entries, arrays


def _zero_fraction(state: Mapping[str, torch.Tensor], entries: Mapping[str, dict]) -> float:
    stored = [state[n] for n, e in entries.items() if e["layout"] != "alias" and state[n].is_floating_point()]
    total = sum(t.numel() for t in stored)
    return sum(int((t == 0).sum()) for t in stored) / total if total else 0.0


# ----------------------------------------------------------------------------- export / load
def export_sparse(source: Any, masks: Mapping[str, Any], out_dir: PathLike, format: ExportFormat | str,
                  *, config: Mapping[str, Any] | None = None) -> SparseExport:
    """Write the pruned weights of ``source`` to ``out_dir`` in a sparse ``format``.

    Args:
        source: An ``nn.Module`` (a Hugging Face model brings its config), a state dict
            (name -> tensor), or a Hugging Face model directory (its other files, such as the
            tokenizer, are copied along).
        masks: Layer or parameter name (``model.layers.0.mlp.up_proj`` or ``....weight``) ->
            bool keep-mask of that 2-D weight's shape. Tensors without a mask are stored dense.
        out_dir: The export directory; replaced atomically if it exists.
        format: ``csr``, ``semi_structured`` or ``compressed_tensors`` (:class:`ExportFormat`).
        config: A Hugging Face ``config.json`` mapping; required for ``compressed_tensors``
            when ``source`` is a plain state dict.

    Returns:
        A :class:`SparseExport` with the weights file's size and the dense size of the same tensors.

    Raises:
        ConfigError: unknown format, a mask naming no 2-D tensor, no config for compressed_tensors.
        InvalidPattern: a 2:4 format and a mask that is not 2:4 (names the layer and group).
        InvalidMask / ShapeMismatch: a non-bool mask, a mask of the wrong shape, or a weight
            that is non-zero outside its mask.
    """
    fmt = ExportFormat.parse(format)
    state, cfg, files = _read_source(source, config)
    checked = _checked_masks(masks, state, fmt)
    if fmt is ExportFormat.COMPRESSED_TENSORS and cfg is None:
        raise ConfigError("config", "the compressed_tensors export writes a Hugging Face config.json: pass a "
                                    "model, a model directory, or config=")
    entries, arrays = _encode_all(state, checked, fmt)
    if fmt is ExportFormat.COMPRESSED_TENSORS:
        targets = [n.removesuffix(".weight") for n in checked]
        cfg = bitmask24.hf_config(cfg, targets, _zero_fraction(state, entries))
    weights_file = "model.safetensors" if fmt is ExportFormat.COMPRESSED_TENSORS else "weights.safetensors"
    dense_bytes = sum(state[n].numel() * state[n].element_size() for n, e in entries.items() if e["layout"] != "alias")
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / weights_file, arrays, metadata={"format": "pt", "sparse_format": fmt.value})
        file_bytes = (tmp / weights_file).stat().st_size
        for f in files:
            shutil.copy2(f, tmp / f.name)
        if cfg is not None:
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        index = {"kind": _KIND, "version": _VERSION, "format": fmt.value, "weights_file": weights_file,
                 "layers": len(checked), "file_bytes": file_bytes, "dense_bytes": dense_bytes, "tensors": entries}
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return SparseExport(str(Path(out_dir)), fmt.value, len(checked), file_bytes, dense_bytes)


def _read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX
    if not path.is_file():
        raise ArtifactError(str(root), f"not a sparse export: no {INDEX}")
    try:
        index = json.loads(path.read_text())
        if index["kind"] != _KIND or index["version"] != _VERSION:
            raise ArtifactError(str(path), f"unknown export kind/version {index['kind']!r} v{index['version']}")
        ExportFormat.parse(index["format"])
        return index
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(str(path), f"malformed sparse index ({exc})") from exc


def read_export_info(out_dir: PathLike) -> SparseExport:
    """The :class:`SparseExport` summary of an existing export directory (from its index)."""
    index = _read_index(Path(out_dir))
    return SparseExport(str(Path(out_dir)), index["format"], index["layers"], index["file_bytes"], index["dense_bytes"])


def _decode(name: str, entry: dict, arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
    a = {role: arrays[key] for role, key in entry["arrays"].items()}
    layout, shape = entry["layout"], entry["shape"]
    try:
        if layout == "dense":
            return a["data"]
        if layout == "csr":
            return CSRTensor(a["values"], a["col_indices"], a["row_ptrs"], shape).to_dense()
        if layout == "semi_structured":
            return SemiStructuredTensor(a["values"], a["meta"], shape, nnz=entry["nnz"]).to_dense()
        if layout == bitmask24.FORMAT:
            return bitmask24.decode(a["compressed"], a["bitmask"], a["shape"], name=name)
    except (InvalidMask, InvalidPattern, ShapeMismatch) as exc:
        raise ArtifactError(name, f"corrupt {layout} arrays ({exc})") from exc
    raise ArtifactError(name, f"unknown layout {layout!r}")


def load_sparse_export(out_dir: PathLike) -> dict[str, torch.Tensor]:
    """Reconstruct the dense state dict (name -> tensor, in the exported order) of an export.

    Raises:
        ArtifactError: a missing, corrupt or inconsistent export (names the file or tensor).
    """
    root = Path(out_dir)
    index = _read_index(root)
    entries: dict[str, dict] = index["tensors"]
    needed = [k for e in entries.values() if e["layout"] != "alias" for k in e["arrays"].values()]
    arrays = load_tensors(root / index["weights_file"], needed)
    out: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        if entry["layout"] == "alias":
            out[name] = out[entry["of"]]
            continue
        tensor = _decode(name, entry, arrays)
        if list(tensor.shape) != entry["shape"] or _dtype_name(tensor.dtype) != entry["dtype"]:
            raise ArtifactError(name, f"decoded {list(tensor.shape)} {tensor.dtype}, index says "
                                      f"{entry['shape']} {entry['dtype']}")
        out[name] = tensor
    return out


__all__ = ["ExportFormat", "SparseExport", "export_sparse", "load_sparse_export", "read_export_info"]
