"""layer_output_errors: the tokenwise output error equals the exact XᵀX form on the same inputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from pruning_core.calibration import collect_activation_stats
from pruning_core.metrics import layer_output_errors, reconstruction_error


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False)).eval()


def test_matches_exact_hessian_form_and_leaves_model_unchanged():
    model = _model()
    batches = [torch.randn(5, 3, 8) for _ in range(3)]
    before = [model(b) for b in batches]
    pruned = {"0": model[0].weight.detach() * (torch.rand(16, 8) > 0.5), "2": model[2].weight.detach() * 0.5}
    errors = layer_output_errors(model, pruned, batches)
    ctx = collect_activation_stats(model, batches, layers=["0", "2"], hessian=True, progress=False)
    for name, new in pruned.items():
        exact = reconstruction_error(model.get_submodule(name).weight.detach(), new, ctx.require_stats(name))
        assert math.isclose(errors[name], exact, rel_tol=1e-4), name
    assert math.isclose(errors["2"], 0.5, rel_tol=1e-5)  # Ŵ = W/2 -> ‖XΔᵀ‖ = ‖XWᵀ‖/2, whatever X is
    for b, y in zip(batches, before, strict=True):
        assert torch.equal(model(b), y)
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_unpruned_layer_has_zero_error_and_zero_output_gives_inf():
    model = _model()
    batches = [torch.randn(4, 8)]
    errors = layer_output_errors(model, {"0": model[0].weight.detach().clone()}, batches)
    assert errors["0"] == 0.0
    with torch.no_grad():
        model[2].weight.zero_()
    errors = layer_output_errors(model, {"2": torch.ones(4, 16)}, batches)
    assert errors["2"] == math.inf
