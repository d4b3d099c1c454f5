"""SparseGPTImportance (OBS saliency from the real Hessian) and TaylorImportance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning_core.calibration import ActivationStats, CalibrationContext, collect_gradients
from pruning_core.calibration.gradients import GradientStats
from pruning_core.compat import SparseGPTImportance, TaylorImportance
from pruning_core.errors import (
    CalibrationRequired,
    ConfigError,
    MissingActivationStats,
    NumericalInstability,
    ShapeMismatch,
)
from pruning_core.importance import obs_saliency, taylor_scores
from pruning_core.solvers import inverse_hessian


def _ctx(name, x, hessian=True):
    s = ActivationStats(x.shape[-1], hessian=hessian)
    s.update(x)
    ctx = CalibrationContext()
    ctx.add_layer_stats(name, s)
    return ctx


# ---------------------------------------------------------------- seed SGP-* cases, ported
def test_hessian_of_seed_activations():
    # Seed: with_damp(0), X=[[1,2],[3,4]] -> H = XᵀX/n = [[5,7],[7,10]].
    s = ActivationStats(2, hessian=True)
    s.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert s.hessian.tolist() == [[5.0, 7.0], [7.0, 10.0]]


def test_relative_damping():
    # Seed: relative damping 0.1 on X=[[2,0],[0,2]] (H = 2I) -> λ = 0.2, diagonal 2.2.
    inv = inverse_hessian(2 * torch.eye(2), percdamp=0.1, upper=False, dtype=torch.float64)
    assert inv.damping == pytest.approx(0.2)
    torch.testing.assert_close(inv.hinv, torch.eye(2, dtype=torch.float64) / 2.2)


@pytest.mark.parametrize(
    ("h", "expected"),
    [([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]), ([[4.0, 2.0], [2.0, 2.0]], [[0.5, -0.5], [-0.5, 1.0]])],
)
def test_inverse(h, expected):
    inv = inverse_hessian(torch.tensor(h), percdamp=0.0, dtype=torch.float64)
    torch.testing.assert_close(inv.hinv, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(inv.upper.T @ inv.upper, inv.hinv)  # H⁻¹ = UᵀU, U upper
    assert torch.equal(inv.upper, torch.triu(inv.upper))


def test_singular_hessian_retries_then_fails():
    # Seed: [[1,1],[1,1]] -> "not positive definite". Here λ grows until it factors...
    inv = inverse_hessian(torch.ones(2, 2), percdamp=0.0)
    assert inv.retries >= 1 and inv.damping > 0
    # ... and with no retries allowed the error names the layer and the last λ.
    with pytest.raises(NumericalInstability, match="λ=0") as info:
        inverse_hessian(torch.ones(2, 2), percdamp=0.0, max_retries=0, name="blk.q")
    assert info.value.layer == "blk.q"
    with pytest.raises(ConfigError):
        inverse_hessian(torch.eye(2), percdamp=-0.1)


def test_saliency_seed_case():
    # Seed: W=[[1,2],[3,4]], H⁻¹=diag(1,2) -> w²/[H⁻¹]_jj = [[1,2],[9,8]]; so H = diag(1, 0.5).
    out = obs_saliency(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.diag(torch.tensor([1.0, 0.5])), percdamp=0.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [9.0, 8.0]]))
    neg = obs_saliency(torch.tensor([[-1.0, -2.0]]), torch.eye(2), percdamp=0.0)
    assert bool((neg >= 0).all())


def test_saliency_errors():
    with pytest.raises(ShapeMismatch):
        obs_saliency(torch.ones(2, 2), torch.eye(3))
    with pytest.raises(ShapeMismatch):
        obs_saliency(torch.ones(2), torch.eye(2))
    with pytest.raises(ShapeMismatch):
        obs_saliency(torch.ones(2, 2, 2), torch.eye(2))
    h = torch.eye(2)
    h[0, 1] = float("nan")
    with pytest.raises(NumericalInstability, match="Hessian"):
        obs_saliency(torch.ones(2, 2), h, layer_name="x")


def test_saliency_is_the_optimal_output_error_increase():
    # OBS: removing w_rj alone and re-solving the rest of row r optimally increases
    # ‖(W - Ŵ)Xᵀ‖² by exactly w_rj² / [H⁻¹]_jj with H = XᵀX (no damping). Checked by least squares.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)
    sal = obs_saliency(W, X.T @ X, percdamp=0.0).double()
    for r, j in [(0, 0), (1, 3), (2, 4)]:
        others = [c for c in range(5) if c != j]
        target = X @ W[r]  # (N,) the row's dense output
        sol = torch.linalg.lstsq(X[:, others], target[:, None]).solution[:, 0]
        increase = float(((X[:, others] @ sol - target) ** 2).sum())
        assert sal[r, j].item() == pytest.approx(increase, rel=1e-4)


def test_saliency_uses_the_real_hessian_through_protocol():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    x[:, 1] = x[:, 0] + 0.01 * x[:, 1]  # strongly correlated inputs
    lin = nn.Linear(6, 4, bias=False)
    ctx = _ctx("fc", x)
    got = SparseGPTImportance("fc").compute(lin, ctx)
    assert got.method == "sparsegpt_saliency" and got.shape == (4, 6)
    H = (x.double().T @ x.double()) / 64
    H += 0.01 * H.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    expected = lin.weight.detach().double() ** 2 / torch.linalg.inv(H).diagonal()[None, :]
    torch.testing.assert_close(got.values.double(), expected, rtol=1e-4, atol=1e-8)


def test_sparsegpt_importance_errors():
    lin = nn.Linear(3, 2)
    with pytest.raises(CalibrationRequired):
        SparseGPTImportance("fc").compute(lin)
    with pytest.raises(CalibrationRequired, match="hessian"):
        SparseGPTImportance("fc").compute(lin, _ctx("fc", torch.ones(4, 3), hessian=False))
    with pytest.raises(MissingActivationStats):
        SparseGPTImportance("other").compute(lin, _ctx("fc", torch.ones(4, 3)))
    with pytest.raises(ConfigError):
        SparseGPTImportance(percdamp=-1.0)
    imp = SparseGPTImportance("fc", percdamp=0.05, block_size=64)
    assert (imp.block_size, imp.percdamp, imp.name) == (64, 0.05, "sparsegpt")


def test_dead_inputs_score_zero():
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    x[:, 2] = 0.0
    out = SparseGPTImportance("fc").compute(nn.Linear(3, 2), _ctx("fc", x)).values
    assert bool((out[:, 2] == 0).all()) and bool((out[:, :2] > 0).all())


# ---------------------------------------------------------------- Taylor
def test_taylor_golden():
    assert taylor_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]])).tolist() == [[0.5, 0.5]]


def test_taylor_equals_exact_loss_change_for_a_linear_loss():
    # L(W) = Σ (W x)·y is linear in W, so zeroing w_ij changes L by exactly -w_ij ∂L/∂w_ij.
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)) for _ in range(2)]

    def loss_fn(m, b):
        return (m(b[0]) * b[1]).sum()

    ctx = collect_gradients(model, batches, loss_fn, progress=False)
    scores = TaylorImportance("").compute(model, ctx, layer_name="").values
    def total():
        with torch.no_grad():
            return sum(float(loss_fn(model, b)) for b in batches) / len(batches)

    base = total()
    for i, j in [(0, 0), (1, 2), (2, 3)]:
        with torch.no_grad():
            saved = model.weight[i, j].item()
            model.weight[i, j] = 0.0
            change = abs(total() - base)
            model.weight[i, j] = saved
        assert scores[i, j].item() == pytest.approx(change, rel=1e-4, abs=1e-6)


def test_taylor_reductions_and_errors():
    w = torch.tensor([[1.0, -2.0]])
    gs = GradientStats((1, 2), name="fc")
    gs.update(torch.tensor([[1.0, 1.0]]))
    gs.update(torch.tensor([[-1.0, 3.0]]))
    ctx = CalibrationContext()
    ctx.add_gradient_stats("fc", gs)
    assert TaylorImportance("fc").compute(w, ctx).values.tolist() == [[0.0, 4.0]]  # |w · mean g|
    abs_scores = TaylorImportance("fc", reduction="mean_abs").compute(w, ctx)
    assert abs_scores.values.tolist() == [[1.0, 4.0]] and abs_scores.method == "taylor_mean_abs"
    with pytest.raises(CalibrationRequired):
        TaylorImportance("fc").compute(w)
    with pytest.raises(MissingActivationStats):
        TaylorImportance("nope").compute(w, ctx)
    with pytest.raises(ConfigError):
        TaylorImportance(reduction="sum")  # type: ignore[arg-type]
    bad = GradientStats((1, 2), name="fc")
    with pytest.raises(NumericalInstability) as info:
        bad.update(torch.tensor([[0.0, float("nan")]]))
    assert info.value.index == (0, 1) and info.value.layer == "fc"
    with pytest.raises(NumericalInstability):
        taylor_scores(torch.tensor([[float("inf")]]), torch.ones(1, 1))
    with pytest.raises(ShapeMismatch):
        taylor_scores(torch.ones(2, 2), torch.ones(2))
