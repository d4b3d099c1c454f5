"""MLflow tracking adapter: the only place in the project that talks to MLflow.

Every call names its run explicitly (``run_id``), so it works from any thread or process;
transient failures (connection refused, timeouts, HTTP 5xx) are retried with exponential
backoff and then raised as :class:`~pruning_core.errors.ServiceUnavailable`; nothing is
dropped silently. Runs are found again by their ``job_hash`` tag and the ``run_uid`` of their
output directory (``flows.rundir.claim_output_dir``), so a job that is run again in the same
directory resumes its MLflow run instead of creating a duplicate, while a run in a new directory
(each scheduled run of a deployment) gets a new MLflow run.

How long a job waits for a restarting server is set by ``PRUNING_TRACKING_RETRIES`` (default 4)
and ``PRUNING_TRACKING_BACKOFF_S`` (default 0.5: waits of 0.5, 1, 2, 4 s between attempts); the
check before a job starts (:meth:`Tracker.check_available`) tries ``PRUNING_TRACKING_HEALTH_RETRIES``
(default 3) more times with the same backoff (0.5, 1, 2 s) before it gives up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pruning_core.errors import ServiceUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_DB = "mlflow.db"
JOB_TAG = "pruning.job_hash"
KIND_TAG = "pruning.job_kind"
ROLE_TAG = "pruning.role"
RUN_TAG = "pruning.run_uid"  # the run_uid of the output directory (job.json) the run belongs to
LOGGED_TAG = "pruning.logged"  # set on a child run once everything of it is logged (Tracker.log_child_once)

def resolve_tracking_uri(uri: str | None = None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else SQLite in the working directory."""
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return chosen or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def source_tags(kind: str) -> dict[str, str]:
    """MLflow's source tags of a job's runs: what ran (the kind's flow) and, in a git checkout, which commit."""
    import subprocess

    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": f"flows.{kind}.flow"}
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return tags
    return {**tags, "mlflow.source.git.commit": commit} if commit else tags


def _is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, ConnectionError | TimeoutError | urllib.error.URLError):
        return True
    if isinstance(exc, MlflowException):
        text = str(exc).lower()
        markers = ("connection", "max retries", "timed out", "temporarily", "503", "502", "504", "database is locked")
        return any(m in text for m in markers)
    import requests

    return isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout)


class Tracker:
    """Thin, retrying wrapper around :class:`mlflow.MlflowClient` for one experiment."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "pruning", *,
                 retries: int | None = None, backoff_s: float | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.retries = retries if retries is not None else int(os.environ.get("PRUNING_TRACKING_RETRIES", "4"))
        self.backoff_s = (backoff_s if backoff_s is not None
                          else float(os.environ.get("PRUNING_TRACKING_BACKOFF_S", "0.5")))
        with self._store_init_lock():
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id = self._call("create experiment", self._experiment_id, experiment)

    def _store_init_lock(self) -> contextlib.AbstractContextManager[Any]:
        """Two jobs opening one fresh SQLite store at once race in MLflow's schema migration:
        serialize the first touch with a lock file beside the database."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return contextlib.nullcontext()
        from filelock import FileLock

        db = Path(self.tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(db) + ".lock", timeout=120)

    # -- plumbing -------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not _is_transient(exc):
                    raise
                if attempt == self.retries:
                    raise ServiceUnavailable(
                        "MLflow", self.tracking_uri, f"{what} failed after {self.retries + 1} attempts: {exc}"
                    ) from exc
                log.warning("MLflow %s failed (%s); retrying in %.1f s", what, type(exc).__name__, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            # Keep artifacts beside the database instead of in whatever directory we run from.
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            location = (db.parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)  # another job created it at the same moment
            if exp is None:
                raise
            return exp.experiment_id

    @staticmethod
    def check_available(tracking_uri: str | None = None, timeout_s: float = 5.0, *, retries: int | None = None,
                        backoff_s: float | None = None) -> None:
        """Fail fast, before any long work, if an HTTP tracking server does not answer /health.

        A server that is still starting (or restarting) gets ``retries`` more attempts (default
        $PRUNING_TRACKING_HEALTH_RETRIES, else 3) after waits of ``backoff_s`` (default
        $PRUNING_TRACKING_BACKOFF_S, else 0.5), doubling: 0.5 + 1 + 2 s by default.

        Raises:
            ServiceUnavailable: no attempt got HTTP 200 from /health.
        """
        uri = resolve_tracking_uri(tracking_uri)
        if not uri.startswith(("http://", "https://")):
            return
        retries = retries if retries is not None else int(os.environ.get("PRUNING_TRACKING_HEALTH_RETRIES", "3"))
        delay = backoff_s if backoff_s is not None else float(os.environ.get("PRUNING_TRACKING_BACKOFF_S", "0.5"))
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
                    problem = f"/health answered HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as exc:  # HTTPError (5xx while starting) included
                problem = f"/health did not answer: {exc}"
            if attempt == retries:
                raise ServiceUnavailable("MLflow", uri, f"{problem} ({retries + 1} attempts)")
            log.warning("MLflow at %s: %s; retrying in %.1f s", uri, problem, delay)
            time.sleep(delay)
            delay *= 2

    # -- runs -----------------------------------------------------------------------------
    def find_run(self, tags: Mapping[str, str]) -> str | None:
        """The newest run carrying all ``tags``, if any."""
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self._call("search runs", self.client.search_runs, [self.experiment_id], flt,
                          max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def start_run(self, tags: Mapping[str, str], *, run_name: str | None = None,
                  parent_run_id: str | None = None) -> tuple[str, bool]:
        """Resume the run with these identity ``tags`` or create it; returns (run_id, resumed)."""
        identity = dict(tags)
        if parent_run_id:
            identity["mlflow.parentRunId"] = parent_run_id
        existing = self.find_run(identity)
        if existing:
            self._call("resume run", self.client.update_run, existing, status="RUNNING")
            return existing, True
        run = self._call("create run", self.client.create_run, self.experiment_id, tags=identity, run_name=run_name)
        return run.info.run_id, False

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("end run", self.client.set_terminated, run_id, status)

    def log_child_once(self, parent_run_id: str, identity: Mapping[str, str], run_name: str,
                       log: Callable[[str], None]) -> str:
        """Record a child run of ``parent_run_id`` once: ``log(child_run_id)`` logs its contents,
        then :data:`LOGGED_TAG` marks it complete and it is closed FINISHED. Returns its id.

        A child already marked is only closed again if a resumed job reopened it; a child that a
        crash left half-logged is found by its ``identity`` and completed (``log`` must be
        idempotent: :meth:`log_params`, :meth:`log_metrics_once` and :meth:`log_table` are).
        """
        done = self.find_run({**identity, "mlflow.parentRunId": parent_run_id, LOGGED_TAG: "true"})
        if done:
            if self._call("get run", self.client.get_run, done).info.status == "RUNNING":
                self.end_run(done)
            return done
        child, _ = self.start_run(identity, run_name=run_name, parent_run_id=parent_run_id)
        log(child)
        self.set_tags(child, {LOGGED_TAG: "true"})
        self.end_run(child)
        return child

    def child_runs(self, parent_run_id: str) -> list[Any]:
        flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
        return list(self._call("search child runs", self.client.search_runs, [self.experiment_id], flt))

    # -- logging --------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params once; on a resumed run, params already logged are skipped."""
        from mlflow.entities import Param

        logged = self._call("get run", self.client.get_run, run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):
            self._call("log params", self.client.log_batch, run_id, params=new[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite metrics; a NaN/Inf value is logged as a tag note instead of polluting charts."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        good = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if math.isfinite(float(v))]
        bad = {f"nonfinite.{k}": str(v) for k, v in metrics.items() if not math.isfinite(float(v))}
        if good:
            self._call("log metrics", self.client.log_batch, run_id, metrics=good)
        if bad:
            log.warning("not logging non-finite metrics %s", bad)
            self.set_tags(run_id, bad)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def has_artifact(self, run_id: str, artifact_file: str) -> bool:
        folder, _, _ = artifact_file.rpartition("/")
        listing = self._call("list artifacts", self.client.list_artifacts, run_id, folder or None)
        return any(f.path == artifact_file for f in listing)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log artifact", self.client.log_artifact, run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, directory: str | Path, artifact_path: str | None = None) -> None:
        self._call("log artifacts", self.client.log_artifacts, run_id, str(directory), artifact_path)

    def log_dict(self, run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
        self._call("log dict", self.client.log_dict, run_id, dict(data), artifact_file)

    def log_table(self, run_id: str, rows: Iterable[Mapping[str, Any]], artifact_file: str) -> None:
        """Log a table once (MLflow appends to an existing table file, which would duplicate rows on resume)."""
        rows = list(rows)
        if not rows or self.has_artifact(run_id, artifact_file):
            return
        columns = {k: [r.get(k) for r in rows] for k in rows[0]}
        self._call("log table", self.client.log_table, run_id, columns, artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self._call("log figure", self.client.log_figure, run_id, figure, artifact_file)

    def run_url(self, run_id: str) -> str:
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"{self.tracking_uri} (experiment {self.experiment_id}, run {run_id})"

    # -- idempotent metric logging (resumable jobs) -------------------------------------------
    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which metric ``key`` has been logged in the run."""
        history = self._call("get metric history", self.client.get_metric_history, run_id, key)
        return {int(m.step) for m in history}

    def log_metrics_once(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> int:
        """Log the ``(key, value, step)`` points whose (key, step) the run does not have yet.

        Repeating the call (e.g. after a crash halfway through logging) adds nothing twice, so a
        resumed job never duplicates a metric point. Non-finite values are skipped with a warning.
        Returns the number of points logged.
        """
        from mlflow.entities import Metric

        pending = {(k, int(s)): float(v) for k, v, s in points}
        bad = {f"{k}@{s}": v for (k, s), v in pending.items() if not math.isfinite(v)}
        if bad:
            log.warning("not logging non-finite metrics %s", bad)
        have = {k: self.logged_steps(run_id, k) for k in {k for k, _ in pending}}
        now = int(time.time() * 1000)
        new = [Metric(k, v, now, s) for (k, s), v in sorted(pending.items())
               if s not in have[k] and math.isfinite(v)]
        for i in range(0, len(new), 1000):  # MLflow's log_batch limit
            self._call("log metrics", self.client.log_batch, run_id, metrics=new[i : i + 1000])
        return len(new)

    # -- MLflow models and dataset inputs -----------------------------------------------------------
    def log_pyfunc_flavor(self, run_id: str, artifact_path: str, loader_module: str,
                          metadata: Mapping[str, Any] | None = None) -> None:
        """Make the run's ``artifact_path`` directory (already logged) an MLflow ``python_function``
        model: add an ``MLmodel`` file whose loader module reads the directory itself, so the files
        are stored once and ``mlflow.pyfunc.load_model("runs:/<run>/<artifact_path>")`` loads them.
        Idempotent (a resumed job does not upload it again)."""
        import tempfile

        import mlflow.pyfunc
        from mlflow.models import Model

        if self.has_artifact(run_id, f"{artifact_path}/MLmodel"):
            return
        model = Model(artifact_path=artifact_path, run_id=run_id, metadata=dict(metadata or {}))
        mlflow.pyfunc.add_to_model(model, loader_module=loader_module)
        with tempfile.TemporaryDirectory() as tmp:
            model.save(str(Path(tmp) / "MLmodel"))
            self.log_artifact(run_id, Path(tmp) / "MLmodel", artifact_path)

    def log_dataset_inputs(self, run_id: str, datasets: Iterable[Mapping[str, str]]) -> None:
        """Record datasets as the run's inputs (``mlflow.log_input``): each mapping has ``name``,
        ``digest``, ``source`` (a local path or URI) and ``context`` (e.g. calibration, evaluation)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for d in datasets:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": local files are local artifacts
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(d["source"])
            dataset = MetaDataset(source, name=d["name"], digest=d["digest"])
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])]))
        if inputs:
            self._call("log inputs", self.client.log_inputs, run_id, datasets=inputs)

    def run_inputs(self, run_id: str) -> list[Any]:
        """The run's dataset inputs (``DatasetInput``: ``.dataset.name``, ``.dataset.digest``, ``.tags``)."""
        return list(self._call("get run", self.client.get_run, run_id).inputs.dataset_inputs)

    # -- model registry -------------------------------------------------------------------------
    def register_model_version(self, name: str, run_id: str, artifact_path: str, *, alias: str | None = None,
                               tags: Mapping[str, Any] | None = None, description: str | None = None) -> str:
        """Register ``runs:/<run_id>/<artifact_path>`` as a version of ``name`` and point ``alias`` at it.

        Idempotent: a version with the same run and source is reused, not registered again.
        Returns the version number as a string.
        """
        from mlflow.exceptions import MlflowException

        try:
            self._call("create registered model", self.client.create_registered_model, name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"runs:/{run_id}/{artifact_path}"
        found = self._call("search model versions", self.client.search_model_versions,
                           f"name = '{name}' and run_id = '{run_id}'")
        same = [v for v in found if v.source == source]
        version = same[0] if same else self._call(
            "create model version", self.client.create_model_version, name, source, run_id=run_id,
            tags={k: str(v) for k, v in (tags or {}).items()}, description=description)
        if alias:
            self._call("set alias", self.client.set_registered_model_alias, name, alias, version.version)
        return str(version.version)

    def model_version(self, name: str, alias: str) -> Any:
        """The registered ``ModelVersion`` that ``alias`` points at."""
        return self._call("get model version", self.client.get_model_version_by_alias, name, alias)

    def download_model(self, name: str, alias: str, dst: str | Path) -> Path:
        """Download the files of ``models:/<name>@<alias>`` into ``dst``; returns their directory.

        The alias is resolved through this tracker's registry (MLflow's own ``models:/`` download
        reads the process-wide registry URI instead).
        """
        from mlflow.artifacts import download_artifacts

        version = self.model_version(name, alias)
        uri = self._call("get download uri", self.client.get_model_version_download_uri, name, version.version)
        Path(dst).mkdir(parents=True, exist_ok=True)
        out = self._call("download model", download_artifacts, artifact_uri=uri, dst_path=str(dst),
                         tracking_uri=self.tracking_uri)
        return Path(out)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
