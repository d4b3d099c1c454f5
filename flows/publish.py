"""What every LLM job publishes in MLflow at its end, the same way for each kind.

- the output model directory (already the run's ``model/`` artifact) becomes an MLflow
  ``python_function`` model (:mod:`flows.mlflow_model`: the files are stored once) and is
  registered as ``<job>-<model>`` (e.g. ``oneshot-smollm2``) with the job's name as alias;
- the calibration and evaluation windows are the run's dataset inputs (``mlflow.log_input``:
  text name, window counts, sha256 of the exact token windows, the text file as source);
- the headline numbers, rounded, are metrics of their own (``headline/...``), apart from the
  stage timings (``seconds_...``);
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from prefect import task

from flows import llm
from flows.config import JobBase
from flows.execution import IO_TASK
from flows.mlflow_model import LOADER_MODULE
from flows.tracking import JOB_TAG, Tracker
from pruning_core.lm.text import SHIPPED_TEXTS, shipped_text_path

ALIAS = re.compile(r"[^A-Za-z0-9_-]")


def model_label(model: str) -> str:
    """``smollm2``, or a model directory's name (characters a registry name allows)."""
    return ALIAS.sub("-", Path(model).name if model != "smollm2" else model) or "model"


def registered_name(job: JobBase) -> str:
    """``<job>-<model>``: ``oneshot-smollm2``, ``minitron-smollm2``, ``oneshot-<directory name>``."""
    return f"{job.job}-{model_label(job.model)}"  # type: ignore[attr-defined]


def alias_of(job: JobBase) -> str:
    """The job's name as a registry alias (``.`` -> ``-``; MLflow reserves ``latest`` and ``v<N>``)."""
    alias = ALIAS.sub("-", job.name or job.default_name())
    return f"job-{alias}" if alias.lower() == "latest" or re.fullmatch(r"v\d+", alias) else alias


def _text_source(text: str) -> str:
    return str(shipped_text_path(text) if text in SHIPPED_TEXTS else Path(text).resolve())


def dataset_inputs(job: JobBase, run_dir: str) -> list[dict[str, str]]:
    """The calibration and (when enabled) evaluation windows of an LLM job, as MLflow dataset inputs."""
    sections = [("calibration", job.calibration)]  # type: ignore[attr-defined]
    if job.evaluation.enabled:  # type: ignore[attr-defined]
        sections.append(("evaluation", job.evaluation))  # type: ignore[attr-defined]
    out = []
    for context, section in sections:
        windows = llm.load_windows(run_dir, context)
        data = windows.contiguous().numpy().tobytes()
        out.append({"name": f"{Path(section.text).name} ({windows.shape[0]} x {windows.shape[1]} tokens)",
                    "digest": hashlib.sha256(data).hexdigest()[:16], "source": _text_source(section.text),
                    "context": context})
    return out


def headline_metrics(summary: dict[str, Any], keys: tuple[str, ...], digits: int = 4) -> dict[str, float]:
    """``headline/<key>``: the summary's headline numbers, rounded, grouped apart from the timings."""
    return {f"headline/{k}": round(float(summary[k]), digits) for k in keys if summary.get(k) is not None}


@task(name="publish-model", **IO_TASK)
def publish_model(job: JobBase, run_dir: str, run_id: str, summary: dict[str, Any],
                  headline: tuple[str, ...]) -> dict[str, str] | None:
    """Dataset inputs, headline metrics, the MLflow model and its registry version + alias.

    Returns ``{name, version, alias, uri}`` of the registered model (None when
    ``tracking.log_model`` is off: no model is logged then).
    """
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)
    tracker.log_dataset_inputs(run_id, dataset_inputs(job, run_dir))
    tracker.log_metrics_once(run_id, [(k, v, 0) for k, v in headline_metrics(summary, headline).items()])
    if not job.tracking.log_model or not tracker.has_artifact(run_id, "model/config.json"):
        return None
    tracker.log_pyfunc_flavor(run_id, "model", LOADER_MODULE,
                              metadata={JOB_TAG: job.job_hash(), "job": job.job})  # type: ignore[attr-defined]
    name, alias = registered_name(job), alias_of(job)
    version = tracker.register_model_version(name, run_id, "model", alias=alias, tags={JOB_TAG: job.job_hash()},
                                             description=f"{job.job} job {job.name} ({job.job_hash()})")  # type: ignore[attr-defined]
    return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}"}


__all__ = ["alias_of", "dataset_inputs", "headline_metrics", "model_label", "publish_model", "registered_name"]
