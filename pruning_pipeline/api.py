"""``oneshot``, ``minitron`` and ``lottery``: build a job like its YAML and run it like ``prune run``.

A keyword argument is a top-level key of the job's YAML (``calibration={"num_windows": 32}``,
``runner={"kind": "dask_local"}``, ``tracking={"experiment": "mine"}``, ``name="wanda-50"``,
``device="cpu"``, ...). Sections may be dicts or the config model's section objects. Everything
goes through :func:`flows.jobs.parse_config`, so an unknown or invalid option raises the same
:class:`~pruning_core.errors.ConfigError` (naming the field) as the YAML would, before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flows.config import JobBase
from flows.jobs import parse_config, run_job
from flows.lottery.config import LotteryJob
from flows.minitron.config import MinitronJob
from flows.oneshot.config import OneShotJob
from pruning_core.masks.pattern import NM, SparsityPattern

DEFAULT_SPARSITY = 0.5


def _plain(value: Any) -> Any:
    """A section given as a config object becomes the mapping its YAML would hold."""
    return value.model_dump(mode="json", exclude_unset=True) if isinstance(value, BaseModel) else value


def _build(kind: str, fields: dict[str, Any]) -> JobBase:
    data = {"job": kind, **{k: _plain(v) for k, v in fields.items() if v is not None}}
    return parse_config(data, f"{kind}()")


def _is_nm(pattern: str) -> bool:
    try:
        return isinstance(SparsityPattern.parse(pattern), NM)
    except Exception:  # noqa: BLE001 - an invalid pattern is reported by the config model, naming the field
        return False


def oneshot_job(model: str = "smollm2", method: str = "wanda", sparsity: float | None = None,
                pattern: str = "unstructured", **options: Any) -> OneShotJob:
    """The validated one-shot job these arguments describe (nothing runs).

    Args:
        model: ``"smollm2"`` (the shipped SmolLM2-135M) or a Hugging Face model directory.
        method: ``magnitude``, ``wanda`` or ``sparsegpt``.
        sparsity: fraction pruned; default 0.5, or the one an N:M pattern implies (2:4 -> 0.5).
        pattern: ``unstructured``, ``N:M``, ``block:HxW``, ``row`` or ``column``.
        **options: any other top-level key of the one-shot YAML (``scope``, ``calibration``,
            ``evaluation``, ``sparsegpt``, ``export``, ``runner``, ``tracking``, ``name``, ``device``).

    Raises:
        ConfigError: an unknown option or an invalid value, naming the field (as for the YAML).
    """
    if sparsity is None and not _is_nm(pattern):
        sparsity = DEFAULT_SPARSITY
    job = _build("oneshot", {"model": model, "method": method, "sparsity": sparsity, "pattern": pattern, **options})
    assert isinstance(job, OneShotJob)
    return job


def minitron_job(model: str = "smollm2", target: dict[str, Any] | BaseModel | None = None,
                 **options: Any) -> MinitronJob:
    """The validated Minitron job these arguments describe (nothing runs).

    Args:
        model: ``"smollm2"`` or a Hugging Face model directory.
        target: the ``target`` section (required): ``{"param_fraction": 0.8}``, ``{"layers": [24]}``,
            ``{"ffn": [768], "heads": [6]}``, ...
        **options: any other top-level key of the Minitron YAML (``depth_criterion``,
            ``divisibility``, ``importance``, ``distillation``, ``calibration``, ``evaluation``, ...).
    """
    job = _build("minitron", {"model": model, "target": target, **options})
    assert isinstance(job, MinitronJob)
    return job


def lottery_job(model: str = "lenet300_100", **options: Any) -> LotteryJob:
    """The validated Lottery Ticket job these arguments describe (nothing runs).

    Args:
        model: ``lenet300_100`` or ``conv2``.
        **options: any other top-level key of the Lottery YAML (``search``, ``training``, ``data``,
            ``controls``, ``registry``, ``runner``, ``tracking``, ``name``, ``device``).
    """
    job = _build("lottery", {"model": model, **options})
    assert isinstance(job, LotteryJob)
    return job


def _load(job: JobBase, summary: dict[str, Any]) -> Any:
    """The job's output, loaded: ``(model, tokenizer)`` for LLM jobs, ``(model, ticket)`` for Lottery."""
    if isinstance(job, LotteryJob):
        from flows.lottery import load_ticket_model

        return load_ticket_model(summary["ticket_path"], job.model)
    from pruning_core.lm import load_causal_lm

    return load_causal_lm(summary.get("pruned_model_dir") or summary["chosen_model_dir"])


def run(job: JobBase, output_dir: str | Path | None = None, *, return_model: bool = False) -> Any:
    """Run a validated job as ``prune run`` does; the summary (also ``summary.json``), and with
    ``return_model`` the loaded output as well: ``(summary, loaded)``.

    ``output_dir`` defaults to ``runs/<name>-<job hash>``, so calling again with the same
    arguments resumes (or just returns) the finished job.
    """
    summary = run_job(job, output_dir)
    return (summary, _load(job, summary)) if return_model else summary


def oneshot(model: str = "smollm2", method: str = "wanda", sparsity: float | None = None,
            pattern: str = "unstructured", *, output_dir: str | Path | None = None, return_model: bool = False,
            **options: Any) -> Any:
    """Prune ``model`` one-shot (:func:`oneshot_job` for the arguments) and return the summary;
    with ``return_model=True``: ``(summary, (model, tokenizer))``."""
    return run(oneshot_job(model, method, sparsity, pattern, **options), output_dir, return_model=return_model)


def minitron(model: str = "smollm2", target: dict[str, Any] | BaseModel | None = None, *,
             output_dir: str | Path | None = None, return_model: bool = False, **options: Any) -> Any:
    """Search smaller architectures of ``model`` (:func:`minitron_job`) and return the summary;
    with ``return_model=True``: ``(summary, (model, tokenizer))`` of the chosen candidate."""
    return run(minitron_job(model, target, **options), output_dir, return_model=return_model)


def lottery(model: str = "lenet300_100", *, output_dir: str | Path | None = None, return_model: bool = False,
            **options: Any) -> Any:
    """Run the Lottery Ticket search (:func:`lottery_job`) and return the summary; with
    ``return_model=True``: ``(summary, (model, ticket))`` of the winning ticket."""
    return run(lottery_job(model, **options), output_dir, return_model=return_model)


__all__ = ["lottery", "lottery_job", "minitron", "minitron_job", "oneshot", "oneshot_job", "run"]
