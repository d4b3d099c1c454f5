"""The one registry of job kinds: ``kind -> (config model, flow)``, and reading job configs.

Adding a job kind is one line here plus a package ``flows/<kind>/`` with ``config.py`` (the
pydantic model, ``job: Literal["<kind>"]``), ``tasks.py`` and ``flow.py`` (a Prefect flow
``<kind>_flow(job, output_dir=None)`` whose body opens a :class:`flows.runtime.JobRun`).
Both halves are named by import path and imported on first use: ``prune validate`` imports only
the config model (no Prefect, no MLflow), ``prune run`` imports the flow of its own kind only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows.config import JobBase, check_parameter_size, read_config_file
from pruning_core.errors import ConfigError


@dataclass(frozen=True)
class JobKind:
    """Where a job kind's config model and flow live (``"module:attribute"``)."""

    config: str
    flow: str


JOBS: dict[str, JobKind] = {
    "oneshot": JobKind("flows.oneshot.config:OneShotJob", "flows.oneshot.flow:oneshot_flow"),
    "minitron": JobKind("flows.minitron.config:MinitronJob", "flows.minitron.flow:minitron_flow"),
    "lottery": JobKind("flows.lottery.config:LotteryJob", "flows.lottery.flow:lottery_flow"),
}


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def job_model(kind: str) -> type[JobBase]:
    """The config model of a job kind."""
    return _load(JOBS[kind].config)


def job_flow(kind: str) -> Any:
    """The Prefect flow of a job kind: ``flow(job, output_dir=None) -> summary``."""
    return _load(JOBS[kind].flow)


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
    if not isinstance(kind, str) or kind not in JOBS:
        raise ConfigError("job", f"{source}: unknown job kind {kind!r}; allowed: {', '.join(sorted(JOBS))}")
    try:
        return job_model(kind).model_validate(data)
    except ValidationError as e:
        first_err = e.errors()[0]
        first = ".".join(str(p) for p in first_err["loc"]) or first_err["msg"].removeprefix("Value error, ").split(":")[0]
        raise ConfigError(first, _format_errors(e, source)) from None


def load_config(path: str | Path) -> JobBase:
    """Read and validate a YAML job config; errors name the file, the field and the allowed values."""
    p = Path(path)
    data = read_config_file(p)  # ConfigError: missing, a directory, too large, not UTF-8, not YAML
    if isinstance(data, dict) and data.get("name") is None:
        data = {**data, "name": p.stem}  # validated like a given name: the stem becomes a directory name
    job = parse_config(data, str(p))
    check_parameter_size(job, str(p))
    return job


def run_job(job: JobBase, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``job`` as its kind's Prefect flow; returns the summary that is also written to summary.json.

    The output directory defaults to ``runs/<name>-<job hash>`` (:func:`flows.rundir.default_output_dir`),
    so running a config again resumes it.
    """
    from flows.rundir import default_output_dir
    from flows.runtime import configure_environment

    configure_environment()  # before Prefect is imported (no-op for what the CLI or the user already set)
    out = Path(output_dir) if output_dir is not None else default_output_dir(job)
    return job_flow(job.job)(job, str(out.resolve()))  # type: ignore[attr-defined]
