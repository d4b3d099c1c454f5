"""The one-shot job's quality sections: ``allocation`` (non-uniform sparsity, issue 16 §1) and
``recovery`` (fixed-mask distillation after pruning, issue 16 §2).

    allocation: {kind: owl, m: 5, lambda: 0.08, granularity: block}      # OWL (Yin et al. 2023)
    allocation: {kind: file, path: runs/owl70/allocation.json}          # reuse another run's
    allocation: {kind: search, generations: 30, offspring: 16, survivors: 4}   # EvoPress-style search
    recovery: {steps: 200, lr: 1e-4, windows: 64, batch_size: 4, checkpoint_every: 25}

Imports neither torch, Prefect nor MLflow (``prune validate`` stays light); the checks that
need the model (a file's units fit it) run in the job's allocation stage, before any long work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from flows.config import PositiveInt, StrictModel

SEARCH_FIELDS = frozenset({"start", "generations", "offspring", "survivors", "level_step", "max_level", "fitness",
                           "fitness_windows", "seed"})


class AllocationSection(StrictModel):
    """How the target sparsity is spread over the model: uniformly, by OWL, from a file, or by search."""

    kind: Literal["uniform", "owl", "file", "search"] = Field(
        "uniform", description="uniform (every layer at the target), owl (outlier-weighted, per block or layer), "
        "file (an allocation.json of another run on the same model) or search (EvoPress-style evolutionary "
        "search over per-unit sparsity levels, started from owl or uniform)")
    m: float = Field(5.0, gt=0, description="OWL: outlier threshold, in multiples of a unit's mean Wanda score")
    lam: float = Field(0.08, ge=0, alias="lambda",
                       description="OWL: half-width of the band [s - lambda, s + lambda] of every unit's sparsity")
    granularity: Literal["block", "layer"] = Field("block", description="owl, search: one sparsity per decoder "
                                                                        "block or per layer")
    path: str | None = Field(None, description="file: the allocation.json to reuse")
    start: Literal["owl", "uniform"] = Field("owl", description="search: the allocation it starts from (owl uses "
                                                                "m and lambda)")
    generations: PositiveInt = Field(30, description="search: generations")
    offspring: PositiveInt = Field(16, description="search: distinct mutants per generation")
    survivors: PositiveInt = Field(4, description="search: survivors of selection stage 0 (stage 1 keeps 1)")
    level_step: float = Field(0.02, gt=0, lt=1, description="search: sparsity per level (of the mean unit size)")
    max_level: PositiveInt = Field(5, description="search: levels run from -max_level to max_level")
    fitness: Literal["kl", "loss"] = Field("kl", description="search: KL(dense || pruned) or LM loss, lower is better")
    fitness_windows: tuple[PositiveInt, PositiveInt] = Field(
        (2, 8), description="search: calibration windows scoring selection stage 0 and stage 1")
    seed: int = Field(0, description="search: seeds the mutations")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _fields_match_kind(self) -> AllocationSection:
        if self.kind == "file":
            if self.path is None:
                raise ValueError("allocation.path: required for kind file (an allocation.json)")
            if not Path(self.path).is_file():
                raise ValueError(f"allocation.path: no such file {self.path!r}")
        elif self.path is not None:
            raise ValueError(f"allocation.path: only for kind file, not kind {self.kind}")
        extra = sorted(SEARCH_FIELDS & self.model_fields_set)
        if self.kind != "search" and extra:
            raise ValueError(f"allocation.{extra[0]}: only for kind search, not kind {self.kind}")
        if self.survivors > self.offspring:
            raise ValueError(f"allocation.survivors: {self.survivors} > offspring {self.offspring}")
        if self.fitness_windows[0] > self.fitness_windows[1]:
            raise ValueError(f"allocation.fitness_windows: stage 0 uses {self.fitness_windows[0]} windows, more "
                             f"than stage 1's {self.fitness_windows[1]}")
        return self

    @property
    def non_uniform(self) -> bool:
        return self.kind != "uniform"


def check_allocation(section: AllocationSection, *, unstructured: bool, scope: str, sparsity: float,
                     calibration_windows: int) -> None:
    """ValueError unless a non-uniform allocation fits the job (pattern, scope, band, fitness windows)."""
    if not section.non_uniform:
        return
    if not unstructured:
        raise ValueError(f"allocation: kind {section.kind} needs an unstructured pattern (N:M and structured "
                         "patterns fix every layer's sparsity)")
    if scope == "global":
        raise ValueError(f"allocation: kind {section.kind} needs per-layer or per-row comparison groups, not scope global")
    owl = section.kind == "owl" or (section.kind == "search" and section.start == "owl")
    if owl and not (0.0 <= sparsity - section.lam and sparsity + section.lam < 1.0):
        raise ValueError(f"allocation.lambda: the band [{sparsity - section.lam:.4f}, {sparsity + section.lam:.4f}] "
                         f"(sparsity {sparsity} ± lambda {section.lam}) must lie in [0, 1)")
    if section.kind == "search" and section.fitness_windows[1] > calibration_windows:
        raise ValueError(f"allocation.fitness_windows: {section.fitness_windows[1]} windows, the calibration has "
                         f"{calibration_windows} (calibration.num_windows)")
    if section.kind == "file":
        target = _file_target(str(section.path))
        if abs(target - sparsity) > 1e-9:
            raise ValueError(f"allocation.path: {section.path} averages {target}, the job's sparsity is {sparsity}")


def _file_target(path: str) -> float:
    """The ``target`` of an allocation.json (its units are checked against the model by the job)."""
    try:
        return float(json.loads(Path(path).read_text())["target"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"allocation.path: {path} is not an allocation.json ({exc})") from exc


class RecoverySection(StrictModel):
    """Fixed-mask logit distillation from the dense model after pruning (absent: none)."""

    steps: PositiveInt = Field(description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="peak AdamW learning rate")
    windows: PositiveInt = Field(64, description="training windows of the calibration text (calibration.window_length "
                                 "tokens each), sharing no token with the calibration windows")
    batch_size: PositiveInt = 4
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    temperature: float = Field(1.0, gt=0)
    lm_weight: float = Field(0.0, ge=0, description="weight of the next-token loss added to the KL")
    checkpoint_every: PositiveInt = Field(25, description="steps between trainer checkpoints (resume point)")
    seed: int = 0

    @model_validator(mode="after")
    def _warmup(self) -> RecoverySection:
        if self.warmup_steps > self.steps:
            raise ValueError(f"recovery.warmup_steps: {self.warmup_steps} > steps {self.steps}")
        return self


__all__ = ["SEARCH_FIELDS", "AllocationSection", "RecoverySection", "check_allocation"]
