"""The output directory of a job run: where it is, and claiming it (the one mechanism every job uses).

A run directory resumes from its manifest, so another config's finished artifacts would be
taken as this job's: :func:`claim_output_dir` binds a directory to one job (its hash) under a
lock, and :func:`claimed_output_dir` holds the directory's run lock while the job runs, so a
later claim knows whether the temporaries of killed writes are garbage. File names come from
:mod:`pruning_core.io.paths`. No Prefect or MLflow at import time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows.config import JobBase
from pruning_core.errors import ArtifactError, ConfigError
from pruning_core.io import atomic, paths

log = logging.getLogger(__name__)
# run directories whose run lock this process holds exclusively: (fd, thread id)
_HELD: dict[Path, tuple[int, int]] = {}


def _legacy_owner(run_dir: Path, job: JobBase) -> str | None:
    """The job hash of a directory written before job.json existed, from its config.json."""
    config = paths.config(run_dir)
    if not config.is_file():
        return None
    data = _read_json(config)
    if isinstance(data, dict) and "job_hash" in data:  # {"job_hash": ..., "job": {...}} (Minitron)
        return str(data["job_hash"])
    try:
        return type(job).model_validate(data).job_hash()
    except ValidationError:
        raise ConfigError("output_dir", f"{run_dir} holds a config.json that is not a {job.job} job's "  # type: ignore[attr-defined]
                          "config: not this job's run directory; use another output directory") from None


def _read_json(file: Path) -> Any:
    """A run directory's JSON record; ArtifactError naming the file if it is truncated or not JSON."""
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as exc:
        raise ArtifactError(str(file), f"truncated or not JSON ({exc}); it binds the directory to its job: "
                            "restore it, or delete the directory to start over") from None


def _no_live_run(run_dir: Path) -> bool:
    """True when no process holds the directory's run lock (every run of it has ended or died)."""
    fd = os.open(paths.run_lock(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases the lock if it was taken
    return True


def claim_output_dir(run_dir: Path, job: JobBase, *, sweep: bool | None = None) -> str:
    """Bind ``run_dir`` to ``job`` and return the directory's run uid.

    ``job.json`` records the owner (its hash) and a random ``run_uid``, drawn the first time the
    directory is claimed: the MLflow run of the directory is found by job hash and uid, so
    rerunning a directory resumes its MLflow run and a new directory gets a new one. A directory
    written before ``job.json`` existed is identified by its ``config.json``.

    The check and the write happen under an exclusive lock on the directory (the manifest's
    ``flock``), so two jobs claiming one directory at once cannot both win. With ``sweep`` True
    (the caller holds the run lock, :func:`claimed_output_dir`) or, by default, when no run of the
    directory is alive, the temporaries that killed atomic writes left behind are deleted under
    the same lock.

    Raises:
        ConfigError: ``run_dir`` belongs to a job with another hash.
        ArtifactError: its ``job.json`` is truncated or not JSON.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = paths.job_record(run_dir)
    with atomic.directory_lock(run_dir):
        record = _read_json(marker) if marker.is_file() else {}
        if not isinstance(record, dict):
            raise ArtifactError(str(marker), f"expected a JSON object, got {type(record).__name__}")
        owner = record.get("job_hash") or _legacy_owner(run_dir, job)
        if owner is not None and owner != job.job_hash():
            raise ConfigError("output_dir", f"{run_dir} holds the artifacts of job {owner}, not of this job "
                              f"({job.job_hash()}); use another output directory")
        uid = record.get("run_uid")
        if not uid:
            uid = uuid.uuid4().hex
            record = {"job_hash": job.job_hash(), "job": job.job, **record, "run_uid": uid}  # type: ignore[attr-defined]
            atomic.atomic_write_text(marker, json.dumps(record))  # looked up at call time (tests slow it down)
        if sweep if sweep is not None else _no_live_run(run_dir):
            for path in atomic.sweep_temporaries(run_dir, skip=lambda d: paths.job_record(d).is_file()):
                log.info("removed %s, left by an interrupted write", path)
    return str(uid)


@contextlib.contextmanager
def claimed_output_dir(run_dir: Path, job: JobBase) -> Iterator[str]:
    """Hold ``run_dir``'s run lock exclusively (:func:`exclusive_run`), claim it for ``job``
    (:func:`claim_output_dir`) and keep the lock until the block ends; yields the run uid.

    Holding the lock, no other run of the directory is alive, so the temporaries killed writes
    left are swept, and a second run of the same job waits here until the first has ended (then
    resumes from its manifest). The lock is a ``flock``: the kernel releases it when the process
    dies, however it dies.
    """
    with exclusive_run(run_dir):  # held by this thread: no run of the directory writes now
        yield claim_output_dir(run_dir, job, sweep=True)


@contextlib.contextmanager
def exclusive_run(run_dir: Path) -> Iterator[bool]:
    """Hold the directory's run lock exclusively for the block (re-entrant within a thread).

    Yields True when another process held it and this one waited for that run to end (the
    caller may then attach to its result, :func:`finished_summary`), else False.
    """
    held = _HELD.get(run_dir)
    if held is not None and held[1] == threading.get_ident():
        yield False
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.run_lock(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = _lock_or_wait(fd, run_dir)
        _HELD[run_dir] = (fd, threading.get_ident())
        yield waited
    finally:
        if _HELD.get(run_dir, (None,))[0] == fd:
            del _HELD[run_dir]
        os.close(fd)


def _lock_or_wait(fd: int, run_dir: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        log.warning("%s: another run of this job is in progress; waiting for it to end", run_dir)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True


def finished_summary(run_dir: Path, job: JobBase) -> dict[str, Any] | None:
    """The summary of ``run_dir`` if a run of exactly this config finished there, else None."""
    summary, config = paths.summary(run_dir), paths.config(run_dir)
    if not (summary.is_file() and config.is_file()):
        return None
    if config.read_text(encoding="utf-8") != job.named().model_dump_json(indent=2):
        return None
    data = _read_json(summary)
    return data if isinstance(data, dict) else None


def _is_run_dir(names: set[str], run_dir: Path) -> bool:
    """A directory a run wrote: job.json, a manifest, or a job's config.json (before job.json existed)."""
    if names & {paths.job_record(run_dir).name, paths.manifest(run_dir).name}:
        return True
    config = paths.config(run_dir)
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_bytes())
    except (ValueError, OSError):
        return False
    return isinstance(data, dict) and ("job" in data or "job_hash" in data)


def check_output_dir(run_dir: Path) -> None:
    """Refuse, before any work, an output directory that cannot be a run directory or be written.

    Raises:
        ConfigError: (``output_dir``) the path is a file, a model directory or another
            non-empty directory that no run wrote.
        ArtifactError: the directory (or the nearest existing parent) cannot be written
            (read-only file system, permissions); names the path and the OS reason.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("output_dir", f"{run_dir} is a file, not a directory")
    if run_dir.is_dir():
        names = {p.name for p in run_dir.iterdir()} - {paths.run_lock(run_dir).name}
        if names and not _is_run_dir(names, run_dir):
            model = paths.config(run_dir).is_file() and any(n.endswith(".safetensors") for n in names)
            what = "a model directory" if model else "a directory no run wrote"
            raise ConfigError("output_dir", f"{run_dir} is {what} (holds {', '.join(sorted(names)[:5])}"
                              f"{', ...' if len(names) > 5 else ''}); use a new or empty directory")
    _check_writable(run_dir)


def _check_writable(run_dir: Path) -> None:
    base = run_dir
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=base)
    except OSError as exc:
        raise ArtifactError(str(run_dir), f"cannot write in {base}: {exc.strerror} (errno {exc.errno})") from None
    os.close(fd)
    os.unlink(probe)


def _leaf_name(job: JobBase) -> str:
    return f"{job.named().name}-{job.job_hash()}"


def default_output_dir(job: JobBase) -> Path:
    """``runs/<name>-<job hash>``: jobs with different configs never share a directory."""
    return Path("runs") / _leaf_name(job)


def flow_run_output_dir(job: JobBase) -> Path:
    """Where a flow run given no ``output_dir`` (a deployment's scheduled run) writes:
    ``$PRUNING_RUNS_DIR/<name>-<job hash>/<scheduled start>-<flow run id>``.

    Each flow run gets its own directory (and so its own MLflow run), and a retry of the flow run
    (same id) resumes it. ``PRUNING_RUNS_DIR`` defaults to ``runs/deployed`` in the working
    directory; the container deployments set ``/data/runs`` (a volume or PersistentVolumeClaim).
    """
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        raise RuntimeError("flow_run_output_dir() needs a Prefect flow run; pass output_dir instead")
    start = flow_run.get_scheduled_start_time()  # set once per flow run: the same on every retry
    leaf = f"{start.astimezone(UTC):%Y%m%dT%H%M%SZ}-{run_id}" if start else str(run_id)
    base = Path(os.environ.get("PRUNING_RUNS_DIR") or "runs/deployed")
    return base / _leaf_name(job) / leaf


__all__ = ["check_output_dir", "claim_output_dir", "claimed_output_dir", "default_output_dir", "exclusive_run",
           "finished_summary", "flow_run_output_dir"]
