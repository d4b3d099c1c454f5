"""The allocation search as ``bench_allocation.py`` runs it: an on-disk database, KL fitness, and a
search state saved after every step (what a flow does with its task runner and run directory).

Search settings come from the row id's suffix (defaults from the command line):
``-g<generations> -o<offspring> -k<stage-0 survivors> -d<level step> -L<max level>
-f<stage-0 windows>x<stage-1 windows> -s<seed>``, and ``-u`` to start from the uniform allocation
instead of the row's OWL allocation; e.g. ``search-wanda-0.7-block-m5-l0.08-g40-d0.02-L5``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pruning_core.allocation import Allocation
from pruning_core.allocation.database import (
    CandidateAssembler,
    UnitVariant,
    build_variant,
    database_tasks,
    evaluate_candidates,
)
from pruning_core.allocation.fitness import KLFitness
from pruning_core.allocation.search import (
    LevelGrid,
    SearchConfig,
    SearchState,
    initial_state,
    nearest_levels,
    run_search,
)

SUFFIX = re.compile(r"-(g|o|k|d|L|f|s)([0-9.x]+)|-(u)")


@dataclass(frozen=True)
class SearchArgs:
    generations: int
    offspring: int
    survivors: int
    step: float
    max_level: int
    windows: tuple[int, int]
    seed: int
    uniform_start: bool = False

    @classmethod
    def parse(cls, rest: str, args: argparse.Namespace) -> SearchArgs:
        values: dict[str, Any] = {"g": args.generations, "o": args.offspring, "k": args.survivors,
                                  "d": args.level_step, "L": args.max_level, "f": args.fitness_windows,
                                  "s": args.search_seed, "u": False}
        for match in SUFFIX.finditer(rest):
            if match[3]:
                values["u"] = True
            else:
                values[match[1]] = match[2]
        windows = tuple(int(w) for w in str(values["f"]).split("x"))
        return cls(int(values["g"]), int(values["o"]), int(values["k"]), float(values["d"]), int(values["L"]),
                   (windows[0], windows[-1]), int(values["s"]), bool(values["u"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--offspring", type=int, default=16)
    parser.add_argument("--survivors", type=int, default=4, help="survivors of selection stage 0")
    parser.add_argument("--level-step", type=float, default=0.02, help="sparsity per level (equal blocks)")
    parser.add_argument("--max-level", type=int, default=5)
    parser.add_argument("--fitness-windows", default="2x8", help="calibration windows at stage 0 x stage 1")
    parser.add_argument("--search-seed", type=int, default=0)


class DiskDatabase(Mapping[tuple[int, int], UnitVariant]):
    """``(unit, level) -> UnitVariant`` stored as one safetensors file per variant (built if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: tuple[int, int]) -> Path:
        return self.root / f"u{key[0]}_l{key[1]}.safetensors"

    def put(self, key: tuple[int, int], variant: UnitVariant) -> None:
        tensors = {f"mask:{n}": m for n, m in variant.masks.items()}
        tensors.update({f"weight:{n}": w.contiguous() for n, w in variant.weights.items()})
        tmp = self.path(key).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"sparsity": repr(variant.sparsity)})
        os.replace(tmp, self.path(key))

    def __getitem__(self, key: tuple[int, int]) -> UnitVariant:
        if not self.path(key).exists():
            raise KeyError(key)
        data = load_file(str(self.path(key)))
        masks = {k.split(":", 1)[1]: v for k, v in data.items() if k.startswith("mask:")}
        weights = {k.split(":", 1)[1]: v for k, v in data.items() if k.startswith("weight:")}
        return UnitVariant(masks, weights, float("nan"))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for p in self.root.glob("u*_l*.safetensors"):
            u, lv = p.stem[1:].split("_l")
            yield int(u), int(lv)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("u*_l*.safetensors"))


def build_database(bench: Any, grid: LevelGrid, units: list, method: str, db: DiskDatabase) -> float:
    """Every missing ``(unit, level)`` variant (one-pass statistics of the dense model); seconds spent."""
    start = time.perf_counter()
    ctx = bench.stats(method == "sparsegpt") if method != "magnitude" else None
    for u, level in database_tasks(grid):
        if db.path((u, level)).exists():
            continue
        unit = units[u]
        stats = {n: ctx.require_stats(n) if ctx is not None else None for n in unit.layers}
        db.put((u, level), build_variant(unit, grid.sparsity(u, level), bench.dense, stats, method))
    return time.perf_counter() - start


def search(bench: Any, start_alloc: Allocation, method: str, sargs: SearchArgs, row_id: str) -> tuple[Allocation, dict]:
    """Run (or resume) the search; returns the best allocation and a report."""
    units = list(start_alloc.units)
    grid = LevelGrid.for_units(units, start_alloc.target, step=sargs.step, max_level=sargs.max_level)
    start = (0,) * len(units) if sargs.uniform_start else nearest_levels(grid, start_alloc.sparsities)
    config = SearchConfig(generations=sargs.generations, offspring=sargs.offspring, stages=(sargs.survivors, 1),
                          seed=sargs.seed)
    granularity = "layer" if units[0].layers == (units[0].name,) else "block"
    tag = f"{method}-{start_alloc.target}-{granularity}-{sargs.step}-{sargs.max_level}"
    db = DiskDatabase(bench.work / f"db-{tag}")
    db_s = build_database(bench, grid, units, method, db)
    fitness = KLFitness.from_model(bench.model, bench.calibration[: max(sargs.windows)], batch_size=4)
    stage_fitness = [fitness.first(w) for w in sargs.windows]
    assembler = CandidateAssembler(bench.model, units, db)

    def evaluate(cands: list, stage: int) -> list[float]:
        return evaluate_candidates(assembler, cands, stage_fitness[stage])

    state_path = bench.work / f"{row_id}.state.json"
    state = (SearchState.from_dict(json.loads(state_path.read_text())) if state_path.exists()
             else initial_state(grid, start, config))
    t0 = time.perf_counter()
    state = run_search(state, evaluate, grid, config,
                       on_state=lambda st: _save(state_path, st))
    search_s = time.perf_counter() - t0
    starts = evaluate([(0,) * len(units), start, state.parent], 1)
    assembler.restore_dense_()
    report = {"search_s": round(search_s, 1), "database_s": round(db_s, 1), "grid": grid.to_dict(),
              "config": asdict(config), "search_args": asdict(sargs), "history": state.history,
              "fitness_uniform": starts[0], "fitness_start": starts[1], "fitness_best": starts[2],
              "levels": list(state.parent)}
    return grid.allocation(units, state.parent), report


def _save(path: Path, state: SearchState) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_dict()))
    os.replace(tmp, path)


__all__ = ["DiskDatabase", "SearchArgs", "add_arguments", "build_database", "search"]
