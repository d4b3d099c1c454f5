"""Checks made before any long work: by ``prune validate`` and by ``prune run`` before its flow starts.

Everything that can be known from the config, ``config.json`` of the model, the text paths and a
connection attempt is checked here, so a bad input fails in seconds with a typed error naming
the field, file or address, never after preparing windows or measuring the dense perplexity:

- :func:`check_inputs`: the model directory (files, a decoder-only causal LM, architecture
  support, windows no longer than its positions) and the text files of LLM jobs;
- :func:`check_services`: the Dask scheduler of ``runner.kind: dask`` answers
  (MLflow is checked when the run opens, :class:`flows.runtime.JobRun`).

Imports neither Prefect nor MLflow.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flows.config import JobBase
from pruning_core.errors import ConfigError, ServiceUnavailable

LLM_JOBS = ("oneshot", "minitron")
DASK_CONNECT_TIMEOUT = 5.0  # seconds


def _sections(job: JobBase) -> dict[str, Any]:
    """The calibration and evaluation sections a job has (evaluation only when enabled)."""
    found = {}
    for name in ("calibration", "evaluation"):
        section = getattr(job, name, None)
        if section is not None and getattr(section, "enabled", True):
            found[name] = section
    return found


def check_text(field: str, text: str) -> None:
    """A text source is a shipped name or an existing file with a supported suffix."""
    from pruning_core.lm.text import _SUFFIXES, SHIPPED_TEXTS

    if text in SHIPPED_TEXTS:
        return
    path = Path(text)
    if path.is_dir():
        raise ConfigError(field, f"{path} is a directory, not a text file ({', '.join(_SUFFIXES)})")
    if not path.name.lower().endswith(_SUFFIXES):
        raise ConfigError(field, f"{text!r}: unsupported text; use one of {sorted(SHIPPED_TEXTS)} or a "
                          f"{', '.join(_SUFFIXES)} file")
    if not path.is_file():
        raise ConfigError(field, f"text file {path} does not exist")


def check_model(job: JobBase) -> None:
    """The model directory (or the hub id's cached snapshot at ``revision``) holds a loadable
    decoder-only causal LM this job supports, and every window fits its positions (names the
    field and the model's limit)."""
    from flows.hub import resolve_model
    from pruning_core.lm.checks import inspect_model
    from pruning_core.lm.models import check_model_dir

    if job.model == "smollm2":
        return  # shipped, checked when it is unpacked
    root = resolve_model(job.model, getattr(job, "revision", None))  # a hub id: its cached snapshot
    if root.exists() and not root.is_dir():
        raise ConfigError("model", f"{root} is a file, not a Hugging Face model directory")
    if not root.exists():
        raise ConfigError("model", f"model directory {root} does not exist (or use 'smollm2', the shipped model)")
    check_model_dir(root)  # ArtifactError: no config.json, no safetensors, a corrupt file
    lengths = {f"{name}.window_length": s.window_length for name, s in _sections(job).items()}
    inspect_model(root, job=job.job, window_lengths=lengths)  # type: ignore[attr-defined]


def check_inputs(job: JobBase) -> None:
    """Every input check that needs no service: model directory and texts of LLM jobs."""
    if job.job not in LLM_JOBS:  # type: ignore[attr-defined]
        return
    for name, section in _sections(job).items():
        check_text(f"{name}.text", section.text)
    check_model(job)


def check_dask_scheduler(address: str) -> None:
    """Raise :class:`ServiceUnavailable` unless a TCP connection to the scheduler succeeds."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError("runner.address", f"{address!r} is not a scheduler address like tcp://host:8786")
    try:
        with socket.create_connection((host, port), timeout=DASK_CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        raise ServiceUnavailable("Dask scheduler", address, f"{exc.strerror or exc} (runner.address; start "
                                 "the scheduler or use runner kind threads)") from None


def check_services(job: JobBase) -> None:
    """The servers a job needs besides MLflow answer: the Dask scheduler of ``runner.kind: dask``."""
    if job.runner.kind == "dask" and job.runner.address:
        check_dask_scheduler(job.runner.address)


__all__ = ["check_dask_scheduler", "check_inputs", "check_model", "check_services", "check_text"]
