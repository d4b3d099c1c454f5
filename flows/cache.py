"""Content hashes and a small JSON result cache, both under the cache root
(:func:`pruning_core.lm.default_cache_root`: ``$PRUNING_CACHE`` or ``~/.cache/pruning-pipeline``).

- :func:`file_sha256` hashes a file's bytes once: the digest is memoized under
  ``file-sha256/`` keyed by the file's (real path, size, mtime_ns, inode), so a model directory
  that did not change is not read again, and any rewrite (new size, mtime or inode) is.
- :func:`tree_sha256` is a model directory's content hash, from its files' contents (never from a
  manifest, which may be stale).
- :class:`ResultCache` stores small JSON results (e.g. a dense model's perplexity) by key under
  ``results/<namespace>/``; entries are written atomically and an unreadable one is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pruning_core.io.atomic import atomic_write_text, is_temporary, sha256_file
from pruning_core.io.manifest import MANIFEST_NAME
from pruning_core.lm import default_cache_root

log = logging.getLogger(__name__)
_HEX = frozenset("0123456789abcdef")


def digest(data: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able mapping, keys sorted (a cache key)."""
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str | os.PathLike[str], *, root: Path | None = None) -> str:
    """sha256 of a file's bytes, memoized by (real path, size, mtime_ns, inode) under ``root``
    (default: the cache root)."""
    real = Path(path).resolve()
    st = real.stat()
    key = digest({"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino})
    memo = (root or default_cache_root()) / "file-sha256" / f"{key}.txt"
    try:
        known = memo.read_text().strip()
        if len(known) == 64 and set(known) <= _HEX:
            return known
    except OSError:
        pass
    value = sha256_file(real)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, value)
    except OSError as exc:  # a read-only cache only costs the memo
        log.debug("cannot memoize the sha256 of %s: %s", real, exc)
    return value


def tree_sha256(directory: str | os.PathLike[str], *, root: Path | None = None) -> str:
    """Content hash of a directory: sha256 over its sorted ``"<relative path> <file sha256>"`` lines.

    Every regular file counts except the bookkeeping ``manifest.json`` and temporaries of atomic
    writes; symlinks are followed (a Hugging Face cache snapshot is made of them).
    """
    base = Path(directory)
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                   and not any(is_temporary(part) for part in p.relative_to(base).parts))
    lines = [f"{p.relative_to(base).as_posix()} {file_sha256(p, root=root)}\n" for p in files]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


class ResultCache:
    """Small JSON results by key, under ``<cache root>/results/<namespace>/<key>.json``."""

    def __init__(self, namespace: str, *, root: Path | None = None) -> None:
        self.folder = (root or default_cache_root()) / "results" / namespace

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``; None if there is none or it cannot be read (corrupt)."""
        try:
            data = json.loads(self._file(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable cache entry %s (%s)", self._file(key), exc)
            return None
        return data if isinstance(data, dict) else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store ``value`` under ``key`` atomically (a failure to write is logged, not raised)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._file(key), json.dumps(dict(value), indent=1, sort_keys=True))
        except OSError as exc:
            log.warning("cannot write the cache entry %s: %s", self._file(key), exc)


__all__ = ["ResultCache", "digest", "file_sha256", "tree_sha256"]
