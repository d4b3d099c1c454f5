"""The one-shot job's allocation search stage (``allocation: {kind: search}``): an EvoPress-style
evolutionary search over per-unit sparsity levels (:mod:`pruning_core.allocation.search`), run on
the job's task runner before the normal pruning.

    allocation: {kind: search, start: owl, granularity: block, generations: 30, offspring: 16,
                 survivors: 4, level_step: 0.02, max_level: 5, fitness: kl, fitness_windows: [2, 8]}

Steps (the subflow :func:`search_allocation`):

1. one-pass statistics of the dense model (the job's ``calibrate`` task; magnitude reads none);
2. ``plan-search``: the units, the level grid and the start (OWL, streamed, or uniform) snapped to
   the grid, saved as ``search/state.json`` (a rerun finds it and skips this);
3. the database, **one task per unit**: the unit pruned at every level of the grid with the job's
   method, scope and options (its weights and statistics read alone, as ``prune-layer`` does),
   saved to ``search/variants/unit_NNN.safetensors`` and recorded in the manifest;
4. the generations: each selection stage's candidates are split into one chunk per worker
   (``runner.max_workers`` threads or ``runner.n_workers`` Dask workers) and **one task per
   chunk** scores them (KL to the dense model, or LM loss, on the first ``fitness_windows[stage]``
   calibration windows); the flow gathers the fitnesses in order, advances the state and saves
   it atomically after every selection step, and logs a child MLflow run per finished generation.

Resuming: the state is saved after every selection step, so a killed job rerun with the same
config continues at the saved generation and stage; finished generations are never evaluated
again (the state is a pure function of the fitnesses, with seeded mutations), and finished
database units are not rebuilt. The ``allocate`` stage then turns the best levels into
``allocation.json`` + figure (as OWL's), which drive the per-unit pruning targets.

Memory: the database tasks hold one unit's weights and statistics. **Fitness needs the whole
model in memory**: each evaluating worker loads the dense model once (reused across generations,
:func:`_evaluator`), keeps a copy of the units' dense weights and, for KL, the dense
log-probabilities of the fitness windows (``4·n·T·vocab`` bytes), and assembles candidates in
place, rewriting only the units that changed (no model copies). With threads that is up to
``max_workers`` such models in the flow's process (dropped when the search ends); each Dask worker
holds one. Disk: ``2·max_level + 1`` variants per unit: bit-packed masks, plus the pruned weights
in the stored dtype for SparseGPT (about that many copies of the decoder weights).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.utilities.annotations import unmapped

from flows import llm
from flows.config import RunnerConfig
from flows.execution import IO_TASK, split_threads
from flows.oneshot import blocks as b
from flows.oneshot import tasks as t
from flows.oneshot.allocation import load_search, owl_of, save_search
from flows.oneshot.config import OneShotJob
from flows.oneshot.quality import AllocationSection
from flows.tracking import JOB_TAG, ROLE_TAG, Tracker
from pruning_core.allocation import Allocation, AllocationUnit, allocation_units
from pruning_core.allocation.database import (
    CandidateAssembler,
    Fitness,
    UnitVariant,
    build_variant,
    evaluate_candidates,
)
from pruning_core.allocation.fitness import KLFitness, LossFitness
from pruning_core.allocation.search import (
    LevelGrid,
    SearchConfig,
    SearchState,
    advance,
    initial_state,
    nearest_levels,
)
from pruning_core.errors import ConfigError
from pruning_core.io import paths
from pruning_core.io.manifest import Manifest
from pruning_core.io.variants import VariantStore, save_unit_variants
from pruning_core.masks import MaskScope

log = logging.getLogger(__name__)
STATE_KEY = "search_state"  # manifest entry, recorded once the search has finished
GENERATION_TAG = "pruning.generation"
METRIC = "search_best_fitness"


def search_config(section: AllocationSection) -> SearchConfig:
    """The library's :class:`SearchConfig` of a job's ``allocation`` section (two selection stages)."""
    return SearchConfig(generations=section.generations, offspring=section.offspring,
                        stages=(section.survivors, 1), seed=section.seed)


def search_done(run_dir: str) -> bool:
    """Whether the search of this run has finished (its final state is recorded)."""
    return Manifest(run_dir).is_complete(STATE_KEY)


# -- plan: units, grid, start -------------------------------------------------------------------------
def _start(job: OneShotJob, run_dir: str, inputs: dict[str, Any], units: list[AllocationUnit]) -> Allocation:
    if job.allocation.start == "uniform":
        return Allocation.uniform(units, job.target_sparsity)
    return owl_of(job, run_dir, b.reader_for(inputs["model_dir"]), units)


@task(name="plan-search", **IO_TASK)
def plan_search(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """The allocation units (as dicts); saves generation 0 (grid, start levels, first offspring)
    unless a saved search exists, which must have been made for the same units.

    Raises:
        ConfigError: a pruned layer outside every unit, or a saved search for other units.
    """
    reader = b.reader_for(inputs["model_dir"])
    units = allocation_units(reader.template(reader.stored_dtype), job.allocation.granularity)
    covered = {name for u in units for name in u.layers}
    missing = [name for name in inputs["layers"] if name not in covered]
    if missing:
        raise ConfigError("allocation", f"no allocation unit holds layers {missing[:3]} ({len(missing)} in all)")
    sizes = tuple(u.num_params for u in units)
    saved = load_search(run_dir)
    if saved is None:
        section = job.allocation
        grid = LevelGrid.for_units(units, job.target_sparsity, step=section.level_step, max_level=section.max_level)
        start = nearest_levels(grid, _start(job, run_dir, inputs, units).sparsities)
        save_search(run_dir, grid, start, initial_state(grid, start, search_config(section)))
    elif saved[0].sizes != sizes:
        raise ConfigError("allocation", f"{paths.search_state(run_dir)} was made for {len(saved[0].sizes)} units "
                                        f"of other sizes than the model's {len(sizes)}")
    return [u.to_dict() for u in units]


# -- the database: one task per unit ------------------------------------------------------------------
@task(name="search-database", task_run_name="search-database-{index}", **IO_TASK)
def build_unit_variants(job: OneShotJob, run_dir: str, model_dir: str, index: int, unit: dict[str, Any],
                        stats: dict[str, str | None]) -> str:
    """Unit ``index`` pruned at every level of the grid from the dense weights and one-pass
    statistics, with the job's method, scope and options (as the prune tasks would prune it at that
    sparsity); saved in one file and recorded. Returns the file."""
    key, out = f"search_variants:{index}", paths.search_variants(run_dir, index)
    if Manifest(run_dir).is_complete(key):
        return str(out)
    grid, unit_ = load_search(run_dir)[0], AllocationUnit.from_dict(unit)
    read = {name: t.layer_inputs(job, run_dir, model_dir, name, stats) for name in unit_.layers}
    weights, stats_ = {n: w for n, (w, _) in read.items()}, {n: s for n, (_, s) in read.items()}
    dtype = b.reader_for(model_dir).stored_dtype

    def prune(name: str, weight: Any, layer_stats: Any, sparsity: float) -> Any:
        return t.prune_one(job, weight, layer_stats, name=name, allocation={name: sparsity})

    variants = {}
    for level in grid.levels(index):
        v = build_variant(unit_, grid.sparsity(index, level), weights, stats_, job.method,
                          scope=MaskScope(job.mask_scope), prune=prune)
        variants[level] = UnitVariant(v.masks, {n: w.to(dtype) for n, w in v.weights.items()}, v.sparsity)
    save_unit_variants(out, variants, {"job_hash": job.job_hash(), "unit": unit_.name})
    Manifest(run_dir).record(key, out, kind="variants")
    return str(out)


# -- candidate evaluation: one task per chunk of a selection stage --------------------------------------
@dataclass
class _Evaluator:
    """One whole model with an assembler over the database and the fitness of each selection stage."""

    assembler: CandidateAssembler
    fitness: list[Fitness]


_POOL: dict[tuple[str, str], list[_Evaluator]] = {}
_POOL_LOCK = threading.Lock()


def _new_evaluator(job: OneShotJob, run_dir: str, model_dir: str) -> _Evaluator:
    model, _ = llm.load_model(model_dir, job.device)
    units = allocation_units(model, job.allocation.granularity)
    counts = job.allocation.fitness_windows
    windows = llm.load_windows(run_dir, "calibration")[: max(counts)]
    batch = job.calibration.batch_size
    full = (KLFitness.from_model(model, windows, batch_size=batch) if job.allocation.fitness == "kl"
            else LossFitness(windows, batch))
    store = VariantStore([paths.search_variants(run_dir, u) for u in range(len(units))])
    return _Evaluator(CandidateAssembler(model, units, store), [full.first(n) for n in counts])


@contextlib.contextmanager
def _evaluator(job: OneShotJob, run_dir: str, model_dir: str) -> Iterator[_Evaluator]:
    """A free evaluator of this process (built on first use: one per concurrent task), given back after."""
    key = (run_dir, model_dir)
    with _POOL_LOCK:
        free = _POOL.setdefault(key, [])
        evaluator = free.pop() if free else None
    evaluator = evaluator or _new_evaluator(job, run_dir, model_dir)
    try:
        yield evaluator
    finally:
        with _POOL_LOCK:
            _POOL.setdefault(key, []).append(evaluator)


def release_evaluators(run_dir: str) -> None:
    """Drop this process's evaluators (their models) of ``run_dir``."""
    with _POOL_LOCK:
        for key in [k for k in _POOL if k[0] == run_dir]:
            del _POOL[key]


def _evaluate_chunk(job: OneShotJob, run_dir: str, model_dir: str, generation: int, stage: int,
                    candidates: list[list[int]]) -> list[float]:
    with _evaluator(job, run_dir, model_dir) as ev:
        return evaluate_candidates(ev.assembler, [tuple(c) for c in candidates], ev.fitness[stage])


@task(name="search-evaluate", task_run_name="search-g{generation}-s{stage}-{chunk}", **IO_TASK)
def evaluate_chunk(job: OneShotJob, run_dir: str, model_dir: str, generation: int, stage: int, chunk: int,
                   candidates: list[list[int]]) -> list[float]:
    """Fitness of each candidate of a chunk (lower is better), assembled in turn in this worker's model."""
    return _evaluate_chunk(job, run_dir, model_dir, generation, stage, candidates)


def _workers(runner: RunnerConfig) -> int:
    return runner.max_workers if runner.kind == "threads" else runner.n_workers


def chunks(items: Sequence[Any], n: int) -> list[list[Any]]:
    """``items`` in at most ``n`` contiguous, near-equal chunks (none empty), in order."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [list(items[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def _evaluate_pending(job: OneShotJob, run_dir: str, model_dir: str, state: SearchState) -> list[float]:
    parts = chunks([list(c) for c in state.pending], _workers(job.runner))
    futures = evaluate_chunk.map(unmapped(job), unmapped(run_dir), unmapped(model_dir), unmapped(state.generation),
                                 unmapped(state.stage), list(range(len(parts))), parts)
    return [fit for future in futures for fit in future.result()]


# -- MLflow: a child run per generation -------------------------------------------------------------------
@task(name="log-generation", task_run_name="log-generation-{generation}", **IO_TASK)
def log_generation(job: OneShotJob, parent_run_id: str, generation: int, fitness: float) -> str:
    """A child run of the job's run for a finished generation (its best fitness), once; and the
    point ``search_best_fitness`` at step ``generation`` on the parent run."""
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)
    identity = {JOB_TAG: job.job_hash(), ROLE_TAG: "search-generation", GENERATION_TAG: str(generation)}

    def fill(child: str) -> None:
        tracker.log_params(child, {"generation": generation, "fitness": job.allocation.fitness})
        tracker.log_metrics_once(child, [("best_fitness", fitness, generation)])
        tracker.log_metrics_once(parent_run_id, [(METRIC, fitness, generation)])

    return tracker.log_child_once(parent_run_id, identity, f"generation-{generation}", fill)


# -- the stage -----------------------------------------------------------------------------------------
def _run_generations(job: OneShotJob, run_dir: str, model_dir: str, run_id: str) -> SearchState:
    """Step the saved search until done, saving the state after every selection step."""
    grid, start, state = load_search(run_dir)
    config = search_config(job.allocation)
    for generation, fitness in state.history:  # a crash may have come between saving and logging
        log_generation(job, run_id, generation, fitness)
    if state.pending:
        log.info("allocation search: generation %d of %d, stage %d", state.generation, config.generations, state.stage)
    while state.pending:
        fitnesses = _evaluate_pending(job, run_dir, model_dir, state)
        new = advance(state, fitnesses, grid, config)
        save_search(run_dir, grid, start, new)
        if new.generation > state.generation:
            log.info("allocation search: generation %d, best fitness %.6g", new.generation, new.parent_fitness)
            log_generation(job, run_id, new.generation, new.parent_fitness)
        state = new
    return state


@flow(name="allocation-search")
def search_allocation(job: OneShotJob, run_dir: str, inputs: dict[str, Any], run_id: str) -> None:
    """Calibrate (one pass), plan, build the database (a task per unit) and run the generations (a
    task per chunk of candidates) on this subflow's task runner; records the finished state."""
    if search_done(run_dir):
        return
    stats: dict[str, str | None] = {"stats": None, "hessians": None}
    if t.needs_stats(job)[0]:
        stats = t.calibrate(job, run_dir, inputs)
    units = plan_search(job, run_dir, inputs)
    model_dir = inputs["model_dir"]
    with split_threads(job.runner):
        build_unit_variants.map(unmapped(job), unmapped(run_dir), unmapped(model_dir), list(range(len(units))),
                                units, unmapped(stats)).result()
        try:
            _run_generations(job, run_dir, model_dir, run_id)
        finally:
            release_evaluators(run_dir)
    Manifest(run_dir).record(STATE_KEY, paths.search_state(run_dir), kind="json")


__all__ = ["build_unit_variants", "chunks", "evaluate_chunk", "log_generation", "plan_search", "release_evaluators",
           "search_allocation", "search_config", "search_done"]
