"""Atomic artifact writes and checksums.

Stage: io. An artifact is written under a temporary name in its target directory, flushed to
disk, and renamed over the final name, so a crash never leaves a half-written file that looks
complete. Directories (a saved model) are built the same way: in a temporary sibling directory
that is renamed into place at the end. Checksums (sha256) let a manifest verify artifacts on load.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pruning_core.errors import ArtifactError

_CHUNK = 1 << 20
# errors about the disk, not the data: errno -> what the user must do
_DISK_ERRORS = {errno.ENOSPC: "free space", errno.EDQUOT: "raise the quota or free space",
                errno.EFBIG: "raise the file size limit (ulimit -f)", errno.EROFS: "use a writable directory",
                errno.EACCES: "fix the permissions or use another directory",
                errno.EPERM: "fix the permissions or use another directory"}
# libraries that wrap the OS error in their own type (safetensors, torch) keep its text
_DISK_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                  "File too large": errno.EFBIG, "Read-only file system": errno.EROFS}


def _disk_errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
        return exc.errno
    text = str(exc)
    return next((code for message, code in _DISK_MESSAGES.items() if message in text), None)


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an error about the disk (full, quota, file size limit, read-only, permissions) raised
    while writing ``path`` into an :class:`ArtifactError` naming the path and the remedy.

    Nothing half-written is ever recorded, so a run stopped this way resumes once the disk is fixed.
    """
    try:
        yield
    except ArtifactError:
        raise
    except Exception as exc:
        code = _disk_errno(exc)
        elsewhere = isinstance(exc, OSError) and exc.filename and Path(path).parent not in Path(exc.filename).parents
        if code is None or elsewhere:  # not about the disk, or about another file than this one's
            raise
        raise ArtifactError(str(path), f"{os.strerror(code)} (errno {code}) while writing it: "
                            f"{_DISK_ERRORS[code]}, then run again (finished work is kept and resumes)") from exc


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``.

    On error the temporary file is removed and ``path`` is left as it was. The final file gets
    the usual ``0o666 & ~umask`` permissions (``mkstemp`` alone would leave it private, 0o600).
    """
    final = Path(path)
    with disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On error the temporary directory is deleted and ``path`` is left as it was. If ``path``
    already exists it is moved aside first and deleted after the new directory is in place,
    so a reader sees either the old complete directory or the new one, never a partial one
    (between the two renames the path briefly does not exist).
    """
    final = Path(path)
    with disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            yield tmp
            install_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def install_dir(staging: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Fsync the finished directory ``staging`` and rename it to ``path`` (a sibling), replacing
    any existing ``path`` as :func:`atomic_dir` does (moved aside first, deleted afterwards)."""
    tmp, final = Path(staging), Path(path)
    _fsync_tree(tmp)
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``directory`` while in the context.

    Serializes writers across threads and processes on one machine (and on NFS with lock
    support) without leaving a lock file behind; the lock is released when the process dies.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_temporary(name: str) -> bool:
    """True for the names :func:`atomic_path` and :func:`atomic_dir` give their temporaries:
    ``.<final name>.<random>.tmp`` (being written) and ``.<final name>.<random>.old`` (replaced)."""
    return name.startswith(".") and name.endswith((".tmp", ".old")) and name.count(".") >= 3


def sweep_temporaries(root: str | os.PathLike[str], *, skip: Callable[[Path], bool] | None = None) -> list[Path]:
    """Delete the temporaries that killed atomic writes left under ``root``; returns what was deleted.

    Only call it when no writer can be active under ``root`` (e.g. under the run directory's claim
    lock with no other run holding it): a live writer's temporary would be deleted too. Nothing
    reads temporaries (a writer renames its own or deletes it on error), so a stale one is garbage.
    Subdirectories for which ``skip`` returns True are not entered; symlinks are never followed.
    """
    removed: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in [d for d in dirs if is_temporary(d)]:
            dirs.remove(name)
            path = here / name
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if not (skip is not None and skip(here / d))]
        for name in files:
            if is_temporary(name):
                (here / name).unlink(missing_ok=True)
                removed.append(here / name)
    return removed


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
    """Return ``root / name``, refusing names that would escape ``root`` (``..``, absolute paths)
    or that name ``root`` itself (``""``, ``"."``)."""
    base = Path(root).resolve()
    target = (base / name).resolve()
    if base not in target.parents:
        raise ArtifactError(name, f"artifact name must name a path inside its directory {base}")
    return target


__all__ = [
    "atomic_dir",
    "disk_errors",
    "directory_lock",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "install_dir",
    "is_temporary",
    "safe_child",
    "sha256_file",
    "sweep_temporaries",
]
