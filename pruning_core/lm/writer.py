"""Write a pruned model directory block by block: same names, shards, index and dtype as the input.

Stage: outputs. :class:`CheckpointWriter` builds the output in a staging directory beside the
final one (``.<name>.partial``). At the start every input shard is recreated there with the
input's own header and size (pruning changes no name, dtype or shape, so the tensor offsets are
the input's), and the small files (config, generation config, tokenizer) are copied. Each
finished block is written straight to its byte ranges with ``os.pwrite`` (memory: one block),
fsynced, and then recorded in an append-only journal, so a crash after block ``k`` resumes with
blocks ``0..k`` done. :meth:`CheckpointWriter.finish` copies the bytes of every tensor nobody
rewrote (embeddings, head, untouched blocks) from the input, writes ``manifest.json``
(:mod:`pruning_core.io.manifest`) and renames the directory into place
(:func:`pruning_core.io.atomic.install_dir`). A dense re-save is byte-identical to the input's
shards and has its size on disk.

With ``dtype`` the output is the input cast to that dtype (``from_pretrained(dtype=...)``'s rule,
:meth:`CheckpointReader.saved_dtypes`): the same shard files, names and shapes with new headers
and offsets (:func:`pruning_core.lm.shards.recast_layout`), every tensor nobody rewrote cast one
at a time, and ``config.json``'s ``dtype`` saying so; :func:`cast_checkpoint` is that alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pruning_core.errors import ArtifactError
from pruning_core.io.atomic import atomic_write_text, disk_errors, install_dir
from pruning_core.io.manifest import MANIFEST_NAME, Manifest
from pruning_core.lm.checkpoint import CheckpointReader
from pruning_core.lm.shards import (
    INDEX_FILE,
    CheckpointLayout,
    TensorEntry,
    copy_range,
    create_shard,
    pwrite_all,
    recast_layout,
    tensor_bytes,
)
from pruning_core.validate import check_finite

logger = logging.getLogger(__name__)

JOURNAL = "stream-journal.jsonl"
PLAN = "stream-plan.json"
_VERSION = 1


def staging_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where :class:`CheckpointWriter` builds ``out_dir`` (kept across crashes for resuming)."""
    final = Path(out_dir)
    return final.parent / f".{final.name}.partial"


class CheckpointWriter:
    """The output model directory of a block-by-block job (see the module docstring).

    Args:
        source: the input checkpoint.
        out_dir: the final directory; replaced atomically by :meth:`finish`.
        key: identifies the job (e.g. a config hash). A staging directory left by a crashed run
            is resumed only if it was made from the same input layout and the same key;
            otherwise it is discarded and the output starts afresh.
        dtype: write the output in this dtype (floating tensors, as ``from_pretrained(dtype=...)``
            builds the model; ``config.json`` updated); default: each tensor in the input's dtype.

    Example:
        >>> with CheckpointWriter(reader, run_dir / "model", key=config_hash) as writer:
        ...     for i in range(reader.num_blocks):
        ...         if i not in writer.done_blocks:
        ...             writer.write_block(i, prune(reader.load_block(i)))
        ...     writer.finish()
    """

    def __init__(self, source: CheckpointReader, out_dir: str | os.PathLike[str], *, key: str = "",
                 dtype: torch.dtype | None = None) -> None:
        source.check_writable()
        self.source = source
        self.final = Path(out_dir)
        self.staging = staging_dir(out_dir)
        self.layout, self.dtype = _output_layout(source, dtype)
        self._plan = {"version": _VERSION, "source": source.layout.fingerprint(), "key": key}
        if self.dtype is not None:
            self._plan["dtype"] = str(self.dtype)
        self._fds: dict[str, int] = {}
        self._staged: CheckpointReader | None = None
        self._entries = self._resume() if self._resumable() else self._start()
        if self._entries:
            logger.info("resuming %s: %d blocks already written", self.staging, len(self.done_blocks))

    # ------------------------------------------------------------------ staging and journal
    def _resumable(self) -> bool:
        try:
            return json.loads((self.staging / PLAN).read_text()) == self._plan
        except (OSError, ValueError):
            return False

    def _start(self) -> list[dict[str, Any]]:
        shutil.rmtree(self.staging, ignore_errors=True)
        with disk_errors(self.staging):
            self.staging.mkdir(parents=True)
            for shard in self.layout.shards.values():
                create_shard(self.staging / shard.file, shard)
            if self.layout.index is not None:
                (self.staging / INDEX_FILE).write_bytes(self.layout.index)
            for f in _side_files(self.source.root):
                shutil.copy2(f, self.staging / f.name)
            if self.dtype is not None:
                _set_config_dtype(self.staging / "config.json", self.dtype)
            (self.staging / JOURNAL).touch()
        atomic_write_text(self.staging / PLAN, json.dumps(self._plan) + "\n")  # last: marks staging valid
        return []

    def _resume(self) -> list[dict[str, Any]]:
        lines = (self.staging / JOURNAL).read_text().splitlines()
        entries = []
        for n, line in enumerate(lines):
            try:
                entries.append(json.loads(line))
            except ValueError:
                if n == len(lines) - 1:  # a torn last append: that block was never recorded
                    break
                logger.warning("%s: corrupt journal line %d; starting the output afresh", self.staging, n + 1)
                return self._start()
        return entries

    @property
    def done_blocks(self) -> list[int]:
        """Blocks whose tensors are durably written, in order."""
        return sorted(e["block"] for e in self._entries if e.get("block") is not None)

    def records(self) -> dict[int, Any]:
        """The ``record`` stored with each written block (e.g. its per-layer report), by block."""
        return {e["block"]: e.get("record") for e in self._entries if e.get("block") is not None}

    def _written(self) -> set[str]:
        return {name for e in self._entries for name in e["tensors"]}

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.staging / file, os.O_RDWR)
        return self._fds[file]

    # ------------------------------------------------------------------ writing
    def write_tensors(self, tensors: Mapping[str, torch.Tensor], *, block: int | None = None,
                      record: Any = None) -> None:
        """Write tensors by their saved names, fsync, then journal them (with ``record``, JSON-able).

        Each tensor is cast to the dtype the output stores it in (the input's, or ``dtype``'s).

        Raises:
            ArtifactError: an unknown name or a shape that differs from the input's.
            NumericalInstability: a tensor is NaN/Inf (also after the cast); nothing is journaled.
        """
        entries = self.layout.tensors
        unknown = [n for n in tensors if n not in entries]
        if unknown:
            raise ArtifactError(str(self.source.root), f"the checkpoint has no tensors {unknown[:3]}")
        touched = set()
        with disk_errors(self.staging):  # a full disk names the directory; the journal keeps what is done
            for name, tensor in tensors.items():
                entry = entries[name]
                stored = tensor.detach().to(entry.torch_dtype)
                check_finite(stored, method="CheckpointWriter", what=f"tensor '{name}' as {entry.dtype}")
                pwrite_all(self._fd(entry.file), tensor_bytes(entry, stored), entry.begin)
                touched.add(entry.file)
            for file in touched:
                os.fsync(self._fd(file))
            line = {"block": block, "tensors": sorted(tensors), "record": record}
            with open(self.staging / JOURNAL, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._entries.append(line)

    def write_block(self, index: int, block: nn.Module, *, record: Any = None) -> None:
        """Write decoder block ``index`` (any dtype/device) under its saved names; see :meth:`write_tensors`."""
        self.write_tensors(self.source.to_checkpoint(index, block), block=index, record=record)
        logger.debug("wrote block %d to %s", index, self.staging)

    def load_block(self, index: int, *, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> nn.Module:
        """Block ``index`` as written so far (for recomputing later blocks' inputs on resume)."""
        if index not in self.done_blocks:
            raise ArtifactError(str(self.staging), f"block {index} has not been written yet")
        if self._staged is None:
            self._staged = CheckpointReader(self.staging)
        return self._staged.load_block(index, dtype=dtype, device=device)

    def finish(self, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Copy every tensor not rewritten from the input, add ``manifest.json`` (and
        ``pruning_info.json`` from ``extra``), and rename the directory into place; returns it."""
        written = self._written()
        with disk_errors(self.staging):
            for name, entry in self.source.layout.tensors.items():
                if name not in written:
                    self._copy(entry, self.layout.tensors[name])
        self.close()
        (self.staging / JOURNAL).unlink()
        (self.staging / PLAN).unlink()
        if extra is not None:
            (self.staging / "pruning_info.json").write_text(json.dumps(dict(extra), indent=2, sort_keys=True) + "\n")
        manifest = Manifest(self.staging)
        for f in sorted(p for p in self.staging.iterdir() if p.is_file() and p.name != MANIFEST_NAME):
            manifest.record(f.name, f, kind="model-file")
        install_dir(self.staging, self.final)
        logger.info("wrote %s (%d tensors rewritten, %d copied)", self.final, len(written),
                    len(self.source.layout.tensors) - len(written))
        return self.final

    def _copy(self, entry: TensorEntry, out: TensorEntry) -> None:
        """Input tensor ``entry`` into its output place ``out``: its bytes, or cast to ``out``'s dtype."""
        if entry.dtype == out.dtype:
            with open(self.source.root / entry.file, "rb") as src:
                copy_range(src.fileno(), self._fd(out.file), entry.begin, entry.end, out.begin)
            return
        with safe_open(str(self.source.root / entry.file), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(entry.name).to(out.torch_dtype)
        check_finite(tensor, method="CheckpointWriter", what=f"tensor '{entry.name}' as {out.dtype}")
        pwrite_all(self._fd(out.file), tensor_bytes(out, tensor), out.begin)

    def close(self) -> None:
        """Close the shard files (the staging directory stays, resumable)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _output_layout(source: CheckpointReader, dtype: torch.dtype | None
                   ) -> tuple[CheckpointLayout, torch.dtype | None]:
    """The output's layout, and ``dtype`` if it changes any tensor (else None: the input's layout)."""
    if dtype is None:
        return source.layout, None
    dtypes = source.saved_dtypes(dtype)
    if all(dtypes[n] == e.torch_dtype for n, e in source.layout.tensors.items()):
        return source.layout, None
    return recast_layout(source.layout, dtypes), dtype


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """Make ``config.json`` state ``dtype`` (``dtype``, and ``torch_dtype`` where an older config has it)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    data["dtype"] = name
    if "torch_dtype" in data:
        data["torch_dtype"] = name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def cast_checkpoint(source: str | os.PathLike[str] | CheckpointReader, out_dir: str | os.PathLike[str],
                    dtype: torch.dtype, *, key: str = "") -> Path:
    """Write ``source`` cast to ``dtype`` into ``out_dir`` (atomically, one tensor in memory at a
    time, resumable like any :class:`CheckpointWriter` output); returns ``out_dir``.

    Raises:
        NumericalInstability: a tensor overflows the new dtype (e.g. float32 weights beyond
            float16's range), naming it.
    """
    reader = source if isinstance(source, CheckpointReader) else CheckpointReader(source)
    with CheckpointWriter(reader, out_dir, key=key, dtype=dtype) as writer:
        return writer.finish()


def _side_files(root: Path) -> list[Path]:
    """The input's files other than weights and manifest: config, generation config, tokenizer, ..."""
    return sorted(p for p in root.iterdir() if p.is_file() and not p.name.endswith(".safetensors")
                  and p.name not in {INDEX_FILE, MANIFEST_NAME, JOURNAL, PLAN})


__all__ = ["JOURNAL", "PLAN", "CheckpointWriter", "cast_checkpoint", "staging_dir"]
