"""Named tensors on disk as safetensors: atomic writes, selective reads, finiteness checks.

Stage: io. safetensors stores raw little-endian buffers plus a JSON header, so loading never
unpickles anything and :func:`load_tensors` can read only the tensors it is asked for
(``safe_open`` maps the file and copies just those byte ranges). Every floating-point tensor is
checked for NaN/Inf on save and on load, so a diverged statistic or weight is reported at the
boundary with its name and index instead of poisoning a later stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pruning_core.errors import ArtifactError, ConfigError
from pruning_core.io.atomic import atomic_path
from pruning_core.validate import check_finite

PathLike = str | os.PathLike[str]


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(
            "metadata", f"safetensors metadata keys and values must be str; bad keys: {bad[:5]}"
        )
    return dict(metadata)


def _check_tensors(tensors: Mapping[str, torch.Tensor], *, method: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError("tensors", f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError("tensors", f"'{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        check_finite(tensor, method=method, what=f"tensor '{name}'")
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_tensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to a safetensors file atomically and return its path.

    Args:
        path: The target file; it is replaced in one rename, never left half-written.
        tensors: Name -> tensor (any shape, dtype and device; stored from CPU, contiguous).
            Tensors must not share memory (safetensors refuses views of one buffer).
        metadata: Optional ``str -> str`` header entries (e.g. model identity, config hash).

    Raises:
        NumericalInstability: a floating-point tensor holds NaN/Inf (names tensor and index);
            nothing is written.
        ConfigError: a name is empty, a value is not a tensor, or metadata is not ``str -> str``.
    """
    meta = _check_metadata(metadata)
    cpu = _check_tensors(tensors, method="save_tensors")
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=meta)
        if meta:
            _sort_metadata(tmp)
    return Path(path)


def _sort_metadata(file: Path) -> None:
    """Rewrite the header's ``__metadata__`` in sorted key order, in place.

    safetensors writes metadata from a Rust ``HashMap``: the key order (and so the file's bytes
    and checksum) changes from one write to the next. Only the order changes, so the header keeps
    its length and every data offset stays valid.
    """
    with open(file, "rb+") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:  # always, unless the writer escaped characters differently
            f.seek(8)
            f.write(text.ljust(size, b" "))


def _open(path: PathLike):
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(str(p), "file does not exist")
    try:
        return safe_open(str(p), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(str(p), f"not a readable safetensors file ({exc})") from exc


def check_safetensors(path: PathLike) -> list[str]:
    """Validate a safetensors file's header without reading tensor data; return its tensor names.

    safetensors checks that the header is well-formed JSON and that the tensors' byte ranges
    cover the file exactly, so a truncated, padded or garbage file fails here in milliseconds.

    Raises:
        ArtifactError: the file is missing or its header is invalid (names the file).
    """
    with _open(path) as f:
        return sorted(f.keys())


def read_metadata(path: PathLike) -> dict[str, str]:
    """The ``str -> str`` metadata header of a safetensors file (empty dict if none)."""
    with _open(path) as f:
        return dict(f.metadata() or {})


def load_tensors(
    path: PathLike, names: Iterable[str] | None = None, *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file; only ``names`` are read when given.

    Args:
        path: A file written by :func:`save_tensors` (or any safetensors file).
        names: The tensors to read; None reads all of them.
        device: Where the returned tensors live.

    Returns:
        Name -> tensor, in the order of ``names`` (sorted names when ``names`` is None).

    Raises:
        ArtifactError: the file is missing, truncated or not safetensors, or a requested name
            is absent (the message lists what is there).
        NumericalInstability: a floating-point tensor holds NaN/Inf (names tensor and index).
    """
    p = Path(path)
    with _open(p) as f:
        available = set(f.keys())
        wanted = sorted(available) if names is None else list(names)
        missing = [n for n in wanted if n not in available]
        if missing:
            shown = ", ".join(sorted(available)[:5]) + (" ..." if len(available) > 5 else "")
            raise ArtifactError(str(p), f"no tensors named {missing[:5]}; it holds {len(available)}: {shown}")
        out: dict[str, torch.Tensor] = {}
        for name in wanted:
            try:
                tensor = f.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as exc:
                raise ArtifactError(str(p), f"cannot read tensor '{name}' ({exc})") from exc
            check_finite(tensor, method="load_tensors", what=f"tensor '{name}' of {p}")
            out[name] = tensor.to(device)
    return out


__all__ = ["check_safetensors", "load_tensors", "read_metadata", "save_tensors"]
