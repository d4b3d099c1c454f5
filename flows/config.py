"""What every job config shares: the base model and the sections jobs have in common.

A job config is a YAML file validated by pydantic; each job kind's model lives beside its flow
(``flows/<kind>/config.py``) and is registered in :mod:`flows.jobs`. Unknown keys are rejected
and every error names the field and the allowed values. A job's identity (``job_hash``) is a hash
of its semantic fields only (not where it runs or how it is tracked) and leaves out fields still
at their default, so adding a new option with a default does not change the identity of existing
jobs (open_lth's hashname idea). ``tests/flows/test_job_config.py`` pins the hashes of the
shipped configs: moving code must never change a job's identity.

This module imports neither Prefect nor MLflow (``prune validate`` stays light).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pruning_core.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
# A job name becomes a directory name (runs/<name>-<hash>) and an MLflow run name: one path
# component, no separators, no leading dot (so never '.', '..' or a hidden file), at most 100 chars.
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
TEXT_HELP = "a shipped text (emma, pride_and_prejudice) or a .txt/.txt.gz/.jsonl/.parquet path"


class StrictModel(BaseModel):
    """Frozen, and rejects unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(StrictModel):
    """Calibration data: ``num_windows`` random windows of ``window_length`` tokens, drawn with ``seed``.

    Job kinds extend it with what they do with the windows (one-shot: ``mode``; Minitron: how
    many windows each step uses).
    """

    text: str = Field("emma", description=TEXT_HELP)
    text_field: str = Field("text", description="field (JSONL) or column (Parquet) holding the text")
    num_windows: PositiveInt = 64
    window_length: PositiveInt = 256
    seed: int = 0
    batch_size: PositiveInt = 8


class EvaluationConfig(StrictModel):
    """Held-out perplexity: the first ``num_windows`` x ``window_length`` tokens, non-overlapping."""

    enabled: bool = True
    text: str = "pride_and_prejudice"
    text_field: str = "text"
    num_windows: PositiveInt = 64
    window_length: PositiveInt = 256
    batch_size: PositiveInt = 8
    speed: bool = Field(True, description="measure prefill/decode tokens/s of the dense and the output model "
                                          "(a few tokens, median of 3; recorded in summary.json)")


class RunnerConfig(StrictModel):
    """Where per-layer tasks run: threads (default), a local Dask cluster, or an existing scheduler."""

    kind: Literal["threads", "dask_local", "dask"] = "threads"
    max_workers: PositiveInt = 2
    n_workers: PositiveInt = 2
    address: str | None = Field(None, description="Dask scheduler address, e.g. tcp://host:8786 (kind: dask)")

    @model_validator(mode="after")
    def _address_matches_kind(self) -> RunnerConfig:
        if self.kind == "dask" and not self.address:
            raise ValueError("address: runner kind 'dask' needs a scheduler address (e.g. tcp://127.0.0.1:8786)")
        if self.kind != "dask" and self.address:
            raise ValueError(f"address: only used with runner kind 'dask', not '{self.kind}'")
        return self


class TrackingConfig(StrictModel):
    """MLflow: ``tracking_uri`` (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)."""

    experiment: str = "pruning"
    tracking_uri: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    log_model: bool = True


class JobBase(StrictModel):
    """Fields every job has; each kind adds ``job: Literal[<kind>]`` and its own sections."""

    name: str | None = Field(None, description="human-readable name; defaults to the config file's stem")
    model: str = Field("smollm2", description="'smollm2' (the shipped SmolLM2-135M) or a Hugging Face model directory")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is None or JOB_NAME.fullmatch(v):
            return v
        raise ValueError("must be 1-100 characters from A-Z a-z 0-9 . _ - starting with a letter or digit "
                         "(it names the output directory; no path separators)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N; got {v!r}")

    def default_name(self) -> str:
        """The name of a job given none (runs, directories): its kind."""
        return self.job  # type: ignore[attr-defined]

    def named(self) -> JobBase:
        """This job, with :meth:`default_name` as its name if it has none (names are not part of the hash)."""
        return self if self.name is not None else self.model_copy(update={"name": self.default_name()})

    def job_hash(self) -> str:
        """Short hash of the fields that change results (not runner/tracking/name/export), defaults left out.

        ``export`` only adds a file format of the same pruned weights: turning it on for a finished
        job resumes that job (and its MLflow run) and just writes the export.
        """
        semantic = self.model_dump(mode="json", exclude_defaults=True,
                                   exclude={"runner", "tracking", "name", "export"})
        semantic["job"] = self.job  # type: ignore[attr-defined]
        blob = json.dumps(semantic, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# A Hub revision: a branch or tag name (refs/<name> in the cache) or a commit hash; never a path out of the cache.
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


class LLMJob(JobBase):
    """The fields of the LLM jobs (one-shot, Minitron) about their input model: its dtype and Hub revision."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: the dtype the checkpoint is stored in; float32, bfloat16 or float16 casts the "
                            "input (and so the output and its perplexities) to that dtype")
    revision: str | None = Field(None, description="a Hugging Face hub id's revision in the local cache: a "
                                                   "commit hash or a ref name such as main (default: main)")

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        if v is None or (REVISION.fullmatch(v) and ".." not in v.split("/")):
            return v
        raise ValueError(f"{v!r} is not a revision: a commit hash or a ref name such as main")

    @model_validator(mode="after")
    def _revision_needs_a_hub_id(self) -> LLMJob:
        if self.revision is not None and self.model == "smollm2":
            raise ValueError("revision: pins a Hugging Face hub id (model: org/name), not the shipped smollm2")
        return self


# -- reading a config file and the checks `prune validate` makes before any work ---------------------
PREFECT_PARAMETER_LIMIT = 524_288  # prefect's server.api.max_parameter_size default (bytes of JSON)
PARAMETER_MARGIN = 4096  # room for the other flow parameter (the output directory's path)


def read_config_file(path: str | Path) -> Any:
    """The YAML document of a config file; errors name the file and what is wrong with it.

    Raises:
        ConfigError: the path does not exist, is a directory, is larger than any job config can
            be, is not UTF-8 text or is not valid YAML.
    """
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError("(file)", f"{p} is a directory, not a YAML config file")
    if not p.is_file():
        raise ConfigError("(file)", f"config file {p} does not exist")
    size, limit = p.stat().st_size, 8 * parameter_limit()
    if limit and size > limit:
        raise ConfigError("(file)", f"{p} is {size:,} bytes; a job config is at most a few KB "
                          f"(and at most {parameter_limit():,} bytes of JSON: Prefect's parameter limit)")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("(file)", f"{p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError("(file)", f"cannot read {p}: {e.strerror}") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError("(file)", f"{p}: not valid YAML: {e}") from None


def parameter_limit() -> int:
    """Prefect's limit on a flow run's JSON parameters, in bytes (0: none)."""
    raw = os.environ.get("PREFECT_SERVER_API_MAX_PARAMETER_SIZE", "")
    return int(raw) if raw.strip().isdigit() else PREFECT_PARAMETER_LIMIT


def check_parameter_size(job: JobBase, source: str = "<config>") -> None:
    """Reject a job whose JSON would exceed Prefect's flow-run parameter limit (it would fail when
    the flow run is created, with a server-side traceback); names the largest field."""
    limit = parameter_limit()
    data = job.model_dump(mode="json")
    size = len(json.dumps(data, separators=(",", ":")).encode())
    if limit and size + PARAMETER_MARGIN > limit:
        sizes = {k: len(json.dumps(v, separators=(",", ":")).encode()) for k, v in data.items()}
        field = max(sizes, key=sizes.__getitem__)
        raise ConfigError(field, f"{source}: the job is {size:,} bytes as JSON ({field}: {sizes[field]:,}); "
                          f"Prefect's flow-run parameter limit is {limit:,} bytes "
                          f"(PREFECT_SERVER_API_MAX_PARAMETER_SIZE), less {PARAMETER_MARGIN} for the output path")
