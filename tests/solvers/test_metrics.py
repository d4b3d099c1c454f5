"""pruning_core.metrics: reconstruction error from XᵀX and sparsity helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pruning_core.calibration import ActivationStats
from pruning_core.errors import CalibrationRequired, NumericalInstability, ShapeMismatch
from pruning_core.metrics import (
    layer_sparsity,
    mask_sparsity,
    overall_sparsity,
    reconstruction_error,
    tensor_sparsity,
)


def test_reconstruction_error_equals_the_token_computation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 50, 12, generator=g)  # [B, T, in]
    W = torch.randn(7, 12, generator=g)
    W_hat = W * (torch.rand(7, 12, generator=g) > 0.5)
    stats = ActivationStats(12, hessian=True)
    stats.update(X)
    tokens = X.reshape(-1, 12).double()
    expected = ((tokens @ (W - W_hat).double().T).norm() / (tokens @ W.double().T).norm()).item()
    assert reconstruction_error(W, W_hat, stats) == pytest.approx(expected, rel=1e-5)
    assert reconstruction_error(W, W_hat, stats.xtx * 3.7) == pytest.approx(expected, rel=1e-5)  # scale-free
    assert reconstruction_error(W, W, stats) == 0.0
    assert reconstruction_error(W, torch.zeros_like(W), stats) == pytest.approx(1.0)


def test_reconstruction_error_edge_cases_and_errors():
    zero_in = torch.zeros(3, 3)
    assert reconstruction_error(torch.ones(2, 3), torch.zeros(2, 3), zero_in) == 0.0
    assert reconstruction_error(torch.zeros(2, 3), torch.ones(2, 3), torch.eye(3)) == math.inf
    with pytest.raises(CalibrationRequired):
        reconstruction_error(torch.ones(2, 3), torch.ones(2, 3), ActivationStats(3))
    with pytest.raises(ShapeMismatch):
        reconstruction_error(torch.ones(2, 3), torch.ones(3, 2), torch.eye(3))
    with pytest.raises(ShapeMismatch):
        reconstruction_error(torch.ones(2, 3), torch.ones(2, 3), torch.eye(2))
    with pytest.raises(NumericalInstability):
        reconstruction_error(torch.ones(2, 3), torch.full((2, 3), float("nan")), torch.eye(3))


def test_sparsity_helpers():
    assert tensor_sparsity(torch.tensor([0.0, 1.0, 0.0, 2.0])) == 0.5
    assert tensor_sparsity(torch.empty(0)) == 0.0
    assert mask_sparsity(torch.tensor([True, False, False, False])) == 0.75
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        model[2].weight.fill_(1.0)
    assert layer_sparsity(model) == {"0": 0.5, "2": 0.0}
    assert overall_sparsity(model) == pytest.approx(2 / 12)
    assert overall_sparsity(model, ["0"]) == 0.5
