"""Lottery job configs: one validation path (the library's), errors naming the YAML field, stable identity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flows.jobs import load_config, parse_config
from flows.lottery import LotteryJob, SearchSection, TrainingSection
from pruning_core.errors import ConfigError
from pruning_core.lottery import LotteryTicketConfig, TrainingConfig

REPO = Path(__file__).resolve().parents[2]


def test_sections_mirror_the_library_defaults():
    """The pydantic sections restate the library's fields; a changed library default must show up here."""
    lib = LotteryTicketConfig().to_dict(include_defaults=True)
    ours = LotteryJob().lottery_config().to_dict(include_defaults=True)
    assert ours == lib
    assert set(SearchSection.model_fields) == {f.name for f in dataclasses.fields(LotteryTicketConfig)}
    assert LotteryJob().training_config() == TrainingConfig()
    assert set(TrainingSection.model_fields) - {"eval_every", "threads"} == {
        f.name for f in dataclasses.fields(TrainingConfig)
    }


def test_shipped_lenet_config_is_the_papers_protocol():
    job = load_config(REPO / "configs" / "lottery-lenet.yaml")
    assert isinstance(job, LotteryJob)
    cfg = job.lottery_config()
    assert (cfg.pruning_rounds, cfg.training_steps, cfg.global_pruning) == (10, 5000, False)
    assert cfg.layer_rate("hidden.0.weight") == 0.2 and cfg.layer_rate("output.weight") == 0.1
    assert str(cfg.rewind_strategy) == "early:500" and cfg.rewind_step == 500
    train = job.training_config()
    assert (train.optimizer, train.lr, train.batch_size) == ("adam", 1.2e-3, 60)
    assert job.controls == ["random_reinit", "random_mask"]
    quick = load_config(REPO / "configs" / "lottery-lenet-quick.yaml").lottery_config()
    assert quick.pruning_rounds == 3 and quick.training_steps < 1000


@pytest.mark.parametrize(
    ("search", "field", "fragment"),
    [
        ({"target_sparsity": 1.0}, "search.target_sparsity", "[0.0, 1.0)"),
        ({"target_sparsity": 1.5}, "search.target_sparsity", "1.5"),
        ({"pruning_rounds": 0}, "search.pruning_rounds", "positive integer, got 0"),
        ({"rewind_strategy": "sideways"}, "search.rewind_strategy", "unknown rewind strategy 'sideways'"),
        ({"rewind_strategy": "early:5000"}, "search.rewind_strategy", "beyond the training length"),
        ({"training_steps": 100, "rewind_strategy": "early:100"}, "search.rewind_strategy", "training_steps=100"),
        ({"layer_rates": {"output.weight": 0.1}}, "search.layer_rates", "global_pruning=False"),
        ({"prune_rate_per_round": 0.0, "global_pruning": False}, "search.prune_rate_per_round", "(0.0, 1.0)"),
        ({"rounds": 3}, "search.rounds", "Extra inputs are not permitted"),
    ],
)
def test_bad_search_values_name_the_field(search, field, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config({"job": "lottery", "search": search}, "lt.yaml")
    assert err.value.field == field
    assert fragment in str(err.value) and "lt.yaml" in str(err.value)


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"training": {"lr": 0}}, "training.lr", "positive"),
        ({"training": {"optimizer": "lbfgs"}}, "training.optimizer", "'adam' or 'sgd'"),
        ({"training": {"eval_every": 0}}, "training.eval_every", "greater than 0"),
        ({"controls": ["random_reinit", "shuffle"]}, "controls", "random_mask"),
        ({"model": "smollm2"}, "model", "'lenet300_100' or 'conv2'"),
        ({"runner": {"kind": "dask_local"}}, "runner.kind", "sequentially"),
        ({"data": {"train_subset": 0}}, "data.train_subset", "greater than 0"),
        ({"seed": 1}, "seed", "Extra inputs are not permitted"),
    ],
)
def test_bad_job_values_name_the_field(data, field, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config({"job": "lottery", **data}, "lt.yaml")
    assert err.value.field == field
    assert fragment in str(err.value)


def test_identity_ignores_defaults_tracking_and_registry_naming():
    base = parse_config({"job": "lottery"})
    same = parse_config({"job": "lottery", "search": {"seed": 0}, "registry": {"model_name": "mine"},
                         "tracking": {"experiment": "x"}, "name": "other"})
    assert base.job_hash() == same.job_hash()
    assert same.registered_model_name == "mine" and base.registered_model_name == "lottery-lenet300_100"
    for change in ({"search": {"seed": 1}}, {"training": {"threads": 1}}, {"data": {"test_subset": 10}},
                   {"controls": []}, {"model": "conv2"}):
        assert parse_config({"job": "lottery", **change}).job_hash() != base.job_hash(), change
    # Pinned: a changed hash orphans existing output directories and MLflow runs.
    assert base.job_hash() == "50e072e7fa91"
