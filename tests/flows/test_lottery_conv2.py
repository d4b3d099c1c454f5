"""The Lottery Ticket flow with the paper's Conv-2: the shipped quick config, shortened, on real Fashion-MNIST.

The search keeps the shipped config's model, rates and controls and shortens only what sets its
length (iterations, rewind point, batch, subsets), so it runs in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from flows.jobs import load_config, parse_config
from flows.lottery import build_model
from flows.lottery.flow import lottery_flow
from pruning_core.lottery import LotteryTicketPruner, evaluate, load_ticket
from pruning_core.vision import fashion_mnist_available, load_fashion_mnist

pytestmark = pytest.mark.flows
needs_data = pytest.mark.skipif(not fashion_mnist_available(), reason="dataset-fashion-mnist is not installed")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lottery-conv2-quick.yaml"
SIZES = {  # weights per pruned tensor of Conv-2 on 1x28x28 inputs
    "conv.0.weight": 64 * 1 * 3 * 3,
    "conv.1.weight": 64 * 64 * 3 * 3,
    "hidden.0.weight": 64 * 14 * 14 * 256,
    "hidden.1.weight": 256 * 256,
    "output.weight": 256 * 10,
}
STEPS, TEST_SUBSET = 12, 200


def short_job(tracking_uri: str) -> dict:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["search"].update(training_steps=STEPS, rewind_strategy="early:4")
    raw["training"].update(batch_size=30, eval_every=STEPS)
    raw["data"].update(train_subset=600, test_subset=TEST_SUBSET)
    raw["tracking"] = {**raw.get("tracking", {}), "tracking_uri": tracking_uri, "experiment": "lottery-conv2-tests"}
    return raw


def test_shipped_conv2_quick_config_uses_the_papers_rate_ratios():
    job = load_config(CONFIG)
    cfg = job.lottery_config()
    assert job.model == "conv2" and job.controls == ["random_reinit", "random_mask"]
    assert {n: cfg.layer_rate(n) for n in SIZES} == {
        "conv.0.weight": 0.25, "conv.1.weight": 0.25, "hidden.0.weight": 0.5, "hidden.1.weight": 0.5,
        "output.weight": 0.25}  # convolutions and output at half the fully connected rate (Frankle & Carbin)
    assert job.data.train_subset is None  # the real 60k training set


@needs_data
def test_conv2_search_through_the_flow(prefect_server, mlflow_uri, tmp_path):
    job = parse_config(short_job(mlflow_uri))
    cfg = job.lottery_config()
    rounds = cfg.pruning_rounds
    summary = lottery_flow(job, str(tmp_path / "out"))

    assert summary["model"] == "conv2" and [r["round"] for r in summary["rounds"]] == list(range(rounds + 1))
    for row in summary["rounds"]:
        r = row["round"]
        kept = {n: math.floor(size * (1 - cfg.layer_rate(n)) ** r + 0.5) for n, size in SIZES.items()}
        assert row["layer_density"] == pytest.approx({n: kept[n] / SIZES[n] for n in SIZES}, rel=1e-12)
        assert row["density"] == pytest.approx(sum(kept.values()) / sum(SIZES.values()), rel=1e-12)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        controls = (row["random_reinit_accuracy"], row["random_mask_accuracy"])
        assert controls == (None, None) if r == 0 else all(0.0 <= a <= 1.0 for a in controls)
    assert summary["dense_accuracy"] > 0.3  # 12 steps of Conv-2 are well above chance (0.1)
    assert summary["rounds"][-1]["layer_density"]["conv.1.weight"] == pytest.approx(20736 / 36864)

    ticket = load_ticket(summary["ticket_path"])
    assert ticket.round == rounds == summary["ticket_round"] and set(ticket.masks) == set(SIZES)
    assert ticket.density == pytest.approx(summary["ticket_density"], rel=1e-12)
    assert ticket.masks["conv.1.weight"].shape == (64, 64, 3, 3)
    model = build_model("conv2", seed=99)
    LotteryTicketPruner(cfg).apply_ticket(model, ticket, weights="trained")
    assert all(not model.state_dict()[n][~m].any() for n, m in ticket.masks.items())
    test = load_fashion_mnist("test").subset(TEST_SUBSET, seed=0)
    assert evaluate(model, test.images, test.labels)["accuracy"] == summary["ticket_accuracy"]
    assert summary["registered_model"]["uri"] == "models:/lottery-conv2@winning"
