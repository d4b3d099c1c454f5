"""``LotteryTicketConfig``: what an iterative-magnitude-pruning (IMP) search does, validated once.

Stage: lottery. The per-round rate for a target sparsity s reached in R rounds is
``p = 1 - (1 - s)^(1/R)`` (each round prunes p of the *remaining* weights, so R rounds leave
``(1 - p)^R = 1 - s``). A fixed rate (the paper's 20% per round) can be given instead, with
per-layer overrides in layer-wise mode (e.g. the paper's 10% for the output layer).

The canonical form (:meth:`LotteryTicketConfig.to_dict` without defaults) and its
:meth:`~LotteryTicketConfig.hashname` identify a search, e.g. for resuming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pruning_core.errors import ConfigError, InvalidSparsity
from pruning_core.lottery.rewind import Init, RewindStrategy
from pruning_core.validate import check_sparsity


def _positive_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"must be a positive integer, got {value!r}")
    return value


def _rate(value: object, name: str) -> float:
    """A per-round pruning rate: a finite fraction in (0, 1)."""
    v = check_sparsity(float(value), name=name, allow_one=False)  # type: ignore[arg-type]
    if v <= 0.0:
        raise InvalidSparsity(v, "a per-round pruning rate must be in (0.0, 1.0)", name=name)
    return v


@dataclass(frozen=True, slots=True)
class LotteryTicketConfig:
    """Configuration of a Lottery Ticket (IMP) search.

    Attributes:
        target_sparsity: overall sparsity to reach, in [0, 1). With no explicit rate it sets the
            rate so that round ``pruning_rounds`` reaches it; with an explicit rate the search
            stops early once it is reached. ``None`` (explicit rate only): run all rounds.
        pruning_rounds: number of prune-rewind-retrain rounds R (>= 1); round 0 is the dense run.
        rewind_strategy: a :class:`RewindStrategy` or its string form (``"early:500"``).
        global_pruning: one magnitude threshold across all pruned layers (True) or one per layer.
        prune_rate_per_round: fraction of the remaining weights pruned per round; derived from
            ``target_sparsity`` when None.
        layer_rates: per-layer rate overrides ``{parameter name: rate}`` (layer-wise mode only).
        layers: names of the parameters to prune; None = the weight of every Linear and Conv layer.
        training_steps: optimizer steps T of one training run (rewind iterations must be < T).
        seed: base seed of the data order and of the controls' random masks and initialisations.
    """

    target_sparsity: float | None = 0.9
    pruning_rounds: int = 10
    rewind_strategy: RewindStrategy = dataclasses.field(default_factory=Init)
    global_pruning: bool = True
    prune_rate_per_round: float | None = None
    layer_rates: tuple[tuple[str, float], ...] = ()
    layers: tuple[str, ...] | None = None
    training_steps: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("pruning_rounds", self.pruning_rounds)
        _positive_int("training_steps", self.training_steps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("seed", f"must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.global_pruning, bool):
            raise ConfigError("global_pruning", f"must be a bool, got {self.global_pruning!r}")
        if self.target_sparsity is not None:
            object.__setattr__(
                self,
                "target_sparsity",
                check_sparsity(self.target_sparsity, name="target_sparsity", allow_one=False),
            )
        if self.prune_rate_per_round is not None:
            object.__setattr__(
                self, "prune_rate_per_round", _rate(self.prune_rate_per_round, "prune_rate_per_round")
            )
        elif self.target_sparsity is None:
            raise ConfigError(
                "target_sparsity", "needed when prune_rate_per_round is not given (got None for both)"
            )
        strategy = RewindStrategy.parse(self.rewind_strategy)
        strategy.check(self.training_steps)
        object.__setattr__(self, "rewind_strategy", strategy)
        self._init_layers()

    def _init_layers(self) -> None:
        raw = self.layer_rates.items() if isinstance(self.layer_rates, Mapping) else self.layer_rates
        rates = tuple(sorted((str(k), _rate(v, f"layer_rates[{k}]")) for k, v in raw))
        if rates and self.global_pruning:
            raise ConfigError(
                "layer_rates",
                f"per-layer rates {dict(rates)} need global_pruning=False (one global threshold has one rate)",
            )
        object.__setattr__(self, "layer_rates", rates)
        if self.layers is not None:
            if isinstance(self.layers, str) or not self.layers:
                raise ConfigError(
                    "layers", f"must be a non-empty sequence of parameter names or None, got {self.layers!r}"
                )
            object.__setattr__(self, "layers", tuple(str(n) for n in self.layers))

    # -- derived values ---------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """The default per-round rate: explicit, or ``1 - (1 - target_sparsity)^(1 / pruning_rounds)``."""
        if self.prune_rate_per_round is not None:
            return self.prune_rate_per_round
        assert self.target_sparsity is not None  # guaranteed by __post_init__
        p = 1.0 - (1.0 - self.target_sparsity) ** (1.0 / self.pruning_rounds)
        if not (math.isfinite(p) and 0.0 <= p < 1.0):
            raise InvalidSparsity(
                p, "derived per-round rate is not a fraction in [0, 1)", name="prune_rate_per_round"
            )
        return p

    def layer_rate(self, name: str) -> float:
        """The per-round rate of parameter ``name`` (its override, or :attr:`rate`)."""
        return dict(self.layer_rates).get(name, self.rate)

    @property
    def rewind_step(self) -> int:
        """The iteration captured in the dense run and where retraining starts."""
        return self.rewind_strategy.rewind_step(self.training_steps)

    @property
    def stops_at_target(self) -> bool:
        """True if the search may stop before ``pruning_rounds`` once ``target_sparsity`` is reached."""
        return self.prune_rate_per_round is not None and self.target_sparsity is not None

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def new(cls, target_sparsity: float, pruning_rounds: int) -> LotteryTicketConfig:
        """``LotteryTicketConfig(target_sparsity=s, pruning_rounds=r)`` (validated, never clamped)."""
        return cls(target_sparsity=target_sparsity, pruning_rounds=pruning_rounds)

    def with_rewind_strategy(self, strategy: RewindStrategy | str) -> LotteryTicketConfig:
        return dataclasses.replace(self, rewind_strategy=RewindStrategy.parse(strategy))

    def with_global_pruning(self, global_pruning: bool) -> LotteryTicketConfig:
        return dataclasses.replace(self, global_pruning=global_pruning)

    # -- canonical form ----------------------------------------------------------------------
    def to_dict(self, *, include_defaults: bool = False) -> dict[str, Any]:
        """JSON-able dict; fields still at their default are left out unless ``include_defaults``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if not include_defaults and value == default:
                continue
            if f.name == "rewind_strategy":
                value = str(value)
            elif f.name == "layer_rates":
                value = dict(value)
            elif f.name == "layers" and value is not None:
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LotteryTicketConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                unknown[0], f"unknown LotteryTicketConfig key(s) {unknown}; known: {sorted(known)}"
            )
        kwargs = dict(data)
        if kwargs.get("layers") is not None:
            kwargs["layers"] = tuple(kwargs["layers"])
        return cls(**kwargs)

    def canonical_str(self) -> str:
        """Sorted compact JSON of :meth:`to_dict` (defaults left out), stable across versions."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hashname(self) -> str:
        """First 16 hex digits of the sha256 of :meth:`canonical_str`."""
        return hashlib.sha256(self.canonical_str().encode("utf-8")).hexdigest()[:16]


__all__ = ["LotteryTicketConfig"]
