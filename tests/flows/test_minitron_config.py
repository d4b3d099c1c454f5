"""The minitron job config: validation through the library's configs, the shipped configs' candidates.

No Prefect, MLflow or model needed: the candidates of a config follow from the dense architecture.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.jobs import load_config, parse_config
from flows.minitron import MinitronJob, candidate_id, short_architecture
from pruning_core.errors import ConfigError, InvalidSparsity
from pruning_core.minitron import Architecture, ModelShape

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = Architecture(num_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3)
SHAPE = ModelShape(vocab_size=49152, head_dim=64, tied_embeddings=True)
DENSE_PARAMS = 134_515_008


def _job(**fields) -> MinitronJob:
    return parse_config({"job": "minitron", **fields}, "t.yaml")


def _shapes(job: MinitronJob) -> list[tuple[int, ...]]:
    return [tuple(short_architecture(a).values()) for a in job.candidates(SMOLLM2, SHAPE)[0]]


def test_shipped_depth_and_width_configs_have_one_candidate_each():
    depth = load_config(REPO / "configs" / "minitron-depth.yaml")
    width = load_config(REPO / "configs" / "minitron-width.yaml")
    assert isinstance(depth, MinitronJob) and depth.depth_criterion == "loss"
    assert _shapes(depth) == [(24, 576, 1536, 9, 3)]  # axes not named keep the dense value
    assert _shapes(width) == [(30, 576, 768, 6, 2)]


def test_shipped_budget_config_mixes_depth_and_width_within_the_budget():
    job = load_config(REPO / "configs" / "minitron-budget.yaml")
    found, total = job.candidates(SMOLLM2, SHAPE)
    assert len(found) == total == 7
    budget = int(0.8 * DENSE_PARAMS)
    params = [a.num_parameters(vocab_size=49152, head_dim=64, tied_embeddings=True) for a in found]
    assert all(0.97 * budget <= p <= budget for p in params) and params == sorted(params, reverse=True)
    shapes = {tuple(short_architecture(a).values()) for a in found}
    assert (22, 576, 1536, 9, 3) in shapes  # depth only
    assert (29, 576, 1024, 9, 3) in shapes  # (almost) width only
    assert all(a.intermediate_size % 256 == 0 and a.num_layers >= 20 for a in found)


def test_fraction_budget_and_search_axes():
    job = _job(target={"param_fraction": 0.5, "tolerance": 0.02, "max_candidates": 3})
    target = job.library_target(SMOLLM2, DENSE_PARAMS)
    assert target.param_budget == DENSE_PARAMS // 2 and target.num_layers is None  # searched
    found, total = job.candidates(SMOLLM2, SHAPE)
    assert len(found) == 3 < total


def test_an_int_is_a_one_value_axis_and_ids_name_the_shape():
    job = _job(target={"layers": 27, "ffn": [1024, 768]})
    assert job.target.layers == [27]
    assert [candidate_id(a) for a in job.candidates(SMOLLM2, SHAPE)[0]] == [
        "L27-H576-F1024-Q9-KV3", "L27-H576-F768-Q9-KV3"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"target": {"param_budget": 10, "param_fraction": 0.5}}, "target.param_fraction"),
        ({"target": {"param_budget": 10, "tolerance": 1.0}}, "target.tolerance"),
        ({"target": {"ffn": [100]}}, "target.ffn"),
        ({"target": {"heads": [4, 8], "kv_groups": [3]}}, "target.heads"),
        ({"target": {"layers": 3}, "importance": {"seq_agg": "max"}}, "importance.seq_agg"),
        ({"target": {"layers": 3}, "calibration": {"num_windows": 4, "loss_windows": 2, "candidate_windows": 6}},
         "calibration.candidate_windows"),
        ({"target": {"layers": 3}, "depth_criterion": "random"}, "depth_criterion"),
        ({"target": {"layers": 3}, "distillation": {"lr": 0}}, "distillation.lr"),
        ({"target": {"layers": 3}, "distillation": {"steps": 5, "windows": 0}}, "distillation.windows"),
        ({"target": {"layers": 3, "bogus": 1}}, "target.bogus"),
        ({}, "target"),
    ],
)
def test_bad_fields_are_named(fields, field):
    with pytest.raises(ConfigError) as info:
        _job(**fields)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize(
    ("target", "error", "field", "fragment"),
    [
        ({"layers": 31}, ConfigError, "target.layers", "above the original 30"),
        ({"hidden": 640}, ConfigError, "target.hidden", "above the original 576"),
        ({"heads": 8}, ConfigError, "target.heads", "not a multiple of num_key_value_heads 3"),  # kv stays 3
        ({"layers": 4, "min_layers": 8}, InvalidSparsity, "target.layers", "keep min_layers 8"),
        ({"param_budget": 1000}, ConfigError, "target", "no architecture"),
    ],
)
def test_targets_the_model_cannot_meet(target, error, field, fragment):
    job = _job(target=target)  # valid on its own
    with pytest.raises(error, match=fragment) as info:
        job.candidates(SMOLLM2, SHAPE)
    assert field == (getattr(info.value, "field", None) or info.value.name)


def test_job_hash_ignores_defaults_runner_and_tracking():
    a = _job(target={"layers": 24})
    b = _job(target={"layers": 24, "tolerance": 0.05}, runner={"kind": "threads", "max_workers": 1},
             tracking={"experiment": "x"})
    assert a.job_hash() == b.job_hash() != _job(target={"layers": 24}, depth_criterion="loss").job_hash()


@pytest.mark.parametrize("criterion", ["bi", "bi_iterative", "loss", "loss_block", "loss_iterative"])
def test_every_library_depth_criterion_is_a_config_choice(criterion):
    from pruning_core.minitron import DEPTH_CRITERIA

    assert _job(target={"layers": 24}, depth_criterion=criterion).depth_criterion == criterion
    assert set(MinitronJob.model_fields["depth_criterion"].annotation.__args__) == set(DEPTH_CRITERIA)


def test_distillation_window_fields_change_the_hash_only_when_set():
    plain = _job(target={"layers": 24}, distillation={"steps": 5})
    assert plain.distillation.windows == 8 and plain.distillation.seed == 1
    assert plain.job_hash() == _job(target={"layers": 24}, distillation={"steps": 5, "windows": 8}).job_hash()
    assert plain.job_hash() != _job(target={"layers": 24}, distillation={"steps": 5, "seed": 2}).job_hash()
