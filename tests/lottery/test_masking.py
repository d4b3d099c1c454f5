"""Mask selection for IMP: exact survivor counts (seed histories), monotonicity, ties, validation."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.compat import LotteryTicketPruner
from pruning_core.errors import (
    InvalidMask,
    InvalidPattern,
    InvalidSparsity,
    NumericalInstability,
    ShapeMismatch,
)
from pruning_core.lottery import (
    LotteryTicketConfig,
    check_masks,
    magnitude_prune,
    random_masks_like,
    survivors,
)
from pruning_core.masks.pattern import NM, Unstructured


def _history(n: int, s: float, r: int) -> list[float]:
    p = LotteryTicketConfig(target_sparsity=s, pruning_rounds=r).rate
    return [round(1 - survivors(n, p, k) / n, 4) for k in range(1, r + 1)]


@pytest.mark.parametrize(
    ("n", "s", "r", "expected"),
    [
        (8, 0.5, 2, [0.25, 0.5]),  # seed: 8 weights 1..8 at (0.5, 2), 4 left
        (10, 0.9, 5, [0.4, 0.6, 0.7, 0.8, 0.9]),
        (10, 0.9, 10, [0.2, 0.4, 0.5, 0.6, 0.7, 0.7, 0.8, 0.8, 0.9, 0.9]),
        (4, 0.5, 1, [0.5]),
        # seed example Linear(256, 128) at (0.9, 10): 32,768 -> 3,277 left.
        (32768, 0.9, 10, [0.2057, 0.3690, 0.4988, 0.6019, 0.6838, 0.7488, 0.8005, 0.8415, 0.8741, 0.9000]),
    ],
)
def test_seed_sparsity_histories(n: int, s: float, r: int, expected: list[float]) -> None:
    assert _history(n, s, r) == expected


def test_survivors_edge_cases() -> None:
    assert survivors(32768, LotteryTicketConfig().rate, 10) == 3277
    assert survivors(5, 0.99, 30) == 1  # never below one weight per group
    assert survivors(0, 0.5, 3) == 0
    assert survivors(1000, 0.2, 0) == 1000


def _prune_chain(cfg: LotteryTicketConfig, weights: dict[str, torch.Tensor], rounds: int) -> list[dict[str, torch.Tensor]]:
    masks = [{n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}]
    gen = torch.Generator().manual_seed(0)
    for r in range(1, rounds + 1):
        # Simulate training between rounds: new magnitudes every round.
        trained = {n: torch.randn(w.shape, generator=gen) * masks[-1][n] for n, w in weights.items()}
        masks.append(magnitude_prune(cfg, trained, masks[-1], r))
    return masks


@given(st.integers(1, 40), st.integers(1, 30), st.floats(0.05, 0.6), st.integers(1, 6))
def test_layerwise_masks_are_nested_with_exact_counts(rows: int, cols: int, rate: float, rounds: int) -> None:
    weights = {"a": torch.zeros(rows, cols), "b": torch.zeros(cols, 3)}
    cfg = LotteryTicketConfig(
        target_sparsity=None, prune_rate_per_round=rate, global_pruning=False, layer_rates={"b": rate / 2}
    )
    chain = _prune_chain(cfg, weights, rounds)
    for r in range(1, rounds + 1):
        for name, mask in chain[r].items():
            assert not bool((chain[r][name] & ~chain[r - 1][name]).any()), "mask must be a subset of the previous"
            layer_rate = rate / 2 if name == "b" else rate
            assert int(mask.sum()) == survivors(mask.numel(), layer_rate, r)


@given(st.integers(1, 6), st.floats(0.05, 0.6))
def test_global_masks_exact_total_and_global_threshold(rounds: int, rate: float) -> None:
    weights = {"a": torch.zeros(20, 10), "b": torch.zeros(10, 5)}
    cfg = LotteryTicketConfig(target_sparsity=None, prune_rate_per_round=rate)
    masks = [{n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}]
    gen = torch.Generator().manual_seed(1)
    for r in range(1, rounds + 1):
        trained = {n: torch.randn(w.shape, generator=gen) * masks[-1][n] for n, w in weights.items()}
        new = magnitude_prune(cfg, trained, masks[-1], r)
        assert sum(int(m.sum()) for m in new.values()) == survivors(250, rate, r)
        kept = torch.cat([trained[n][new[n]].abs() for n in new])
        dropped = torch.cat([trained[n][masks[-1][n] & ~new[n]].abs() for n in new])
        if kept.numel() and dropped.numel():
            assert float(kept.min()) >= float(dropped.max())  # one threshold across layers
        masks.append(new)


def test_ties_keep_the_lower_index_and_pruned_weights_never_return() -> None:
    cfg = LotteryTicketConfig(target_sparsity=0.5, pruning_rounds=1, global_pruning=False)
    w = {"w": torch.tensor([[1.0, 1.0, 1.0, 1.0]])}
    m = magnitude_prune(cfg, w, {"w": torch.ones(1, 4, dtype=torch.bool)}, 1)
    assert m["w"].tolist() == [[True, True, False, False]]
    # A pruned weight with a (spurious) large value is not revived by the next round.
    cfg2 = LotteryTicketConfig(target_sparsity=0.75, pruning_rounds=2, global_pruning=False)
    current = {"w": torch.tensor([[True, False, True, True]])}
    m2 = magnitude_prune(cfg2, {"w": torch.tensor([[3.0, 100.0, 1.0, 2.0]])}, current, 2)
    assert m2["w"].tolist() == [[True, False, False, False]]


def test_magnitude_prune_rejects_nan_weights() -> None:
    cfg = LotteryTicketConfig(target_sparsity=0.5, pruning_rounds=1)
    w = {"fc.weight": torch.tensor([[1.0, float("nan")]])}
    with pytest.raises(NumericalInstability, match="fc.weight"):
        magnitude_prune(cfg, w, {"fc.weight": torch.ones(1, 2, dtype=torch.bool)}, 1)


@given(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-10, 10, width=32)), st.floats(0, 1))
def test_generate_mask_prunes_exactly_floor_n_s(values: np.ndarray, s: float) -> None:
    scores = torch.from_numpy(values).abs()
    mask = LotteryTicketPruner().generate_mask(scores, s).tensor
    n = scores.numel()
    assert int((~mask).sum()) == min(n, int(np.floor(round(n * s, 9))))
    if mask.any() and (~mask).any():
        assert float(scores[mask].min()) >= float(scores[~mask].max())


def test_generate_mask_seed_cases_and_errors() -> None:
    pruner = LotteryTicketPruner()
    assert pruner.generate_mask(torch.tensor([0.1, 0.4, 0.2, 0.3]), 0.5).tensor.tolist() == [False, True, False, True]
    assert pruner.generate_mask(torch.tensor([0.1, 0.4]), 0.5, Unstructured()).tensor.tolist() == [False, True]
    with pytest.raises(InvalidPattern, match="unstructured"):
        pruner.generate_mask(torch.rand(8), 0.5, NM(2, 4))
    with pytest.raises(InvalidSparsity):
        pruner.generate_mask(torch.rand(8), 1.5)
    with pytest.raises(NumericalInstability, match="NaN"):
        pruner.generate_mask(torch.tensor([0.1, float("nan")]), 0.5)


def test_apply_mask_prunes_two_of_four() -> None:
    lin = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    res = LotteryTicketPruner().apply_mask(lin, torch.tensor([[True, False, True, False]]))
    assert lin.weight.tolist() == [[1.0, 0.0, 3.0, 0.0]]
    assert (res.parameters_pruned, res.total_parameters, res.achieved_sparsity) == (2, 4, 0.5)
    assert res.compression_ratio() == 2.0
    assert LotteryTicketPruner().name == "lottery_ticket_pruner"


def test_random_masks_keep_per_layer_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(30, 20, generator=gen) > 0.8, "b": torch.rand(10, generator=gen) > 0.5}
    rnd = random_masks_like(masks, torch.Generator().manual_seed(1))
    assert {n: int(m.sum()) for n, m in rnd.items()} == {n: int(m.sum()) for n, m in masks.items()}
    assert not torch.equal(rnd["a"], masks["a"])
    assert torch.equal(rnd["a"], random_masks_like(masks, torch.Generator().manual_seed(1))["a"])


def test_check_masks_errors_name_the_layer() -> None:
    params = {"fc.weight": torch.zeros(2, 3)}
    with pytest.raises(InvalidMask, match="missing \\['fc.weight'\\]"):
        check_masks(params, {"other": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(InvalidMask, match="fc.weight.*torch.bool"):
        check_masks(params, {"fc.weight": torch.ones(2, 3)})
    with pytest.raises(ShapeMismatch, match="fc.weight"):
        check_masks(params, {"fc.weight": torch.ones(3, 2, dtype=torch.bool)})
