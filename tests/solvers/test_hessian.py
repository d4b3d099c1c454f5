"""inverse_hessian: dead inputs, dampening and retries against a direct computation; the symmetry check."""

from __future__ import annotations

import pytest
import torch

from pruning_core.calibration.hessian import SYMMETRY_RTOL, check_symmetric, inverse_hessian
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import NumericalInstability


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


# ---------------------------------------------------------------- symmetry (issue 14)
def test_float32_sums_of_xtx_pass_the_symmetry_check():
    g = torch.Generator().manual_seed(1)
    stats = ActivationStats(96, hessian=True)
    for _ in range(4):  # float32 batch products summed in float64, channels of very different sizes
        stats.update(torch.randn(3, 50, 96, generator=g) * torch.logspace(-3, 3, 96))
    check_symmetric(stats.hessian, method="sparsegpt", name="l")
    check_symmetric(stats.hessian.float(), method="sparsegpt", name="l")


def test_an_asymmetric_entry_is_named_with_its_size():
    X = torch.randn(64, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    H = X.T @ X  # 300 inputs: more than one chunk of rows
    scale = float(torch.sqrt(H[290, 290] * H[4, 4]))
    H[290, 4] += 10 * SYMMETRY_RTOL * scale
    with pytest.raises(NumericalInstability, match=r"H\[290,4\]") as info:
        check_symmetric(H, method="gptq", name="model.layers.2.mlp.down_proj")
    assert info.value.layer == "model.layers.2.mlp.down_proj" and set(info.value.index) == {290, 4}
    H[290, 4] -= 9.5 * SYMMETRY_RTOL * scale  # 0.5 x the tolerance: accepted
    check_symmetric(H, method="gptq", name="x")


def test_a_dead_input_must_be_exactly_symmetric():
    H = torch.eye(4, dtype=torch.float64)
    H[2, 2] = 0.0
    check_symmetric(H, method="sparsegpt", name=None)
    H[2, 0] = 1e-12
    with pytest.raises(NumericalInstability, match="not symmetric"):
        check_symmetric(H, method="sparsegpt", name=None)
