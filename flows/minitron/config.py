"""Minitron architecture search jobs (``job: minitron``): the config model and its helpers.

A minitron YAML config names a **target** (a parameter budget, absolute or as a fraction of the
dense model, and/or explicit values per axis: layers, hidden, ffn, heads, kv_groups), the
divisors sizes must respect, how layers are chosen for removal (``depth_criterion``), how width
importance is aggregated, how many candidates to score, an optional short distillation, the
calibration and evaluation text, runner and tracking. Pydantic checks the shape (types, unknown
keys); the values go through the library's own configs (:class:`MinitronTarget`,
:class:`WidthImportanceConfig`, :class:`Architecture`), and their errors are reported with the
field's YAML path. What needs the model (sizes above the original, more layers than exist) is
checked by the flow's first task, before any long work, with the same field names.

Without a parameter budget an axis left out keeps the dense model's value (``ffn: 768`` alone
halves the MLP and changes nothing else); with a budget an axis left out is searched over every
value the divisors allow.

This module imports neither Prefect nor MLflow: the flow (:mod:`flows.minitron.flow`) is imported
only when a job runs, so validating a config stays light.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from flows.config import CalibrationConfig, EvaluationConfig, LLMJob, PositiveInt, StrictModel
from pruning_core.errors import ConfigError, InvalidSparsity
from pruning_core.minitron import (
    Architecture,
    MinitronTarget,
    ModelShape,
    WidthImportanceConfig,
    enumerate_candidates,
)

# The library's field names -> the YAML paths users write.
FIELD_PATHS = {
    "param_budget": "target.param_budget", "budget_tolerance": "target.tolerance", "num_layers": "target.layers",
    "hidden_size": "target.hidden", "intermediate_size": "target.ffn", "num_attention_heads": "target.heads",
    "num_key_value_heads": "target.kv_groups", "min_layers": "target.min_layers",
    "max_candidates": "target.max_candidates", "hidden_divisor": "divisibility.hidden",
    "ffn_divisor": "divisibility.ffn", "seq_agg": "importance.seq_agg", "batch_agg": "importance.batch_agg",
}
AXES = {"layers": "num_layers", "hidden": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
        "kv_groups": "num_key_value_heads"}


def short_architecture(arch: Architecture) -> dict[str, int]:
    """``{layers, hidden, ffn, heads, kv_groups}`` of an architecture (summary.json's names)."""
    return {short: getattr(arch, long) for short, long in AXES.items()}


def candidate_id(arch: Architecture) -> str:
    """A readable, unique name of a candidate, e.g. ``L24-H576-F1536-Q9-KV3``."""
    return (f"L{arch.num_layers}-H{arch.hidden_size}-F{arch.intermediate_size}-"
            f"Q{arch.num_attention_heads}-KV{arch.num_key_value_heads}")


def as_field_error(err: ConfigError) -> ConfigError:
    """The library's ConfigError with its field renamed to the YAML path."""
    return ConfigError(FIELD_PATHS.get(err.field, err.field), err.message)


class TargetSection(StrictModel):
    """What the search may produce (the library's ``MinitronTarget``)."""

    param_budget: PositiveInt | None = Field(None, description="upper bound on the parameter count")
    param_fraction: float | None = Field(None, gt=0.0, le=1.0, description="the budget as a fraction of the dense count")
    tolerance: float = Field(0.05, description="candidates use at least (1 - tolerance) of the budget")
    layers: list[int] | None = Field(None, description="allowed decoder-layer counts")
    hidden: list[int] | None = Field(None, description="allowed hidden (embedding) sizes")
    ffn: list[int] | None = Field(None, description="allowed MLP intermediate sizes")
    heads: list[int] | None = Field(None, description="allowed query-head counts")
    kv_groups: list[int] | None = Field(None, description="allowed KV-group (key/value head) counts")
    min_layers: PositiveInt = Field(1, description="fewest layers a candidate may keep")
    max_candidates: PositiveInt | None = Field(8, description="score only the largest this many candidates")

    @field_validator("layers", "hidden", "ffn", "heads", "kv_groups", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @property
    def has_budget(self) -> bool:
        return self.param_budget is not None or self.param_fraction is not None


class DivisibilitySection(StrictModel):
    """Searched and explicit sizes must be multiples of these (ModelOpt's ``hidden_size_divisor``)."""

    hidden: PositiveInt = 64
    ffn: PositiveInt = 64


class ImportanceSection(StrictModel):
    """Aggregation of activation importance over the sequence, then the batch (mean, l2, var)."""

    seq_agg: str = "mean"
    batch_agg: str = "l2"


class DistillationSection(StrictModel):
    """Optional logit distillation from the dense teacher before a candidate is scored (0 steps: off).

    Candidates are distilled on their own windows and scored on the candidate windows, never on
    the same tokens (that would score them in-sample): ``windows`` windows of the calibration
    text's ``window_length`` tokens, at random starts (seeded by ``seed``) chosen among the
    positions that share no token with any candidate window (``pruning_core.minitron.
    disjoint_windows``). They are drawn once, stored with the run's windows, and reused for
    every candidate and for the chosen model's rebuild.
    """

    steps: int = Field(0, ge=0)
    lr: float = Field(1e-4, gt=0.0)
    windows: PositiveInt = Field(8, description="distillation windows, disjoint from the candidate windows")
    seed: int = Field(1, description="seed of the distillation windows' start positions")


class MinitronCalibration(CalibrationConfig):
    """The shared calibration windows, and which of them each step uses (the first N).

    Distillation (if on) uses separate windows of the same text that share no token with the
    candidate windows; see :class:`DistillationSection`.
    """

    score_windows: PositiveInt | None = Field(None, description="windows for Block Importance and width importance (None: all)")
    loss_windows: PositiveInt = Field(8, description="windows for the layer/block-drop LM loss (depth_criterion "
                                      "loss, loss_block, loss_iterative)")
    candidate_windows: PositiveInt = Field(8, description="windows on which each candidate's LM loss is measured")


class MinitronJob(LLMJob):
    """Minitron depth/width pruning: search architectures under a target, keep the best."""

    job: Literal["minitron"] = "minitron"
    target: TargetSection
    divisibility: DivisibilitySection = Field(default_factory=DivisibilitySection)
    depth_criterion: Literal["bi", "bi_iterative", "loss", "loss_block", "loss_iterative"] = Field(
        "bi", description="bi: lowest Block Importance; bi_iterative: BI recomputed after each removal; "
        "loss: smallest LM-loss increase when the layer is dropped (best on SmolLM2, L + 1 forward passes); "
        "loss_block: the contiguous block of k layers whose removal raises the LM loss least (L - k + 2 passes "
        "per k among the candidates); loss_iterative: loss recomputed after each removal (about k * L passes)")
    importance: ImportanceSection = Field(default_factory=ImportanceSection)
    distillation: DistillationSection = Field(default_factory=DistillationSection)
    calibration: MinitronCalibration = Field(default_factory=MinitronCalibration)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _library_validates(self) -> MinitronJob:
        # Cross-field checks are made here, at the top level, so their messages carry the full path.
        if self.target.param_budget is not None and self.target.param_fraction is not None:
            raise ValueError("target.param_fraction: give param_budget or param_fraction, not both")
        cal = self.calibration
        for name in ("score_windows", "loss_windows", "candidate_windows"):
            if (getattr(cal, name) or 0) > cal.num_windows:
                raise ValueError(f"calibration.{name}: {getattr(cal, name)} is more than num_windows {cal.num_windows}")
        try:
            self.width_config()
            self.library_target()
            heads, kv = self.target.heads, self.target.kv_groups
            if heads is not None and kv is not None:
                check_head_groups(heads, kv)
        except ConfigError as e:
            err = as_field_error(e)
            raise ValueError(f"{err.field}: {err.message}") from None
        return self

    # -- conversion to the library's configs (the one validation path) ---------------------------
    def width_config(self) -> WidthImportanceConfig:
        return WidthImportanceConfig(seq_agg=self.importance.seq_agg, batch_agg=self.importance.batch_agg)

    def library_target(self, dense: Architecture | None = None, dense_parameters: int | None = None,
                       *, limit: bool = True) -> MinitronTarget:
        """The target as the library's config. With the dense model known, a fractional budget
        becomes absolute and (without a budget) axes left out keep the dense value; without it a
        fractional budget is checked with a placeholder."""
        t = self.target
        budget = t.param_budget
        if t.param_fraction is not None:
            budget = max(1, int(t.param_fraction * dense_parameters)) if dense_parameters else 1
        axes = {long: tuple(getattr(t, short)) if getattr(t, short) is not None else None
                for short, long in AXES.items()}
        if dense is not None and not t.has_budget:
            axes = {k: v if v is not None else (getattr(dense, k),) for k, v in axes.items()}
        return MinitronTarget(param_budget=budget, budget_tolerance=t.tolerance, hidden_divisor=self.divisibility.hidden,
                              ffn_divisor=self.divisibility.ffn, min_layers=t.min_layers,
                              max_candidates=t.max_candidates if limit else None, **axes)

    def candidates(self, dense: Architecture, shape: ModelShape) -> tuple[list[Architecture], int]:
        """The candidates to score (largest first, at most ``max_candidates``) and how many exist.

        Raises (with the YAML field): ConfigError for a value above the dense model's, heads that
        cannot form whole KV groups, or no architecture in the target; InvalidSparsity for removing
        so many layers that fewer than ``min_layers`` remain.
        """
        dense_parameters = shape.num_parameters(dense)
        try:
            target = self.library_target(dense, dense_parameters, limit=False)
            if target.num_attention_heads is not None and target.num_key_value_heads is not None:
                check_head_groups(target.num_attention_heads, target.num_key_value_heads)
            every = enumerate_candidates(dense, shape, target)
        except ConfigError as e:
            raise as_field_error(e) from None
        removed, keep = dense.num_layers - min(a.num_layers for a in every), self.target.min_layers
        if removed > dense.num_layers - keep:
            raise InvalidSparsity(float(removed), f"cannot remove {removed} of {dense.num_layers} layers and keep "
                                  f"min_layers {keep}", name="target.layers")
        return every[: self.target.max_candidates], len(every)


def check_head_groups(heads: list[int] | tuple[int, ...], kv_groups: list[int] | tuple[int, ...]) -> None:
    """Raise the library's ConfigError if no head count can be split into one of the KV-group counts."""
    error: ConfigError | None = None
    for h in heads:
        for g in kv_groups:
            try:  # the library's own rule (and message) for a whole number of query heads per KV group
                Architecture(num_layers=1, hidden_size=h, intermediate_size=1, num_attention_heads=h,
                             num_key_value_heads=g)
                return
            except ConfigError as e:
                error = e
    if error is not None:
        raise error


__all__ = ["MinitronJob", "candidate_id", "check_head_groups", "short_architecture"]
