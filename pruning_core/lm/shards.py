"""The byte layout of a (sharded) safetensors checkpoint, read and written without loading it.

Stage: inputs/outputs (used by :mod:`pruning_core.lm.checkpoint` and
:mod:`pruning_core.lm.writer`). A safetensors file is an 8-byte little-endian header length
``N``, ``N`` bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {...}}``, offsets relative to the end of the header) and the raw tensor bytes,
back to back. When every tensor's name, dtype and shape is known up front (pruning changes none
of them) a shard's header can be written first, the file sized, and each tensor's bytes written
at its offset with ``os.pwrite`` whenever the tensor is ready: memory stays bounded by one
tensor, and a dense re-save has exactly the input's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pruning_core.errors import ArtifactError, ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a shard: ``begin``/``end`` are absolute byte offsets in ``file``."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class ShardHeader:
    """A shard file's name, its raw header (length prefix + JSON) and its total size in bytes."""

    file: str
    raw: bytes
    size: int


def _parse_header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ArtifactError(str(path), "not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 << 20:
            raise ArtifactError(str(path), f"safetensors header of {length} bytes is implausible")
        text = f.read(length)
    if len(text) != length:
        raise ArtifactError(str(path), f"truncated safetensors header ({len(text)} of {length} bytes)")
    try:
        return prefix + text, json.loads(text)
    except ValueError as exc:
        raise ArtifactError(str(path), f"safetensors header is not JSON ({exc})") from exc


def read_shard(path: Path) -> tuple[ShardHeader, list[TensorEntry]]:
    """Parse one safetensors file's header and check that the tensors tile its data exactly."""
    raw, header = _parse_header(path)
    base, size = len(raw), path.stat().st_size
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise ArtifactError(str(path), f"tensor '{name}' has unsupported dtype {info['dtype']}")
        entries.append(TensorEntry(name, path.name, info["dtype"], tuple(info["shape"]), base + begin, base + end))
    entries.sort(key=lambda e: e.begin)
    position = base
    for e in entries:
        expected = DTYPES[e.dtype].itemsize * _numel(e.shape)
        if e.begin != position or e.nbytes != expected:
            raise ArtifactError(str(path), f"tensor '{e.name}' does not tile the data region (corrupt header)")
        position = e.end
    if position != size:
        raise ArtifactError(str(path), f"file has {size} bytes, its header describes {position}")
    return ShardHeader(path.name, raw, size), entries


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class CheckpointLayout:
    """Every tensor of a checkpoint directory by its saved name, with its shard and byte range.

    Attributes:
        root: the directory.
        tensors: saved name -> :class:`TensorEntry`.
        shards: file name -> :class:`ShardHeader`.
        index: the raw ``model.safetensors.index.json`` bytes, or None for a single file.
    """

    root: Path
    tensors: dict[str, TensorEntry]
    shards: dict[str, ShardHeader]
    index: bytes | None

    @classmethod
    def read(cls, root: str | os.PathLike[str]) -> CheckpointLayout:
        """Read the headers of ``root``'s safetensors shards (no tensor data).

        Raises:
            ArtifactError: no weights, a malformed index, a corrupt header, or a tensor the index
                places in a file that does not hold it.
        """
        root = Path(root)
        index_path = root / INDEX_FILE
        index = index_path.read_bytes() if index_path.is_file() else None
        if index is not None:
            try:
                weight_map = json.loads(index)["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ArtifactError(str(index_path), f"malformed checkpoint index ({exc})") from exc
            files = sorted(set(weight_map.values()))
        elif (root / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise ArtifactError(str(root), f"no {SINGLE_FILE} or {INDEX_FILE}")
        tensors: dict[str, TensorEntry] = {}
        shards: dict[str, ShardHeader] = {}
        for file in files:
            shard, entries = read_shard(root / file)
            shards[file] = shard
            tensors.update((e.name, e) for e in entries)
        if weight_map is not None:
            wrong = [n for n, f in weight_map.items() if n not in tensors or tensors[n].file != f]
            if wrong:
                raise ArtifactError(str(index_path), f"the index places {wrong[:3]} in files that do not hold them")
        return cls(root, tensors, shards, index)

    def fingerprint(self) -> str:
        """sha256 over the headers and the index: identifies names, dtypes, shapes and sharding."""
        digest = hashlib.sha256(self.index or b"")
        for file in sorted(self.shards):
            digest.update(file.encode() + b"\0" + self.shards[file].raw)
        return digest.hexdigest()


def plan_layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], *, max_shard_bytes: int,
                metadata: dict[str, str] | None = None) -> tuple[list[ShardHeader], dict[str, TensorEntry], bytes | None]:
    """Shard files for tensors of known dtype/shape, in order, as ``save_pretrained`` splits them.

    A new shard starts when the next tensor would push the current one past ``max_shard_bytes``
    (a tensor larger than that gets a shard of its own). Returns the shard headers, the entries
    and the index bytes (None for a single file).
    """
    if max_shard_bytes < 1:
        raise ConfigError("max_shard_bytes", f"must be positive, got {max_shard_bytes}")
    groups: list[list[str]] = [[]]
    current = 0
    for name, (dtype, shape) in specs.items():
        size = dtype.itemsize * _numel(shape)
        if groups[-1] and current + size > max_shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append(name)
        current += size
    count = len(groups)
    files = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    shards, entries = [], {}
    for file, names in zip(files, groups, strict=True):
        shard, placed = _build_shard(file, [(n, *specs[n]) for n in names], dict(metadata or {"format": "pt"}))
        shards.append(shard)
        entries.update(placed)
    if count == 1:
        return shards, entries, None
    total = sum(e.nbytes for e in entries.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: e.file for n, e in entries.items()}}
    return shards, entries, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def _build_shard(file: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None) -> tuple[ShardHeader, dict[str, TensorEntry]]:
    """The header of a shard holding ``(name, dtype, shape)`` tensors back to back, in order, and their entries."""
    header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        size = dtype.itemsize * _numel(shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data region starts 8-byte aligned, as safetensors writes it
    raw = struct.pack("<Q", len(text)) + text
    entries = {}
    for name, dtype, shape in tensors:
        begin, end = header[name]["data_offsets"]  # type: ignore[index]
        entries[name] = TensorEntry(name, file, DTYPE_NAMES[dtype], tuple(shape), len(raw) + begin, len(raw) + end)
    return ShardHeader(file, raw, len(raw) + offset), entries


def recast_layout(layout: CheckpointLayout, dtypes: Mapping[str, torch.dtype]) -> CheckpointLayout:
    """``layout`` with the tensors of ``dtypes`` (saved name -> dtype; the others keep theirs) in
    new dtypes: the same files, names, order, shapes and shard metadata, with new offsets, file
    sizes and index ``total_size`` (the layout of a checkpoint cast to another dtype)."""
    tensors: dict[str, TensorEntry] = {}
    shards: dict[str, ShardHeader] = {}
    for file, old in layout.shards.items():
        metadata = json.loads(old.raw[8:]).get("__metadata__")
        entries = sorted((e for e in layout.tensors.values() if e.file == file), key=lambda e: e.begin)
        specs = [(e.name, dtypes.get(e.name, e.torch_dtype), e.shape) for e in entries]
        shards[file], placed = _build_shard(file, specs, metadata)
        tensors.update(placed)
    index = None
    if layout.index is not None:
        data = json.loads(layout.index)
        data.setdefault("metadata", {})["total_size"] = sum(e.nbytes for e in tensors.values())
        index = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    return CheckpointLayout(layout.root, tensors, shards, index)


def create_shard(path: Path, shard: ShardHeader) -> None:
    """Create ``path`` holding ``shard``'s header, sized to the whole file (data zero-filled, sparse)."""
    with open(path, "wb") as f:
        f.write(shard.raw)
        f.truncate(shard.size)


def tensor_bytes(entry: TensorEntry, tensor: torch.Tensor) -> memoryview:
    """``tensor`` as ``entry``'s raw little-endian bytes, cast to the entry's dtype.

    Raises:
        ArtifactError: the shape differs from the entry's.
    """
    if tuple(tensor.shape) != entry.shape:
        raise ArtifactError(entry.name, f"shape {list(tensor.shape)} differs from the checkpoint's {list(entry.shape)}")
    assert sys.byteorder == "little", "safetensors stores little-endian bytes"
    data = tensor.detach().to(device="cpu", dtype=entry.torch_dtype).contiguous()
    return memoryview(data.reshape(-1).view(torch.uint8).numpy())


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def copy_range(src_fd: int, dst_fd: int, begin: int, end: int, dst_begin: int | None = None) -> None:
    """Copy bytes ``[begin, end)`` of one file to another at ``dst_begin`` (default: the same
    offsets), in bounded chunks."""
    shift = 0 if dst_begin is None else dst_begin - begin
    position = begin
    while position < end:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, end - position), position)
        if not chunk:
            raise ArtifactError(str(src_fd), f"unexpected end of file at byte {position}")
        pwrite_all(dst_fd, memoryview(chunk), position + shift)
        position += len(chunk)


__all__ = [
    "DTYPES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointLayout",
    "ShardHeader",
    "TensorEntry",
    "copy_range",
    "create_shard",
    "plan_layout",
    "pwrite_all",
    "read_shard",
    "recast_layout",
    "tensor_bytes",
]
