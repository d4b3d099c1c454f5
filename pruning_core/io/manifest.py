"""A checksummed record of the artifacts of one run directory.

Stage: io. ``manifest.json`` maps an artifact name to ``{path, sha256, bytes, kind}``, with
``path`` relative to the run directory. An artifact is recorded only after it has been written
completely (atomically), so on a resumed run "recorded and its checksum still matches" means
"done", and anything else is recomputed. Directories (a saved model) are recorded with a tree
hash: the sha256 of the sorted lines ``"<relative path> <file sha256>"`` of the files inside.

Writes are atomic and serialized with an advisory lock on the run directory itself
(``fcntl.flock``, see :func:`pruning_core.io.atomic.directory_lock`): each
:meth:`Manifest.record` re-reads the file under the lock and merges its entry, so threads and
processes recording into one run directory lose no entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from pruning_core.errors import ArtifactError
from pruning_core.io.atomic import atomic_write_text, directory_lock, safe_child, sha256_file

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class ArtifactEntry:
    """One artifact: ``path`` relative to the run directory, its sha256, size and kind."""

    path: str
    sha256: str
    bytes: int
    kind: str


def checksum(path: str | os.PathLike[str]) -> tuple[str, int]:
    """``(sha256, bytes)`` of a file, or the tree hash and total size of a directory."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p), p.stat().st_size
    if not p.is_dir():
        raise ArtifactError(str(p), "does not exist")
    files = sorted(f for f in p.rglob("*") if f.is_file())
    lines = [f"{f.relative_to(p).as_posix()} {sha256_file(f)}\n" for f in files]
    digest = hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
    return digest, sum(f.stat().st_size for f in files)


class Manifest:
    """The artifacts of the run directory ``root``, backed by ``root/manifest.json``.

    Example:
        >>> m = Manifest(run_dir)
        >>> if not m.is_complete("masks"):
        ...     save_masks(paths.masks(run_dir), masks)
        ...     m.record("masks", paths.masks(run_dir), kind="masks")
    """

    def __init__(self, root: str | os.PathLike[str], *, name: str = MANIFEST_NAME) -> None:
        self.root = Path(root)
        self.file = safe_child(self.root, name)

    def entries(self) -> dict[str, ArtifactEntry]:
        """Name -> entry, as currently on disk (empty if no manifest was written yet)."""
        if not self.file.exists():
            return {}
        try:
            raw = json.loads(self.file.read_text(encoding="utf-8"))
            return {name: ArtifactEntry(**e) for name, e in raw["artifacts"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(str(self.file), f"malformed manifest ({exc})") from exc

    def __contains__(self, name: object) -> bool:
        return name in self.entries()

    def path(self, name: str) -> Path:
        """Absolute path of a recorded artifact."""
        return safe_child(self.root, self._entry(name).path)

    def _entry(self, name: str) -> ArtifactEntry:
        entries = self.entries()
        if name not in entries:
            raise ArtifactError(str(self.file), f"no artifact named '{name}' (recorded: {sorted(entries)})")
        return entries[name]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with directory_lock(self.root):
            yield

    def record(self, name: str, path: str | os.PathLike[str], *, kind: str = "file") -> ArtifactEntry:
        """Checksum the finished artifact at ``path`` (inside ``root``) and record it as ``name``.

        Raises:
            ArtifactError: ``name`` is empty, ``path`` is outside ``root`` or does not exist.
        """
        if not name or not isinstance(name, str):
            raise ArtifactError(str(self.file), f"artifact names must be non-empty strings, got {name!r}")
        root = self.root.resolve()
        full = (root / path).resolve()  # an absolute ``path`` replaces ``root`` here
        if root not in full.parents:
            raise ArtifactError(str(path), f"artifact '{name}' is not inside the run directory {root}")
        digest, size = checksum(full)
        entry = ArtifactEntry(path=full.relative_to(root).as_posix(), sha256=digest, bytes=size, kind=kind)
        with self._locked():
            entries = self.entries()
            entries[name] = entry
            payload = {"version": _VERSION, "artifacts": {n: asdict(e) for n, e in sorted(entries.items())}}
            atomic_write_text(self.file, json.dumps(payload, indent=2) + "\n")
        return entry

    def _problem(self, name: str, entry: ArtifactEntry, *, checksums: bool = True) -> str | None:
        full = safe_child(self.root, entry.path)
        if not full.exists():
            return f"artifact '{name}' is missing: {full}"
        if not checksums:
            size = (
                full.stat().st_size
                if full.is_file()
                else sum(f.stat().st_size for f in full.rglob("*") if f.is_file())
            )
            digest = entry.sha256
        else:
            digest, size = checksum(full)
        if size != entry.bytes:
            return f"artifact '{name}' at {full} has {size} bytes, the manifest recorded {entry.bytes}"
        if digest != entry.sha256:
            return f"artifact '{name}' at {full} fails its checksum (sha256 {digest[:12]}..., recorded {entry.sha256[:12]}...)"
        return None

    def verify(self, names: list[str] | None = None, *, checksums: bool = True) -> None:
        """Check that every recorded artifact (or each of ``names``) exists and matches its checksum.

        With ``checksums=False`` only existence and sizes are checked (cheap: no file is read),
        which catches truncated and missing files but not same-size modifications.

        Raises:
            ArtifactError: the first missing, resized or modified artifact, or an unknown name.
        """
        entries = self.entries()
        for name in sorted(entries) if names is None else names:
            entry = entries.get(name) or self._entry(name)
            problem = self._problem(name, entry, checksums=checksums)
            if problem is not None:
                raise ArtifactError(entry.path, problem)

    def is_complete(self, name: str) -> bool:
        """True if ``name`` is recorded and its file still matches; a mismatch is logged, not raised."""
        entry = self.entries().get(name)
        if entry is None:
            return False
        problem = self._problem(name, entry)
        if problem is not None:
            logger.warning("%s; it will be recomputed", problem)
        return problem is None


__all__ = ["MANIFEST_NAME", "ArtifactEntry", "Manifest", "checksum"]
