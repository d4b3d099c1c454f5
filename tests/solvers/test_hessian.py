"""inverse_hessian: dead inputs, dampening and retries against a direct computation."""

from __future__ import annotations

import torch

from pruning_core.solvers.hessian import inverse_hessian


def _direct(H: torch.Tensor, lam: float) -> torch.Tensor:
    """(H with dead diagonals set to 1, plus λI)⁻¹, computed the plain way in float64."""
    H = H.double().clone()
    d = torch.diagonal(H)
    d[d == 0] = 1.0
    d += lam
    return torch.linalg.inv(H)


def test_dead_inputs_and_damping_match_a_direct_inverse_and_leave_the_input_alone():
    torch.manual_seed(0)
    X = torch.randn(64, 6, dtype=torch.float64)
    X[:, 2] = 0  # a dead input
    H = X.T @ X
    before = H.clone()
    inv = inverse_hessian(H, percdamp=0.01, dtype=torch.float64)
    assert torch.equal(H, before)  # the caller's Hessian is never modified
    assert inv.dead.tolist() == [False, False, True, False, False, False]
    diag = torch.diagonal(H).clone()
    diag[2] = 1.0
    assert inv.damping == 0.01 * float(diag.mean()) and inv.retries == 0
    torch.testing.assert_close(inv.hinv, _direct(H, inv.damping), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inv.upper.T @ inv.upper, inv.hinv, rtol=1e-10, atol=1e-12)  # H⁻¹ = UᵀU
    assert torch.equal(inv.upper, inv.upper.triu())


def test_retries_grow_lambda_until_the_factorization_succeeds():
    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64)  # indefinite: eigenvalues 4, -2
    before = H.clone()
    inv = inverse_hessian(H, percdamp=0.01, dtype=torch.float64)
    # λ = 0.01 -> 0.1 -> 1 -> 10: the first that makes H + λI positive definite (λ > 2) is 10
    assert inv.retries == 3 and abs(inv.damping - 10.0) < 1e-9
    assert torch.equal(H, before)
    torch.testing.assert_close(inv.hinv, _direct(H, inv.damping), rtol=1e-10, atol=1e-12)
