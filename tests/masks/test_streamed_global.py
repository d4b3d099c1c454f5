"""The streamed global selection (one layer's scores at a time) equals the all-at-once one exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pruning_core.errors import NumericalInstability
from pruning_core.masks import GlobalSelection, generate_global_masks, plan_global_selection


def _same(scores: dict[str, torch.Tensor], sparsity: float, limit: int) -> None:
    loads: list[str] = []

    def load(name: str) -> torch.Tensor:
        loads.append(name)
        return scores[name]

    plan = plan_global_selection(list(scores), load, sparsity, collect_limit=limit)
    plan = GlobalSelection.from_dict(plan.to_dict())  # what a resumed job reads back
    want = generate_global_masks(scores, sparsity)
    for name, tensor in scores.items():
        assert torch.equal(plan.mask(name, tensor), want[name].tensor), (name, sparsity, limit)
    assert max(loads.count(n) for n in scores) <= 6  # a few passes, each reading one layer at a time


@given(seed=st.integers(0, 2**16), sparsity=st.floats(0, 1), limit=st.sampled_from([0, 1, 7, 1 << 22]))
def test_equals_the_all_at_once_selection_with_ties(seed, sparsity, limit):
    g = torch.Generator().manual_seed(seed)
    scores = {f"tied.{i}": torch.randint(-2, 3, (int(torch.randint(1, 6, (1,), generator=g)), 8), generator=g).float()
              for i in range(3)}
    scores["tied.1"][0, :3] = torch.tensor([-0.0, 0.0, -0.0])  # -0.0 ties with +0.0
    scores["normal"] = torch.randn(8, 16, generator=g)
    scores["float64"] = torch.randn(3, 5, generator=g, dtype=torch.float64) * 1e200
    scores["empty"] = torch.zeros(0, 4)
    _same(scores, sparsity, limit)


def test_all_equal_scores_and_extremes():
    _same({"a": torch.ones(100), "b": torch.ones(50)}, 0.3, 0)  # 64 bits fixed: ties counted, not collected
    tiny = torch.tensor([5e-324, -5e-324, 1e-300, -1e300, 1e300, 3.0], dtype=torch.float64)
    for s in (0.0, 0.2, 0.5, 0.9, 1.0):
        _same({"a": tiny, "b": torch.tensor([0.0, -0.0, 1.0, -1.0])}, s, 1)


def test_tiny_model_scores(tiny_llama):
    """Magnitude and Wanda-like scores of a tiny Llama's weights (float32 [out, in])."""
    from pruning_core.arch import prunable_units

    units = prunable_units(tiny_llama)
    magnitude = {u.name: u.read(tiny_llama).abs() for u in units}
    wanda = {u.name: u.read(tiny_llama).abs() * torch.linspace(0.5, 2, u.in_features) for u in units}
    for scores in (magnitude, wanda):
        for s in (0.25, 0.6):
            _same(scores, s, 1 << 10)


def test_a_non_finite_score_names_its_layer():
    with pytest.raises(NumericalInstability, match="'b'"):
        plan_global_selection(["a", "b"], {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}.__getitem__, 0.5)
