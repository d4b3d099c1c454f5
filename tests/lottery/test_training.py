"""Masked training: pruned weights stay exactly zero through Adam; determinism; schedule; contract checks."""

from __future__ import annotations

import pytest
import torch

from pruning_core.errors import ConfigError, InvalidMask
from pruning_core.lottery import (
    ClassifierTrainFn,
    TrainingConfig,
    TrainSpec,
    derive_seed,
    random_masks_like,
    train_run,
)


def _half_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ones = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    dens = {n: m.clone() for n, m in ones.items()}
    for m in dens.values():
        m.view(-1)[: m.numel() // 2] = False
    return random_masks_like(dens, torch.Generator().manual_seed(5))


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_pruned_weights_stay_exactly_zero_after_every_adam_step(tiny_data, make_mlp, weight_decay: float) -> None:
    x, y = tiny_data
    fn = ClassifierTrainFn(x, y, TrainingConfig(lr=5e-2, batch_size=32, weight_decay=weight_decay))
    model = make_mlp()
    masks = _half_masks(model)
    violations: list[int] = []

    def check(step: int, m: torch.nn.Module) -> None:
        params = dict(m.named_parameters())
        violations.append(sum(int(params[n].detach()[~mk].count_nonzero()) for n, mk in masks.items()))

    steps = 60
    spec = TrainSpec(0, steps, seed=0, capture_steps=tuple(range(steps + 1)), on_capture=check)
    metrics = train_run(model, fn, masks, model.state_dict(), spec)
    assert len(violations) == steps + 1 and max(violations) == 0
    # ...and the surviving weights did train.
    assert metrics["train_loss"] < 1.0


def test_naive_adam_resurrects_pruned_weights(tiny_data, make_mlp) -> None:
    """Why the gradient mask matters: masking only the initial weights does not survive Adam."""
    x, y = tiny_data
    model = make_mlp()
    masks = _half_masks(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(5):
        loss = torch.nn.functional.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    assert sum(int(params[n].detach()[~m].count_nonzero()) for n, m in masks.items()) > 0


def test_train_run_rejects_a_train_fn_that_breaks_the_masks(make_mlp) -> None:
    model = make_mlp()
    masks = _half_masks(model)

    def careless(m: torch.nn.Module, mk, spec: TrainSpec) -> dict[str, float]:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)
        return {}

    with pytest.raises(InvalidMask, match="non-zero after training"):
        train_run(model, careless, masks, model.state_dict(), TrainSpec(0, 1, seed=0))


def test_training_is_deterministic_given_the_seed(tiny_train_fn, make_mlp) -> None:
    states = []
    for _ in range(2):
        model = make_mlp()
        masks = _half_masks(model)
        train_run(model, tiny_train_fn, masks, model.state_dict(), TrainSpec(0, 40, seed=7))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    model = make_mlp()
    train_run(model, tiny_train_fn, _half_masks(model), model.state_dict(), TrainSpec(0, 40, seed=8))
    assert not torch.equal(model.state_dict()["fc1.weight"], states[0]["fc1.weight"])


def test_data_order_is_a_function_of_seed_and_epoch(tiny_train_fn) -> None:
    p1 = tiny_train_fn._permutation(3, 2)
    assert torch.equal(p1, tiny_train_fn._permutation(3, 2))
    assert not torch.equal(p1, tiny_train_fn._permutation(3, 1))
    assert sorted(p1.tolist()) == list(range(512))
    assert derive_seed(0, "data") == derive_seed(0, "data") != derive_seed(1, "data")


def test_learning_rate_schedule() -> None:
    cfg = TrainingConfig(lr=1.0, milestones=(10, 5), gamma=0.5)
    assert [cfg.lr_at(t) for t in (0, 4, 5, 9, 10, 100)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.parametrize(
    ("kw", "field"),
    [(dict(lr=0.0), "lr"), (dict(batch_size=0), "batch_size"), (dict(optimizer="rmsprop"), "optimizer"),
     (dict(momentum=-1.0), "momentum")],
)
def test_bad_training_config(kw, field) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainingConfig(**kw)


def test_bad_specs_and_batch_bigger_than_data(tiny_data) -> None:
    with pytest.raises(ConfigError, match="start_step"):
        TrainSpec(5, 5, seed=0)
    x, y = tiny_data
    with pytest.raises(ConfigError, match="batch_size"):
        ClassifierTrainFn(x[:10], y[:10], TrainingConfig(batch_size=32))
