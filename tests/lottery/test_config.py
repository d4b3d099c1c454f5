"""LotteryTicketConfig, RewindStrategy and the builder: seed cases, corrected bugs, canonical form."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.compat import LotteryTicketPruner
from pruning_core.errors import ConfigError, InvalidSparsity
from pruning_core.lottery import (
    Early,
    Init,
    Late,
    LearningRate,
    LotteryTicketConfig,
    NoRewind,
    RewindStrategy,
)


def test_seed_default_rate_is_0_2057() -> None:
    # Seed: Config(0.9, 10) -> rate 1 - 0.1^0.1 = 0.2057, global pruning, Init.
    cfg = LotteryTicketConfig.new(0.9, 10)
    assert cfg == LotteryTicketConfig()
    assert cfg.rate == pytest.approx(1 - 0.1**0.1, abs=1e-12)
    assert round(cfg.rate, 4) == 0.2057
    assert cfg.global_pruning is True and cfg.rewind_strategy == Init()


@given(st.floats(0.0, 0.999), st.integers(1, 50))
def test_rate_reaches_target_after_r_rounds(s: float, r: int) -> None:
    cfg = LotteryTicketConfig(target_sparsity=s, pruning_rounds=r)
    assert (1 - cfg.rate) ** r == pytest.approx(1 - s, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("s", [1.0, 1.5, -0.5, math.nan, math.inf])
def test_bad_target_sparsity_is_rejected_not_clamped(s: float) -> None:
    # The seed clamped 1.5 to 0.99 but computed the rate from 1.5 (NaN); -0.5 pruned nothing.
    with pytest.raises(InvalidSparsity) as info:
        LotteryTicketConfig(target_sparsity=s, pruning_rounds=10)
    assert info.value.name == "target_sparsity" and "target_sparsity" in str(info.value)
    assert str(s) in str(info.value)


@pytest.mark.parametrize("r", [0, -3, 2.5, True])
def test_bad_rounds_are_rejected(r: object) -> None:
    # The seed silently turned 0 rounds into 1.
    with pytest.raises(ConfigError, match="pruning_rounds") as info:
        LotteryTicketConfig(target_sparsity=0.5, pruning_rounds=r)  # type: ignore[arg-type]
    assert str(r) in str(info.value)


def test_unknown_rewind_strategy() -> None:
    with pytest.raises(ConfigError, match="rewind_strategy.*'sometimes'.*init, early:K"):
        LotteryTicketConfig(rewind_strategy="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rewind_strategy"):
        LotteryTicketConfig(rewind_strategy=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", [Early(5000), Early(7000), LearningRate(5000)])
def test_rewind_iteration_beyond_training_length(strategy: RewindStrategy) -> None:
    with pytest.raises(ConfigError, match="rewind_strategy") as info:
        LotteryTicketConfig(rewind_strategy=strategy, training_steps=5000)
    assert "5000" in str(info.value) and "beyond the training length" in str(info.value)


@pytest.mark.parametrize("bad", [lambda: Early(-1), lambda: Late(1.0), lambda: Late(-0.1), lambda: LearningRate(-2)])
def test_malformed_strategies(bad) -> None:
    with pytest.raises(ConfigError, match="rewind_strategy"):
        bad()


@pytest.mark.parametrize(
    ("kw", "exc", "field"),
    [
        (dict(prune_rate_per_round=0.0), InvalidSparsity, "prune_rate_per_round"),
        (dict(prune_rate_per_round=1.0), InvalidSparsity, "prune_rate_per_round"),
        (dict(target_sparsity=None), ConfigError, "target_sparsity"),
        (dict(layer_rates={"out.weight": 0.1}), ConfigError, "layer_rates"),
        (dict(global_pruning=False, layer_rates={"out.weight": 1.2}), InvalidSparsity, "layer_rates[out.weight]"),
        (dict(training_steps=0), ConfigError, "training_steps"),
        (dict(seed=-1), ConfigError, "seed"),
        (dict(layers=()), ConfigError, "layers"),
    ],
)
def test_other_bad_fields_name_the_field(kw, exc, field) -> None:
    with pytest.raises(exc, match=field.replace("[", r"\[").replace("]", r"\]")):
        LotteryTicketConfig(**kw)


def test_late_fraction_resolves_to_an_iteration() -> None:
    assert Late(0.1).rewind_step(5000) == 500
    assert LotteryTicketConfig(rewind_strategy=Late(0.05), training_steps=1000).rewind_step == 50


@pytest.mark.parametrize("text", ["init", "early:500", "late:0.05", "lr", "lr:200", "none"])
def test_strategy_strings_round_trip(text: str) -> None:
    assert str(RewindStrategy.parse(text)) == text


def test_strategies_are_really_different() -> None:
    t = 1000
    table = {
        s: (s.rewinds_weights, s.rewind_step(t), s.holds_final_lr)
        for s in (Init(), Early(100), Late(0.2), LearningRate(100), NoRewind())
    }
    assert table[Init()] == (True, 0, False)
    assert table[Early(100)] == (True, 100, False)
    assert table[Late(0.2)] == (True, 200, False)
    assert table[LearningRate(100)] == (False, 100, False)
    assert table[NoRewind()] == (False, 0, True)


def test_builder_defaults_and_full_config() -> None:
    assert LotteryTicketPruner.builder().build().config == LotteryTicketConfig(target_sparsity=0.9, pruning_rounds=10)
    pruner = (
        LotteryTicketPruner.builder()
        .target_sparsity(0.95)
        .pruning_rounds(20)
        .rewind_strategy(RewindStrategy.Late(0.05))
        .global_pruning(False)
        .build()
    )
    cfg = pruner.config
    assert (cfg.target_sparsity, cfg.pruning_rounds, cfg.rewind_strategy, cfg.global_pruning) == (
        0.95, 20, Late(0.05), False,
    )
    with pytest.raises(InvalidSparsity):  # the seed's builder clamped 1.5 to 0.99
        LotteryTicketPruner.builder().target_sparsity(1.5).build()


def test_with_methods_revalidate() -> None:
    cfg = LotteryTicketConfig(training_steps=100)
    assert cfg.with_rewind_strategy("early:10").rewind_strategy == Early(10)
    assert cfg.with_global_pruning(False).global_pruning is False
    with pytest.raises(ConfigError):
        cfg.with_rewind_strategy("early:100")


def test_dict_round_trip_and_unknown_keys() -> None:
    cfg = LotteryTicketConfig(
        target_sparsity=None, prune_rate_per_round=0.2, global_pruning=False,
        layer_rates={"out.weight": 0.1}, rewind_strategy="early:50", training_steps=500, seed=3, layers=("a", "b"),
    )
    assert LotteryTicketConfig.from_dict(cfg.to_dict()) == cfg
    assert LotteryTicketConfig.from_dict(cfg.to_dict(include_defaults=True)) == cfg
    assert cfg.to_dict()["rewind_strategy"] == "early:50"
    with pytest.raises(ConfigError, match="unknown LotteryTicketConfig key"):
        LotteryTicketConfig.from_dict({"target_sparsity": 0.5, "rouns": 3})


def test_hashname_ignores_defaults_and_is_pinned() -> None:
    assert LotteryTicketConfig().to_dict() == {}
    assert LotteryTicketConfig(seed=0).hashname() == LotteryTicketConfig().hashname()
    assert LotteryTicketConfig(seed=1).hashname() != LotteryTicketConfig().hashname()
    # Regression pins: changing the canonical form would orphan saved searches.
    assert LotteryTicketConfig().canonical_str() == "{}"
    assert LotteryTicketConfig().hashname() == "44136fa355b3678a"
    assert LotteryTicketConfig(rewind_strategy="early:500").canonical_str() == '{"rewind_strategy":"early:500"}'
