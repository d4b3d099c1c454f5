"""The one-shot job's allocation stage: per-unit sparsities (OWL, a file of another run, or the
allocation search's result) before pruning.

    allocation: {kind: owl, m: 5, lambda: 0.08, granularity: block}
    allocation: {kind: file, path: runs/owl70-1a2b3c/allocation.json}
    allocation: {kind: search, generations: 30, offspring: 16}   # flows.oneshot.search runs it first

OWL (Yin et al. 2023, :mod:`pruning_core.allocation.owl`) needs the dense model's one-pass
statistics; they are collected here *streaming*, one decoder block in memory at a time
(:func:`pruning_core.lm.stream.calibrate_blocks` with
:class:`pruning_core.lm.unit_stats.UnitStatistics`): each block's outlier ratios are computed as
soon as the block has run on every calibration window, and its statistics are dropped.

Outputs in the run directory (recorded in the manifest, so a resumed job reuses them):
``allocation.json`` (:meth:`Allocation.to_dict`, reusable by ``kind: file`` on the same model),
``allocation_targets.json`` (each layer's sparsity rounded to this job's comparison groups:
:func:`pruning_core.allocation.shape_targets`) and ``allocation.png``. The prune tasks read the
targets through :func:`allocation_targets` and :func:`layer_target`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import task

from flows import llm
from flows.execution import IO_TASK
from flows.oneshot.config import OneShotJob
from flows.tracking import Tracker
from pruning_core.allocation import (
    Allocation,
    allocation_from_ratios,
    allocation_units,
    shape_targets,
    unit_outlier_ratios,
)
from pruning_core.allocation.search import LevelGrid, Levels, SearchState
from pruning_core.errors import ArtifactError, ConfigError
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_path, atomic_write_text
from pruning_core.io.manifest import Manifest
from pruning_core.lm.checkpoint import CheckpointReader
from pruning_core.lm.stream import LayerStream, calibrate_blocks
from pruning_core.lm.unit_stats import UnitStatistics
from pruning_core.masks import MaskScope
from pruning_core.pruning.model import target_units

_KEYS = ("allocation", "allocation_targets", "allocation_figure")


# -- what the prune tasks call --------------------------------------------------------------------
def allocation_targets(job: OneShotJob, run_dir: str) -> str | None:
    """The run's ``allocation_targets.json`` for a non-uniform job, None for a uniform one.

    Raises:
        ArtifactError: the job has a non-uniform allocation but the stage has not recorded it.
    """
    if not job.allocation.non_uniform:
        return None
    if not Manifest(run_dir).is_complete("allocation_targets"):
        raise ArtifactError(str(paths.allocation_targets(run_dir)), "the allocation stage has not finished")
    return str(paths.allocation_targets(run_dir))


def layer_target(allocation: str | Mapping[str, float], name: str) -> float:
    """The sparsity of layer ``name``: from an ``allocation_targets.json`` path or a ``{layer: s}`` map.

    Raises:
        ConfigError: the allocation has no sparsity for ``name``.
    """
    targets = allocation if isinstance(allocation, Mapping) else json.loads(Path(allocation).read_text())["targets"]
    if name not in targets:
        raise ConfigError("allocation", f"no sparsity for layer {name!r} ({len(targets)} layers allocated)")
    return float(targets[name])


# -- computing and reusing allocations ----------------------------------------------------------------
def owl_of(job: OneShotJob, run_dir: str, reader: CheckpointReader, units: list[Any]) -> Allocation:
    """OWL from the dense model's one-pass statistics, one decoder block in memory at a time."""
    windows = llm.load_windows(run_dir, "calibration")
    stream = LayerStream(reader, windows, batch_size=job.calibration.batch_size, device=job.device, head=False,
                         progress=False)
    stats = UnitStatistics(dataset=job.calibration.text)
    by_block = {i: [u for u in units if u.layers[0].startswith(f"{reader.block_prefix}.{i}.")]
                for i in range(reader.num_blocks)}

    def finish(i: int, block: Any) -> list[float]:
        return unit_outlier_ratios(block, stats.pop(i), by_block[i], job.allocation.m,
                                   prefix=f"{reader.block_prefix}.{i}.")

    records = calibrate_blocks(stream, finish, observe=stats, sequential=False)
    ratios = {u.name: r for i in range(reader.num_blocks) for u, r in zip(by_block[i], records[i], strict=True)}
    return allocation_from_ratios(units, ratios, job.target_sparsity, job.allocation.lam)


def file_of(job: OneShotJob, template: Any) -> Allocation:
    """The allocation in ``allocation.path``, checked against this model's units (blocks or layers,
    as the file has them) and this job's target sparsity.

    Raises:
        ArtifactError: not an allocation.json; ConfigError: other units, or another target.
    """
    path = str(job.allocation.path)
    try:
        allocation = Allocation.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(path, f"not an allocation.json ({exc})") from exc
    per_layer = all(u.layers == (u.name,) for u in allocation.units)
    allocation.check_units(allocation_units(template, "layer" if per_layer else "block"))
    if abs(allocation.target - job.target_sparsity) > 1e-9:
        raise ConfigError("allocation.path", f"{path} averages {allocation.target}, the job's sparsity is "
                                             f"{job.target_sparsity}")
    return allocation


def save_search(run_dir: str, grid: LevelGrid, start: Levels, state: SearchState) -> None:
    """The allocation search's grid, start levels and state, atomically (``search/state.json``)."""
    data = {"grid": grid.to_dict(), "start": list(start), "state": state.to_dict()}
    atomic_write_text(paths.search_state(run_dir), json.dumps(data))


def load_search(run_dir: str) -> tuple[LevelGrid, Levels, SearchState] | None:
    """``(grid, start levels, state)`` saved by :func:`save_search`; None if there is none yet.

    Raises:
        ArtifactError: the file is not a search state.
    """
    file = paths.search_state(run_dir)
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        return LevelGrid.from_dict(data["grid"]), tuple(int(x) for x in data["start"]), SearchState.from_dict(data["state"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(str(file), f"not an allocation search state ({exc})") from exc


def searched_of(job: OneShotJob, run_dir: str, template: Any) -> Allocation:
    """The best allocation of the finished search (:mod:`flows.oneshot.search`) on this model's units.

    Raises:
        ArtifactError: no search state, or the search has not finished.
    """
    saved = load_search(run_dir)
    if saved is None or saved[2].pending:
        done = "no search state" if saved is None else f"generation {saved[2].generation} of {job.allocation.generations}"
        raise ArtifactError(str(paths.search_state(run_dir)), f"the allocation search has not finished ({done})")
    grid, _, state = saved
    return grid.allocation(allocation_units(template, job.allocation.granularity), state.parent, "search")


def _shapes(reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    template = reader.template(reader.stored_dtype)  # meta device: shapes only, no memory
    return {name: tuple(unit.read(template).shape) for name, unit in target_units(template).items()}


def allocation_figure(allocation: Allocation, title: str) -> Any:
    """Sparsity of every unit versus depth (bars), the target (dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [u.name.removeprefix("model.") for u in allocation.units]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.08 * len(names)), 4.0), constrained_layout=True)
    ax.bar(range(len(names)), allocation.sparsities, color="tab:blue", alpha=0.7, label="unit sparsity")
    ax.axhline(allocation.target, color="tab:red", ls="--", label=f"target {allocation.target:g}")
    step = max(1, len(names) // 30)
    ax.set_xticks(list(range(len(names)))[::step], names[::step], rotation=90, fontsize=6)
    ax.set_xlabel("unit (depth order)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title)
    return fig


def _save(job: OneShotJob, run_dir: str, allocation: Allocation, targets: dict[str, float]) -> None:
    atomic_write_text(paths.allocation(run_dir), json.dumps(allocation.to_dict(), indent=1))
    atomic_write_text(paths.allocation_targets(run_dir),
                      json.dumps({"scope": job.mask_scope, "targets": targets}, indent=1))
    fig = allocation_figure(allocation, f"{job.name}: {allocation.source} allocation, mean {allocation.mean:.4f}")
    with atomic_path(paths.allocation_figure(run_dir)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    manifest = Manifest(run_dir)
    manifest.record("allocation", paths.allocation(run_dir), kind="json")
    manifest.record("allocation_targets", paths.allocation_targets(run_dir), kind="json")
    manifest.record("allocation_figure", paths.allocation_figure(run_dir), kind="figure")


def allocation_summary(job: OneShotJob, run_dir: str) -> dict[str, Any]:
    """``{"allocation": ...}`` for summary.json: kind, mean/min/max unit sparsity, file (None if uniform)."""
    if not job.allocation.non_uniform:
        return {"allocation": None}
    data = json.loads(paths.allocation(run_dir).read_text())
    out = {"kind": job.allocation.kind, "source": data["source"], "units": len(data["units"]), "mean": data["mean"],
           "min": min(data["sparsities"]), "max": max(data["sparsities"]), "path": str(paths.allocation(run_dir))}
    saved = load_search(run_dir) if job.allocation.kind == "search" else None
    if saved is not None:
        out["search"] = {"generations": saved[2].generation, "best_fitness": saved[2].parent_fitness,
                         "levels": list(saved[2].parent), "state": str(paths.search_state(run_dir))}
    return {"allocation": out}


@task(name="allocate", **IO_TASK)
def allocate(job: OneShotJob, run_dir: str, inputs: dict[str, Any], run_id: str) -> str | None:
    """Compute (OWL) or load (file, or the finished search's state) the allocation, save it with its
    per-layer targets and figure, log both to the job's MLflow run; returns ``allocation_targets.json``
    (None: uniform job)."""
    if not job.allocation.non_uniform:
        return None
    if not all(Manifest(run_dir).is_complete(k) for k in _KEYS):
        reader = CheckpointReader(inputs["model_dir"])
        template = reader.template(reader.stored_dtype)
        if job.allocation.kind == "owl":
            allocation = owl_of(job, run_dir, reader, allocation_units(template, job.allocation.granularity))
        elif job.allocation.kind == "search":
            allocation = searched_of(job, run_dir, template)
        else:
            allocation = file_of(job, template)
        targets = shape_targets(allocation, _shapes(reader), MaskScope(job.mask_scope))
        missing = [name for name in inputs["layers"] if name not in targets]
        if missing:  # e.g. a pruned layer outside the decoder blocks: refuse before pruning
            raise ConfigError("allocation", f"no allocated sparsity for layers {missing[:3]} ({len(missing)} in all)")
        _save(job, run_dir, allocation, targets)
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)
    for key, name in (("allocation", "allocation.json"), ("allocation_figure", "allocation.png")):
        if not tracker.has_artifact(run_id, f"allocation/{name}"):
            tracker.log_artifact(run_id, Manifest(run_dir).path(key), "allocation")
    return allocation_targets(job, run_dir)


__all__ = ["allocate", "allocation_figure", "allocation_summary", "allocation_targets", "file_of", "layer_target",
           "load_search", "owl_of", "save_search", "searched_of"]
