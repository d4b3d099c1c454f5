"""Prefect artifacts every job leaves on its flow run: a markdown summary and a summary table.

The markdown says what the job did (the headline numbers, rounded), where the output is, one line
of Python that loads it, the registered MLflow model and how to open MLflow on this store; the
table holds the summary's scalar fields. Job kinds add their own tables (one-shot: the per-layer
table, :func:`layer_table`; Minitron: candidates; Lottery: rounds). Artifact keys are
``<kind>-<job hash>-...`` (lowercase letters, digits and dashes, as Prefect requires).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flows.config import JobBase

MAX_CELL = 200


def artifact_key(job: JobBase, what: str) -> str:
    return f"{job.job}-{job.job_hash()}-{what}"  # type: ignore[attr-defined]


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return value if not isinstance(value, str) or len(value) <= MAX_CELL else value[: MAX_CELL - 3] + "..."


def summary_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{field, value}`` rows of the summary's scalar fields (lists and mappings left to their own tables)."""
    return [{"field": k, "value": _cell(v)} for k, v in summary.items()
            if v is None or isinstance(v, str | int | float | bool)]


def summary_markdown(title: str, lines: str) -> str:
    """The closing lines of a run (:meth:`flows.runtime.JobRun.closing_lines`) as markdown."""
    head, *rest = lines.splitlines()
    items = [line.strip().partition(":") for line in rest]
    body = "\n".join(f"- **{label}:** `{value.strip()}`" for label, _, value in items)
    return f"# {title}\n\n**{head}**\n\n{body}\n"


def publish_summary(job: JobBase, summary: Mapping[str, Any], lines: str) -> None:
    """The markdown and table artifacts of a finished job (inside its flow run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(summary_markdown(f"{job.job} job {job.name}", lines),  # type: ignore[attr-defined]
                             key=artifact_key(job, "summary"), description=f"what job {job.name} produced")
    create_table_artifact(summary_rows(summary), key=artifact_key(job, "summary-table"),
                          description=f"summary.json of job {job.name} (scalar fields)")


def layer_table(job: JobBase, layers: Sequence[Mapping[str, Any]]) -> None:
    """The one-shot per-layer table (name, module type, shape, sparsity, reconstruction error)."""
    from prefect.artifacts import create_table_artifact

    from flows.report import module_type

    rows = [{"layer": r["name"], "type": module_type(str(r["name"])), "shape": "x".join(map(str, r["shape"])),
             "sparsity": _cell(float(r["sparsity"])), "reconstruction_error": _cell(r.get("reconstruction_error"))}
            for r in layers]
    create_table_artifact(rows, key=artifact_key(job, "layers"), description="per-layer sparsity and output error")


__all__ = ["artifact_key", "layer_table", "publish_summary", "summary_markdown", "summary_rows"]
