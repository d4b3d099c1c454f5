"""Lottery Ticket jobs (``job: lottery``): the config model.

A lottery YAML config has four sections besides the common ones (name, model, device, runner,
tracking): ``search`` (the fields of :class:`pruning_core.lottery.LotteryTicketConfig`),
``training`` (:class:`pruning_core.lottery.TrainingConfig` plus the evaluation interval),
``data`` (Fashion-MNIST location and optional subsets) and ``controls``. Pydantic checks only
the shape (types, unknown keys); every value is validated by the library's own constructors
(``LotteryTicketConfig.from_dict``, ``TrainingConfig``), so there is one validation path and a
bad value gives the library's message, reported with the field's YAML path.

This module imports neither Prefect nor MLflow: the flow (:mod:`flows.lottery.flow`) is imported
only when a job runs, so validating a config stays light.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flows.config import JobBase, PositiveInt, StrictModel
from pruning_core.errors import PruningError
from pruning_core.lottery import CONTROLS, LotteryTicketConfig, TrainingConfig
from pruning_core.vision import DEFAULT_ROOT


class SearchSection(StrictModel):
    """The IMP search: the fields and defaults of ``LotteryTicketConfig`` (which validates them)."""

    target_sparsity: float | None = Field(0.9, description="overall sparsity to reach, in [0, 1)")
    pruning_rounds: int = Field(10, description="prune-rewind-retrain rounds after the dense round 0")
    rewind_strategy: str = Field("init", description="init, early:K, late:F, lr, lr:K or none")
    global_pruning: bool = Field(True, description="one magnitude threshold across layers (else per layer)")
    prune_rate_per_round: float | None = Field(None, description="fraction of remaining weights pruned per round")
    layer_rates: dict[str, float] = Field(default_factory=dict, description="per-layer rates (layer-wise only)")
    layers: list[str] | None = Field(None, description="parameters to prune; default: every Linear/Conv weight")
    training_steps: int = Field(5000, description="optimizer steps of one training run")
    seed: int = Field(0, description="initialisation, data order and the controls' random draws")


class TrainingSection(StrictModel):
    """Optimiser and schedule of every training run (``TrainingConfig``) and the learning-curve interval."""

    optimizer: str = "adam"
    lr: float = 1.2e-3
    batch_size: int = 60
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: list[int] = Field(default_factory=list)
    gamma: float = 0.1
    eval_every: PositiveInt | None = Field(
        500, description="evaluate on the test set every N iterations (learning curves); None: at the end only"
    )
    threads: PositiveInt | None = Field(
        None, description="torch CPU threads while training (None: torch's default); 1 is fastest for LeNet "
        "on a busy machine. Part of the job's identity: thread count changes float rounding."
    )


class DataSection(StrictModel):
    """Fashion-MNIST idx files (Debian's dataset-fashion-mnist), optionally subsampled."""

    dataset: Literal["fashion_mnist"] = "fashion_mnist"
    root: str = Field(str(DEFAULT_ROOT), description="directory with the four *-idx?-ubyte.gz files")
    train_subset: PositiveInt | None = Field(None, description="use this many training images (seeded draw)")
    test_subset: PositiveInt | None = Field(None, description="use this many test images (seeded draw)")
    subset_seed: int = 0


class RegistrySection(StrictModel):
    """Where the winning ticket is registered (MLflow Model Registry); not part of the job's identity."""

    model_name: str | None = Field(None, description="registered model name; default lottery-<model>")
    alias: str = "winning"


class LotteryJob(JobBase):
    """A Lottery Ticket search (Frankle & Carbin 2019) on Fashion-MNIST, run as a Prefect flow."""

    job: Literal["lottery"] = "lottery"
    model: Literal["lenet300_100", "conv2"] = Field("lenet300_100", description="LeNet-300-100 or Conv-2")
    search: SearchSection = Field(default_factory=SearchSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    data: DataSection = Field(default_factory=DataSection)
    controls: list[str] = Field(
        default_factory=lambda: list(CONTROLS),
        description="controls trained every round: random_reinit, random_mask; [] for none",
    )
    registry: RegistrySection = Field(default_factory=RegistrySection)

    @field_validator("controls")
    @classmethod
    def _controls(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in CONTROLS]
        if unknown or len(set(v)) != len(v):
            raise ValueError(f"expected distinct names from {list(CONTROLS)}")
        return v

    @model_validator(mode="after")
    def _library_validates(self) -> LotteryJob:
        if self.runner.kind != "threads":
            raise ValueError(
                f"runner.kind: the lottery flow runs its rounds and controls sequentially in-process; "
                f"only 'threads' is supported, got {self.runner.kind!r}"
            )
        for section, build in (("search", self.lottery_config), ("training", self.training_config)):
            try:
                build()
            except PruningError as e:
                field = getattr(e, "field", None) or getattr(e, "name", None) or "?"
                message = getattr(e, "message", None) or str(e)
                raise ValueError(f"{section}.{field}: {message}") from None
        return self

    # -- conversion to the library's configs (the one validation path) ---------------------------
    def lottery_config(self) -> LotteryTicketConfig:
        """The search as the library's config (raises the library's ConfigError on bad values)."""
        return LotteryTicketConfig.from_dict(self.search.model_dump())

    def training_config(self) -> TrainingConfig:
        fields = self.training.model_dump(exclude={"eval_every", "threads"})
        fields["milestones"] = tuple(fields["milestones"])
        return TrainingConfig(**fields)

    @property
    def registered_model_name(self) -> str:
        return self.registry.model_name or f"lottery-{self.model}"

    def default_name(self) -> str:
        return f"lottery-{self.model}"

    def job_hash(self) -> str:
        """As :meth:`JobBase.job_hash`, also leaving out ``registry`` (naming, not results)."""
        return JobBase.job_hash(self.model_copy(update={"registry": RegistrySection()}))


__all__ = ["DataSection", "LotteryJob", "RegistrySection", "SearchSection", "TrainingSection"]
