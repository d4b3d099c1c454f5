"""Job configurations: YAML files validated by pydantic, one model per job kind.

Unknown keys are rejected and every error names the field and the allowed values. A job's
identity (``job_hash``) is a hash of its semantic fields only (not where it runs or how it is
tracked) and leaves out fields still at their default, so adding a new option with a default
does not change the identity of existing jobs (open_lth's hashname idea).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pruning_core.errors import ConfigError
from pruning_core.masks.pattern import NM, SparsityPattern, Unstructured

PositiveInt = Annotated[int, Field(gt=0)]
# A job name becomes a directory name (runs/<name>-<hash>) and an MLflow run name: one path
# component, no separators, no leading dot (so never '.', '..' or a hidden file), at most 100 chars.
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class StrictModel(BaseModel):
    """Frozen, and rejects unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(StrictModel):
    """Calibration data: ``num_windows`` random windows of ``window_length`` tokens, drawn with ``seed``."""

    text: str = Field("emma", description="a shipped text (emma, pride_and_prejudice) or a .txt/.txt.gz/.jsonl/.parquet path")
    text_field: str = Field("text", description="field (JSONL) or column (Parquet) holding the text")
    num_windows: PositiveInt = 64
    window_length: PositiveInt = 256
    seed: int = 0
    batch_size: PositiveInt = 8
    mode: Literal["one_pass", "sequential"] = Field(
        "one_pass",
        description="one_pass: statistics of the dense model; sequential: prune block i, then feed block i+1 "
        "with the pruned block's outputs (the Wanda/SparseGPT reference procedure)",
    )


class EvaluationConfig(StrictModel):
    """Held-out perplexity: the first ``num_windows`` x ``window_length`` tokens, non-overlapping."""

    enabled: bool = True
    text: str = "pride_and_prejudice"
    text_field: str = "text"
    num_windows: PositiveInt = 64
    window_length: PositiveInt = 256
    batch_size: PositiveInt = 8
    error_windows: PositiveInt = Field(
        8, description="calibration windows on which each layer's output reconstruction error is measured"
    )


class SparseGPTConfig(StrictModel):
    blocksize: PositiveInt = 128
    percdamp: float = Field(0.01, gt=0, le=1)


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


class ExportConfig(StrictModel):
    """Optional sparse export of the pruned weights to ``<output dir>/sparse/``."""

    sparse_format: Literal["none", "csr", "semi_structured", "compressed_tensors"] = Field(
        "none",
        description="csr (any pattern), semi_structured (2:4: values + 2-bit indices) or compressed_tensors "
        "(2:4: compressed-tensors' sparse-24-bitmask Hugging Face layout)",
    )


class JobBase(StrictModel):
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


class OneShotJob(JobBase):
    """One-shot unstructured or N:M pruning of a causal LM (magnitude, Wanda, SparseGPT)."""

    job: Literal["oneshot"] = "oneshot"
    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction pruned, in [0, 1); implied by N:M")
    pattern: str = Field("unstructured", description="unstructured, N:M (e.g. 2:4), block:HxW, row or column")
    scope: Literal["layer", "row", "global"] | None = Field(
        None, description="comparison group for unstructured masks; default row for wanda, layer otherwise"
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    sparsegpt: SparseGPTConfig = Field(default_factory=SparseGPTConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            return str(SparsityPattern.parse(v))
        except Exception as e:  # InvalidPattern -> pydantic error naming the field
            raise ValueError(str(e)) from e

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> OneShotJob:
        pattern = self.sparsity_pattern
        implied = pattern.theoretical_sparsity()
        if isinstance(pattern, NM):
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"sparsity: pattern {pattern} fixes it at {implied}; got {self.sparsity}")
        elif self.sparsity is None:
            raise ValueError(f"sparsity: required for pattern {pattern} (a fraction in [0, 1))")
        if self.scope is not None and not isinstance(pattern, Unstructured):
            raise ValueError(f"scope: applies to unstructured masks only, not pattern {pattern}")
        if self.method == "sparsegpt" and pattern.theoretical_sparsity() is None and str(pattern) != "unstructured":
            raise ValueError(f"pattern: sparsegpt supports unstructured and N:M patterns, not {pattern}")
        if self.method == "sparsegpt" and self.scope not in (None, "layer"):
            raise ValueError(f"scope: sparsegpt selects within column blocks of each layer; scope {self.scope} "
                             "is not supported (allowed: layer)")
        if self.scope == "global" and self.calibration.mode == "sequential":
            raise ValueError("scope: global needs every layer's scores at once; use calibration mode one_pass")
        fmt = self.export.sparse_format
        if fmt in ("semi_structured", "compressed_tensors") and str(pattern) != "2:4":
            raise ValueError(f"export.sparse_format: {fmt} stores 2:4 sparsity only; pattern is {pattern} "
                             "(use pattern 2:4, or sparse_format csr or none)")
        return self

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern)

    @property
    def target_sparsity(self) -> float:
        implied = self.sparsity_pattern.theoretical_sparsity()
        return float(self.sparsity if self.sparsity is not None else implied)

    @property
    def mask_scope(self) -> str:
        return self.scope or ("row" if self.method == "wanda" else "layer")


# job kind -> "module:ConfigModel", imported on first use so a config only loads its own flow's code.
JOB_KINDS: dict[str, str] = {
    "oneshot": "flows.config:OneShotJob",
    "minitron": "flows.minitron:MinitronJob",
    "lottery": "flows.lottery:LotteryJob",
}


def job_model(kind: str) -> type[JobBase]:
    """The config model of a job kind."""
    module, _, attr = JOB_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in e["loc"])
        if not loc:  # a cross-field check: its message starts with the field it is about
            loc, _, msg = msg.partition(": ")
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"  {loc}: {msg}{got}")
    return f"{source}: invalid config\n" + "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> JobBase:
    """Validate a mapping into the job model its ``job`` key names (default: oneshot)."""
    if not isinstance(data, dict):
        raise ConfigError("(top level)", f"{source}: expected a mapping, got {type(data).__name__}")
    kind = data.get("job", "oneshot")
    if kind not in JOB_KINDS:
        raise ConfigError("job", f"{source}: unknown job kind {kind!r}; allowed: {', '.join(sorted(JOB_KINDS))}")
    try:
        return job_model(kind).model_validate(data)
    except ValidationError as e:
        first_err = e.errors()[0]
        first = ".".join(str(p) for p in first_err["loc"]) or first_err["msg"].removeprefix("Value error, ").split(":")[0]
        raise ConfigError(first, _format_errors(e, source)) from None


def load_config(path: str | Path) -> JobBase:
    """Read and validate a YAML job config; errors name the file, the field and the allowed values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("(file)", f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("(file)", f"{p}: not valid YAML: {e}") from None
    if isinstance(data, dict) and data.get("name") is None:
        data = {**data, "name": p.stem}  # validated like a given name: the stem becomes a directory name
    return parse_config(data, str(p))
