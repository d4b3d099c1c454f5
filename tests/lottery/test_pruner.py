"""IMP end to end on a tiny MLP: nesting, exact densities, rewinding, strategies, controls, apply_ticket."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pruning_core.errors import ConfigError
from pruning_core.lottery import (
    CONTROLS,
    ClassifierTrainFn,
    Early,
    Init,
    LearningRate,
    LotteryTicketConfig,
    LotteryTicketPruner,
    NoRewind,
    TrainingConfig,
    TrainSpec,
    control_start,
    snapshot,
    survivors,
    train_run,
)

T = 40  # training steps per run


def _cfg(**kw) -> LotteryTicketConfig:
    base = dict(target_sparsity=None, prune_rate_per_round=0.3, pruning_rounds=3, training_steps=T, global_pruning=False)
    base.update(kw)
    return LotteryTicketConfig(**base)


class Recorder:
    """Wraps a train function; records (spec, start weights) of every call."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __call__(self, model, masks, spec: TrainSpec):
        self.calls.append((spec, snapshot(model), {n: m.clone() for n, m in masks.items()}))
        return self.inner(model, masks, spec)


def test_seed_find_ticket_without_training_matches_pinned_history() -> None:
    # Seed: 8 weights 1..8 at (0.5, 2) -> history [0.25, 0.5], 4 left. With a no-op train
    # function IMP degenerates into the seed's (training-free) procedure.
    model = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.arange(1.0, 9.0).reshape(1, 8))
    ticket = LotteryTicketPruner(LotteryTicketConfig.new(0.5, 2)).find_ticket(
        model, lambda m, mk, spec: {}, progress=False
    )
    assert [round(s, 6) for s in ticket.sparsity_history] == [0.25, 0.5]
    assert ticket.remaining_parameters == 4 and ticket.masks["weight"].tolist() == [[False] * 4 + [True] * 4]
    assert torch.equal(ticket.initial_weights["weight"], torch.arange(1.0, 9.0).reshape(1, 8))
    assert ticket.compression_ratio() == 2.0 and ticket.density == 0.5


def test_rounds_are_nested_with_exact_layerwise_density(make_mlp, tiny_train_fn) -> None:
    cfg = _cfg(layer_rates={"out.weight": 0.15})
    ticket = LotteryTicketPruner(cfg).start(make_mlp(), tiny_train_fn)
    model, pruner = make_mlp(), LotteryTicketPruner(cfg)
    for r in range(1, 4):
        new = pruner.run_round(model, tiny_train_fn, ticket)
        assert new.round == r and len(new.records) == r + 1
        for name, mask in new.masks.items():
            assert not bool((mask & ~ticket.masks[name]).any())
            assert int(mask.sum()) == survivors(mask.numel(), cfg.layer_rate(name), r)
        assert new.records[-1].layer_density["out.weight"] == survivors(64, 0.15, r) / 64
        ticket = new
    assert pruner.is_done(ticket)
    with pytest.raises(ConfigError, match="complete"):
        pruner.run_round(model, tiny_train_fn, ticket)


def test_global_pruning_exact_total_density(make_mlp, tiny_train_fn) -> None:
    cfg = LotteryTicketConfig(target_sparsity=0.8, pruning_rounds=2, training_steps=T)
    ticket = LotteryTicketPruner(cfg).find_ticket(make_mlp(), tiny_train_fn, progress=False)
    total = 16 * 32 + 32 * 16 + 16 * 4
    assert ticket.remaining_parameters == survivors(total, cfg.rate, 2) == round(total * 0.2)
    assert [r.round for r in ticket.records] == [0, 1, 2]
    assert len({round(d, 3) for d in ticket.layer_density.values()}) > 1  # one threshold, uneven layers


def test_rewind_to_init_and_to_iteration_k_restore_exact_values(make_mlp, tiny_train_fn) -> None:
    k = 15
    for strategy in (Init(), Early(k)):
        rec = Recorder(tiny_train_fn)
        pruner = LotteryTicketPruner(_cfg(rewind_strategy=strategy, pruning_rounds=2))
        ticket = pruner.find_ticket(make_mlp(), rec, progress=False)
        # Reference: the weights after k steps of the dense run, computed independently.
        ref = make_mlp()
        if isinstance(strategy, Early):
            ref_masks = {n: torch.ones_like(m) for n, m in ticket.masks.items()}
            train_run(ref, tiny_train_fn, ref_masks, ref.state_dict(), TrainSpec(0, k, seed=pruner.data_seed))
        expected = snapshot(ref)
        assert all(torch.equal(ticket.rewind_weights[n], expected[n]) for n in expected)
        assert ticket.rewind_step == (k if isinstance(strategy, Early) else 0)
        for spec, start, masks in rec.calls[1:]:  # rounds 1 and 2 start from the masked rewind weights
            assert spec.start_step == ticket.rewind_step and spec.end_step == T and spec.lr_step is None
            assert all(torch.equal(start[n], expected[n] * masks.get(n, 1)) for n in expected)


def test_learning_rate_rewinding_differs_from_weight_rewinding(make_mlp, tiny_train_fn) -> None:
    results = {}
    for strategy in (Early(10), LearningRate(10)):
        rec = Recorder(tiny_train_fn)
        pruner = LotteryTicketPruner(_cfg(rewind_strategy=strategy, pruning_rounds=1))
        round0 = pruner.start(make_mlp(), rec)
        ticket = pruner.run_round(make_mlp(), rec, round0)
        spec, start, masks = rec.calls[1]
        assert spec.start_step == 10  # both replay the schedule from iteration 10
        base = round0.rewind_weights if strategy.rewinds_weights else round0.trained_weights
        assert all(torch.equal(start[n], base[n] * masks.get(n, 1)) for n in start)
        results[str(strategy)] = ticket
    a, b = results["early:10"], results["lr:10"]
    assert torch.equal(a.masks["fc1.weight"], b.masks["fc1.weight"])  # same round-0 weights -> same mask
    assert not torch.equal(a.trained_weights["fc1.weight"], b.trained_weights["fc1.weight"])


def test_no_rewind_holds_the_final_learning_rate(make_mlp, tiny_data) -> None:
    x, y = tiny_data
    fn = ClassifierTrainFn(x, y, TrainingConfig(lr=1e-2, batch_size=32, milestones=(20,), gamma=0.1))
    finals = {}
    for strategy in (LearningRate(0), NoRewind()):
        rec = Recorder(fn)
        pruner = LotteryTicketPruner(_cfg(rewind_strategy=strategy, pruning_rounds=1))
        ticket = pruner.find_ticket(make_mlp(), rec, progress=False)
        spec = rec.calls[1][0]
        assert (spec.start_step, spec.lr_step) == ((0, T - 1) if isinstance(strategy, NoRewind) else (0, None))
        finals[str(strategy)] = ticket.trained_weights["fc1.weight"]
    assert not torch.equal(finals["lr"], finals["none"])


def test_controls_have_the_right_masks_and_weights(make_mlp, tiny_train_fn) -> None:
    pruner = LotteryTicketPruner(_cfg(pruning_rounds=1))
    ticket0 = pruner.start(make_mlp(), tiny_train_fn)
    plan = pruner.plan_round(ticket0)
    reinit_masks, reinit_w = control_start("random_reinit", make_mlp(), plan, seed=1)
    assert reinit_masks is plan.masks
    assert not torch.equal(reinit_w["fc1.weight"], plan.start_weights["fc1.weight"])
    assert int(reinit_w["fc1.weight"][~plan.masks["fc1.weight"]].count_nonzero()) == 0
    rnd_masks, rnd_w = control_start("random_mask", make_mlp(), plan, seed=1)
    for n, m in plan.masks.items():
        assert int(rnd_masks[n].sum()) == int(m.sum()) and not torch.equal(rnd_masks[n], m)
        assert torch.equal(rnd_w[n], plan.base_weights[n] * rnd_masks[n])
    with pytest.raises(ConfigError, match="unknown control"):
        control_start("shuffle", make_mlp(), plan, seed=1)

    ticket = pruner.run_round(make_mlp(), tiny_train_fn, ticket0, controls=CONTROLS)
    rec = ticket.records[-1]
    assert set(rec.controls) == set(CONTROLS)
    for metrics in rec.controls.values():
        assert metrics["density"] == pytest.approx(rec.density) and 0.0 <= metrics["accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="controls"):
        pruner.run_round(make_mlp(), tiny_train_fn, ticket0, controls=("bogus",))


def test_ticket_from_another_config_is_rejected(make_mlp, tiny_train_fn) -> None:
    ticket = LotteryTicketPruner(_cfg()).start(make_mlp(), tiny_train_fn)
    with pytest.raises(ConfigError, match="config hash"):
        LotteryTicketPruner(_cfg(seed=5)).run_round(make_mlp(), tiny_train_fn, ticket)


def test_unknown_layers_and_missing_capture(make_mlp, tiny_train_fn) -> None:
    with pytest.raises(ConfigError, match="layers"):
        LotteryTicketPruner(_cfg(layers=("nope.weight",))).start(make_mlp(), tiny_train_fn)
    with pytest.raises(ConfigError, match="layer_rates"):
        LotteryTicketPruner(_cfg(layer_rates={"nope.weight": 0.1})).start(make_mlp(), tiny_train_fn)
    with pytest.raises(ConfigError, match="on_capture"):
        LotteryTicketPruner(_cfg(rewind_strategy=Early(5))).start(make_mlp(), lambda m, mk, s: {})


def test_only_listed_layers_are_pruned(make_mlp, tiny_train_fn) -> None:
    ticket = LotteryTicketPruner(_cfg(layers=("fc1.weight",), pruning_rounds=1)).find_ticket(
        make_mlp(), tiny_train_fn, progress=False
    )
    assert list(ticket.masks) == ["fc1.weight"]


def test_apply_ticket_seed_case_and_strategies() -> None:
    # Seed: trained weights [20,40,60,80], mask [1,0,1,0], Init -> [10,0,30,0] (rewound).
    lin = torch.nn.Linear(4, 1, bias=False)
    cfg = LotteryTicketConfig(target_sparsity=0.5, pruning_rounds=1)
    mask = torch.tensor([[True, False, True, False]])
    from pruning_core.lottery import WinningTicket

    ticket = WinningTicket(
        masks={"weight": mask},
        rewind_weights={"weight": torch.tensor([[10.0, 20.0, 30.0, 40.0]])},
        trained_weights={"weight": torch.tensor([[21.0, 0.0, 61.0, 0.0]])},
        round=1, rewind_step=0, records=(), config=cfg.to_dict(include_defaults=True), config_hash=cfg.hashname(),
    )
    cases = {None: [10, 0, 30, 0], "trained": [21, 0, 61, 0], "current": [20, 0, 60, 0]}
    for weights, expected in cases.items():
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[20.0, 40.0, 60.0, 80.0]]))
        res = LotteryTicketPruner(cfg).apply_ticket(lin, ticket, weights=weights)
        assert lin.weight.tolist() == [[float(v) for v in expected]]
        assert (res.parameters_pruned, res.achieved_sparsity, res.compression_ratio()) == (2, 0.5, 2.0)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[20.0, 40.0, 60.0, 80.0]]))
    LotteryTicketPruner(cfg.with_rewind_strategy(NoRewind())).apply_ticket(lin, ticket)  # seed: None keeps weights
    assert lin.weight.tolist() == [[20.0, 0.0, 60.0, 0.0]]
    empty = replace(ticket, masks={"weight": torch.zeros(1, 4, dtype=torch.bool)})
    assert empty.compression_ratio() == math.inf and empty.sparsity == 1.0
    with pytest.raises(ConfigError, match="weights"):
        LotteryTicketPruner(cfg).apply_ticket(lin, ticket, weights="best")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_search_on_cuda_with_data_on_cpu(make_mlp, tiny_train_fn) -> None:
    model = make_mlp().cuda()
    ticket = LotteryTicketPruner(_cfg(pruning_rounds=2)).find_ticket(model, tiny_train_fn, controls=CONTROLS, progress=False)
    assert all(m.device.type == "cuda" for m in ticket.masks.values())
    params = dict(model.named_parameters())
    assert all(int(params[n].detach()[~m].count_nonzero()) == 0 for n, m in ticket.masks.items())
    assert ticket.records[-1].metrics["accuracy"] > 0.5
