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
import uuid
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

from flows.config import JobBase
from pruning_core.errors import ConfigError
from pruning_core.io import atomic, paths

log = logging.getLogger(__name__)


def _legacy_owner(run_dir: Path, job: JobBase) -> str | None:
    """The job hash of a directory written before job.json existed, from its config.json."""
    config = paths.config(run_dir)
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    if isinstance(data, dict) and "job_hash" in data:  # {"job_hash": ..., "job": {...}} (Minitron)
        return str(data["job_hash"])
    return type(job).model_validate(data).job_hash()


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


def claim_output_dir(run_dir: Path, job: JobBase) -> str:
    """Bind ``run_dir`` to ``job`` and return the directory's run uid.

    ``job.json`` records the owner (its hash) and a random ``run_uid``, drawn the first time the
    directory is claimed: the MLflow run of the directory is found by job hash and uid, so
    rerunning a directory resumes its MLflow run and a new directory gets a new one. A directory
    written before ``job.json`` existed is identified by its ``config.json``.

    The check and the write happen under an exclusive lock on the directory (the manifest's
    ``flock``), so two jobs claiming one directory at once cannot both win. When no run of the
    directory is alive (see :func:`claimed_output_dir`), the temporaries that killed atomic writes
    left behind are deleted under the same lock.

    Raises:
        ConfigError: ``run_dir`` belongs to a job with another hash.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = paths.job_record(run_dir)
    with atomic.directory_lock(run_dir):
        record = json.loads(marker.read_text()) if marker.is_file() else {}
        owner = record.get("job_hash") or _legacy_owner(run_dir, job)
        if owner is not None and owner != job.job_hash():
            raise ConfigError("output_dir", f"{run_dir} holds the artifacts of job {owner}, not of this job "
                              f"({job.job_hash()}); use another output directory")
        uid = record.get("run_uid")
        if not uid:
            uid = uuid.uuid4().hex
            record = {"job_hash": job.job_hash(), "job": job.job, **record, "run_uid": uid}  # type: ignore[attr-defined]
            atomic.atomic_write_text(marker, json.dumps(record))  # looked up at call time (tests slow it down)
        if _no_live_run(run_dir):
            for path in atomic.sweep_temporaries(run_dir, skip=lambda d: paths.job_record(d).is_file()):
                log.info("removed %s, left by an interrupted write", path)
    return str(uid)


@contextlib.contextmanager
def claimed_output_dir(run_dir: Path, job: JobBase) -> Iterator[str]:
    """Claim ``run_dir`` for ``job`` (:func:`claim_output_dir`) and hold its run lock (shared)
    until the block ends; yields the run uid.

    The run lock tells a later claim whether any run of the directory is still alive (its
    temporaries may be in use) or all have ended, so that what they left can be swept. It is a
    ``flock``: released by the kernel when the process dies, however it dies.
    """
    uid = claim_output_dir(run_dir, job)
    fd = os.open(paths.run_lock(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield uid
    finally:
        os.close(fd)


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


__all__ = ["claim_output_dir", "claimed_output_dir", "default_output_dir", "flow_run_output_dir"]
