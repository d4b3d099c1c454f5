"""The runtime every job's flow body stands on: process setup and :class:`JobRun`.

A job's flow only sequences its tasks inside one ``with JobRun.open(job, output_dir) as run:``
block. ``JobRun`` does the rest, the same way for every job kind:

1. claims the output directory (:func:`flows.rundir.claimed_output_dir`: owner hash, run uid,
   lock, sweep of the temporaries killed writes left) and writes ``config.json``;
2. checks that MLflow answers, then opens or resumes the MLflow parent run (found again by the
   job hash, the job kind and the directory's run uid), logging the config as params once;
3. times stages (:meth:`JobRun.stage`, kept in ``timings.json``: a resumed job reports the
   first run's timings);
4. :meth:`JobRun.finish` writes ``summary.json`` atomically, logs it, closes the run FINISHED and
   prints what to do next (where the output is, how to load it, how to open MLflow on this store);
5. a failure closes the MLflow run FAILED without masking the original error.

``configure_environment`` must run before Prefect or MLflow is imported (both read their
settings at import time); the ``prune`` CLI calls it first thing. This module imports neither.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flows.config import JobBase
from flows.preflight import check_services
from flows.rundir import claimed_output_dir, flow_run_output_dir
from flows.tracking import JOB_TAG, KIND_TAG, RUN_TAG, Tracker, flatten, source_tags
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_write_text
from pruning_core.io.manifest import Manifest

log = logging.getLogger(__name__)

ENV_DEFAULTS = {
    # Prefect's ephemeral server needs ~20 s to migrate a fresh database; the default timeout is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pruning_core",
    # One "Finished in state Completed()" line per task run drowns the progress bars: task runs log
    # warnings and errors only (flow runs still log their start and end).
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow's own HTTP retries default to 7 with backoff factor 2 (minutes of waiting); ours take over.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_environment() -> None:
    """Set offline and no-telemetry defaults without overriding anything the user exported."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


class StageClock:
    """Seconds per stage, kept in the run directory so a resumed job reports the first timings."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.seconds: dict[str, float] = json.loads(file.read_text()) if file.exists() else {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if name not in self.seconds:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            atomic_write_text(self.file, json.dumps(self.seconds, indent=1))

    def totals(self) -> dict[str, float]:
        """Every stage's seconds and their ``total``."""
        return {**self.seconds, "total": round(sum(self.seconds.values()), 3)}


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def _logger() -> Any:
    """The Prefect run logger inside a flow or task run (terminal and Prefect UI), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (shorter), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class JobRun:
    """One run of a job in its output directory, from claiming the directory to closing its MLflow run.

    Attributes:
        job: the job, named (:meth:`JobBase.named`).
        dir: the run directory, absolute (a str: what tasks take, also on Dask workers).
        uid: the directory's run uid (``job.json``).
        tracker: the MLflow adapter; ``run_id`` is the parent run.
    """

    def __init__(self, job: JobBase, run_dir: Path, uid: str, tracker: Tracker, run_id: str) -> None:
        self.job, self.dir, self.uid, self.tracker, self.run_id = job, str(run_dir), uid, tracker, run_id
        self.clock = StageClock(paths.timings(run_dir))
        self.finished = False

    @classmethod
    @contextlib.contextmanager
    def open(cls, job: JobBase, output_dir: str | Path | None, *, identity: Mapping[str, str] | None = None,
             tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> Iterator[JobRun]:
        """Claim the output directory and open (or resume) the MLflow parent run for the block.

        Args:
            job: the validated job (named with its default name if it has none).
            output_dir: the run directory; None (a deployment's scheduled run): a directory of the
                flow run's own (:func:`flows.rundir.flow_run_output_dir`), resumed by its retries.
            identity: tags added to the parent run's identity (job hash, kind, run uid), e.g. a role.
            tags: descriptive tags of the parent run (set on every run, not part of its identity).
            params: params logged besides the flattened config and the job hash.

        A rerun of a finished directory that fails leaves its MLflow run FINISHED (with a warning).

        Raises:
            ConfigError: the directory holds another job's artifacts.
            ArtifactError: its job.json or manifest is truncated (before MLflow is touched).
            ServiceUnavailable: the MLflow tracking server or the Dask scheduler does not answer
                (before any long work).
        """
        job = job.named()
        # absolute: tasks on Dask workers (other working directories) get the same directory
        run_dir = (Path(output_dir) if output_dir else flow_run_output_dir(job)).resolve()
        with claimed_output_dir(run_dir, job) as uid:
            Manifest(run_dir).entries()  # ArtifactError on a truncated manifest, before MLflow is touched
            check_services(job)  # the Dask scheduler (deployments start here, not in the CLI)
            finished_before = paths.summary(run_dir).is_file()
            atomic_write_text(paths.config(run_dir), job.model_dump_json(indent=2))
            tracker, run_id = _open_parent(job, uid, identity or {}, tags or {}, params or {})
            run = cls(job, run_dir, uid, tracker, run_id)
            # a later attempt that fails never turns a finished run (its results are logged) FAILED
            closing = "FINISHED" if finished_before else "FAILED"
            try:
                yield run
            except BaseException:
                run._end_quietly(closing)
                raise
            if not run.finished:  # the flow body returned without finish(): never leave the run RUNNING
                run._end_quietly(closing)

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time the block as stage ``name`` (``seconds.<name>`` in summary.json, ``seconds_<name>`` in MLflow)."""
        return self.clock.stage(name)

    def log_metrics(self, metrics: Mapping[str, float | None]) -> None:
        """Log the metrics that have a value on the parent run."""
        self.tracker.log_metrics(self.run_id, {k: v for k, v in metrics.items() if v is not None})

    def finish(self, summary: dict[str, Any], *, headline: str, load: str) -> dict[str, Any]:
        """Write ``summary.json`` atomically, log it (and config.json) and the stage timings, close
        the MLflow run FINISHED, leave the summary as Prefect artifacts and print the closing lines;
        returns ``summary``.

        Args:
            summary: the job's result (JSON-able); its ``output`` (else ``pruned_model_dir``,
                ``chosen_model_dir``, ``ticket_path``) is shown as where the model is, and its
                ``registered_model`` (``{uri}``) as the registry entry.
            headline: the headline numbers, rounded (e.g. ``sparsity 0.500, perplexity 28.93 -> 54.08``).
            load: one line of Python that loads the result.
        """
        atomic_write_text(paths.summary(self.dir), json.dumps(summary, indent=1))
        if self.clock.seconds:
            self.log_metrics({f"seconds_{k}": v for k, v in self.clock.totals().items()})
        for file in (paths.summary(self.dir), paths.config(self.dir)):
            self.tracker.log_artifact(self.run_id, file)
        self.tracker.set_tags(self.run_id, {"pruning.headline": headline})
        self.tracker.end_run(self.run_id, "FINISHED")
        self.finished = True
        lines = self.closing_lines(headline, load, summary)
        if _flow_run_id():
            from flows.artifacts import publish_summary

            publish_summary(self.job, summary, lines)
        _logger().info(lines)
        return summary

    @staticmethod
    def quoted(path: str | Path) -> str:
        """``path`` as a Python string literal for the ``load`` line (relative to the working directory
        when inside it)."""
        return json.dumps(_shown(Path(path)))

    def mlflow_ui(self) -> str:
        """How to see this run: its URL on a tracking server, or the ``mlflow ui`` command for this
        store followed by the run's address in that UI."""
        uri = self.tracker.tracking_uri
        if uri.startswith(("http://", "https://")):
            return self.tracker.run_url(self.run_id)
        page = f"http://127.0.0.1:5000/#/experiments/{self.tracker.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {shlex.quote(uri)}   then open {page}"

    def closing_lines(self, headline: str, load: str, summary: Mapping[str, Any] | None = None) -> str:
        """What to do next: the headline, where the model is, how to load it, how to see the MLflow run."""
        summary = summary or {}
        output = next((summary[k] for k in ("output", "pruned_model_dir", "chosen_model_dir", "ticket_path")
                       if summary.get(k)), None)
        where = f"{_shown(Path(output))}/" if output else f"{_shown(Path(self.dir))}/"
        registered = (summary.get("registered_model") or {}).get("uri")
        return "\n".join([f"{self.job.name}: {headline}",
                          f"  model:   {where}",
                          f"  load:    python -c {shlex.quote(load)}",
                          *([f"  registry: {registered}   (mlflow.pyfunc.load_model)"] if registered else []),
                          f"  output:  {_shown(Path(self.dir))}/  (summary.json)",
                          f"  MLflow:  {self.mlflow_ui()}"])

    def _end_quietly(self, status: str) -> None:
        """Close the parent run without hiding the error that got us here (``FINISHED``: this
        attempt failed on a directory whose run had finished; its logged results stand)."""
        if status == "FINISHED":
            log.warning("this attempt failed; MLflow run %s keeps the status FINISHED of its completed run",
                        self.run_id)
        try:
            self.tracker.end_run(self.run_id, status)
        except Exception as exc:  # noqa: BLE001 - the original error is re-raised by the caller
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, exc)


def _open_parent(job: JobBase, uid: str, identity: Mapping[str, str], tags: Mapping[str, Any],
                 params: Mapping[str, Any]) -> tuple[Tracker, str]:
    """The job's MLflow parent run, found again by its identity or created; config params logged once."""
    Tracker.check_available(job.tracking.tracking_uri)  # fail fast, before any long work
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)
    kind = job.job  # type: ignore[attr-defined]
    ident = {JOB_TAG: job.job_hash(), KIND_TAG: kind, RUN_TAG: uid, **identity}
    run_id, resumed = tracker.start_run(ident, run_name=job.tracking.run_name or job.name)
    flow_run_id = _flow_run_id()
    described = {**source_tags(kind), **job.tracking.tags, **tags, "pruning.name": job.name or "", "prefect.flow_run_id": flow_run_id}
    tracker.set_tags(run_id, {**described, **({"pruning.resumed": "true"} if resumed else {})})
    config = flatten(job.model_dump(mode="json", exclude={"tracking"}))
    tracker.log_params(run_id, {**config, "job_hash": job.job_hash(), **params})
    if resumed:
        log.info("resuming MLflow run %s", run_id)
    if flow_run_id and tracker.tracking_uri.startswith(("http://", "https://")):
        from prefect.artifacts import create_link_artifact

        create_link_artifact(tracker.run_url(run_id), link_text="MLflow run", key=f"{kind}-{job.job_hash()}-mlflow")
    return tracker, run_id


__all__ = ["ENV_DEFAULTS", "JobRun", "StageClock", "configure_environment"]
