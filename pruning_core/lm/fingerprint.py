"""Content fingerprints of model directories, memoized per file in the cache root.

Stage: inputs. A fingerprint identifies a model by its bytes (artifact metadata, the dense
perplexity cache), so it must never come from a manifest that may be stale: a pruned output
that was modified afterwards keeps its old ``manifest.json`` but gets a new fingerprint.

The fingerprint is the tree hash of :func:`pruning_core.io.manifest.checksum` over every file of
the directory except a top-level ``manifest.json`` (sha256 of the sorted ``"<file> <sha256>\\n"``
lines), so it equals the previous, manifest-based value for an intact directory. Hashing a 14 GB
checkpoint takes about a minute, so each file's sha256 is remembered in
``<cache root>/file-sha256.json`` under its absolute path and reused while the file's size,
``mtime_ns``, ``ctime_ns`` and inode are unchanged (any write, rename onto it or ``touch``
changes one of them; ``ctime`` cannot be set back by a user). The memo is a cache only: it is
written atomically, and when it is unreadable or unwritable every file is simply hashed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pruning_core.errors import ArtifactError
from pruning_core.io.atomic import atomic_path, sha256_file
from pruning_core.io.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

MEMO_NAME = "file-sha256.json"


class FileHashMemo:
    """sha256 of files by absolute path, valid while ``(size, mtime_ns, ctime_ns, inode)`` holds."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.entries: dict[str, list[int | str]] = self._load()
        self.dirty = False
        self.hashed = 0  # files actually read (for tests and logs)

    def _load(self) -> dict[str, list[int | str]]:
        if self.file is None or not self.file.is_file():
            return {}
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            logger.debug("ignoring unreadable hash memo %s (%s)", self.file, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the memo when its identity is unchanged."""
        st = path.stat()
        key, identity = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = self.entries.get(key)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == identity and isinstance(entry[4], str):
            return entry[4]
        digest = sha256_file(path)
        self.hashed += 1
        self.entries[key] = [*identity, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        """Write the memo atomically, merged with what other processes wrote meanwhile."""
        if self.file is None or not self.dirty:
            return
        try:
            merged = {**FileHashMemo(self.file).entries, **self.entries}
            with atomic_path(self.file) as tmp:
                tmp.write_text(json.dumps(merged, sort_keys=True), encoding="utf-8")
        except OSError as exc:
            logger.debug("hash memo %s not written (%s)", self.file, exc)


def _memo_file(cache_dir: str | os.PathLike[str] | None) -> Path:
    from pruning_core.lm.smollm2 import default_cache_root

    return default_cache_root(cache_dir) / MEMO_NAME


def model_fingerprint(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                      memo: bool = True) -> str:
    """A sha256 identifying a model directory's contents (every file but a top-level ``manifest.json``).

    Args:
        path: the model directory.
        cache_dir: cache root of the per-file memo (default ``$PRUNING_CACHE`` or
            ``~/.cache/pruning-pipeline``).
        memo: False hashes every file and leaves the memo alone.

    Raises:
        ArtifactError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(str(root), "model directory does not exist")
    hashes = FileHashMemo(_memo_file(cache_dir) if memo else None)
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.relative_to(root).as_posix() != MANIFEST_NAME)
    lines = [f"{f.relative_to(root).as_posix()} {hashes.sha256(f)}\n" for f in files]
    hashes.save()
    logger.debug("fingerprint of %s: %d files, %d hashed", root, len(files), hashes.hashed)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


__all__ = ["MEMO_NAME", "FileHashMemo", "model_fingerprint"]
