"""Atomic artifact writes and checksums.

Stage: io. An artifact is written under a temporary name in its target directory, flushed to
disk, and renamed over the final name, so a crash never leaves a half-written file that looks
complete. Checksums (sha256) let a manifest verify artifacts on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pruning_core.errors import ArtifactError

_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``.

    On error the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes; :class:`ArtifactError` if it is missing."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(str(p), "file does not exist")
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safe_child(root: str | os.PathLike[str], name: str) -> Path:
    """Return ``root / name``, refusing names that would escape ``root`` (``..``, absolute paths)."""
    base = Path(root).resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise ArtifactError(name, f"artifact name escapes its directory {base}")
    return target


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "safe_child", "sha256_file"]
