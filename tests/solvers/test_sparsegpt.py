"""sparsegpt_prune against hand cases, a plain transcription of Algorithm 1 and the authors' code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pruning_core.errors import (
    ConfigError,
    InvalidPattern,
    InvalidSparsity,
    NumericalInstability,
    ShapeMismatch,
)
from pruning_core.masks.pattern import NM, Block, Unstructured
from pruning_core.metrics import reconstruction_error
from pruning_core.solvers import sparsegpt_prune
from pruning_core.validate import num_to_prune
from tests.solvers.reference_fasterprune import reference_fasterprune, reference_hessian


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Tokens ``[n, d]`` from a low-rank factor model plus noise: strongly correlated channels of
    different sizes (as LLM activations are)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, max(d // 4, 1), generator=g) @ torch.randn(max(d // 4, 1), d, generator=g)
    scales = torch.logspace(-0.5, 0.5, d)[torch.randperm(d, generator=g)]
    return (factors + 0.3 * torch.randn(n, d, generator=g)) * scales


def _problem(rows=24, cols=64, n=256, seed=0):
    X = _correlated_inputs(n, cols, seed)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 100))
    return W, X, X.T @ X


# ---------------------------------------------------------------- plain Algorithm 1, written out
def plain_algorithm1(W, H, sparsity, *, nm=None, blocksize=16, percdamp=0.01):
    """SparseGPT without lazy batching or Cholesky, in float64: keep the explicit inverse Hessian
    of the not-yet-fixed columns and eliminate each column after fixing it (OBS, Hassibi & Stork).
    Selection uses the same scores w²/[H_F⁻¹]_cc (F = columns >= c) and the same tie rule."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    keep = torch.ones(rows, cols, dtype=torch.bool)

    def eliminate(Hi, j):
        return Hi - torch.outer(Hi[:, j], Hi[j, :]) / Hi[j, j]

    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        d, tmp = [], Hinv.clone()  # diag of the inverse after eliminating the earlier columns
        for c in range(b0, b1):
            d.append(tmp[c, c].item())
            tmp = eliminate(tmp, c)
        d = torch.tensor(d, dtype=torch.float64)
        if nm is None:
            scores = (W[:, b0:b1] ** 2 / d[None, :]).flatten()
            k = num_to_prune(scores.numel(), sparsity)
            order = torch.argsort(scores, descending=True, stable=True)
            pruned = torch.zeros_like(scores, dtype=torch.bool)
            pruned[order[scores.numel() - k:]] = True
            keep[:, b0:b1] = ~pruned.reshape(rows, b1 - b0)
        for j in range(b0, b1):
            if nm is not None and (j - b0) % nm[1] == 0:
                g = slice(j, j + nm[1])
                s = W[:, g] ** 2 / d[None, j - b0:j - b0 + nm[1]]
                order = torch.argsort(s, dim=1, descending=True, stable=True)
                k_nm = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order[:, :nm[0]], True)
                keep[:, g] = k_nm
            for r in torch.nonzero(~keep[:, j]).flatten().tolist():
                W[r, j:] -= W[r, j] / Hinv[j, j] * Hinv[j, j:]  # OBS update; sets W[r, j] = 0
            Hinv = eliminate(Hinv, j)
    W[~keep] = 0
    return W, keep


# ---------------------------------------------------------------- agreement
@pytest.mark.parametrize("pattern", [None, NM(2, 4), NM(1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agrees_with_plain_algorithm1(pattern, dtype):
    W, _, H = _problem()
    s = 0.6 if pattern is None else 1 - pattern.n / pattern.m
    nm = None if pattern is None else (pattern.n, pattern.m)
    ref_w, ref_keep = plain_algorithm1(W, H, s, nm=nm, blocksize=16)
    got_w, got_keep = sparsegpt_prune(W, H, s, pattern=pattern, blocksize=16, dtype=dtype)
    assert torch.equal(got_keep, ref_keep)
    torch.testing.assert_close(got_w.double(), ref_w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_matches_the_authors_fasterprune(sparsity):
    # The reference prunes int(numel·s) + 1 weights per block (tmp <= thresh at index int(numel·s)).
    # Asking for that exact count, the two implementations produce the same weights.
    W, X, _ = _problem(rows=32, cols=96, seed=1)
    H = reference_hessian([X.reshape(4, -1, 96)[i:i + 1] for i in range(4)])
    ref = reference_fasterprune(W, H, sparsity, blocksize=32)
    numel = 32 * 32
    got, keep = sparsegpt_prune(W, H, (int(numel * sparsity) + 1) / numel, blocksize=32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(keep, ref != 0)


def test_matches_the_authors_fasterprune_2_4():
    W, X, H = _problem(rows=32, cols=96, seed=2)
    ref = reference_fasterprune(W, H, 0.5, prunen=2, prunem=4, blocksize=32)
    got, keep = sparsegpt_prune(W, H, 0.5, pattern=NM(2, 4), blocksize=32)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # float32, different op order
    assert torch.equal(keep, ref != 0)


# ---------------------------------------------------------------- golden: H = I
def test_identity_hessian_is_per_block_magnitude_and_keeps_weights():
    # With a diagonal H the OBS update has no cross-column terms: kept weights stay as they were
    # and the mask is a per-block magnitude selection (exactly floor(numel·s) per block).
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    new, keep = sparsegpt_prune(W, torch.eye(32), 0.5, blocksize=8)
    for b in range(0, 32, 8):
        block = W[:, b:b + 8].abs().flatten()
        order = torch.argsort(block, descending=True, stable=True)
        expected = torch.zeros(64, dtype=torch.bool)
        expected[order[:32]] = True
        assert torch.equal(keep[:, b:b + 8].flatten(), expected)
    assert torch.equal(new[keep], W[keep])
    assert bool((new[~keep] == 0).all())


def test_identity_hessian_2_4_golden():
    # Row [1..8], 2:4: keep the two largest per group of four -> [3, 4, 7, 8].
    W = torch.arange(1.0, 9.0)[None, :]
    new, keep = sparsegpt_prune(W, torch.eye(8), 0.5, pattern=NM(2, 4), blocksize=8)
    assert new.tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_ties_keep_the_lower_index():
    W = torch.ones(1, 8)
    _, keep = sparsegpt_prune(W, torch.eye(8), 0.5, blocksize=8)
    assert keep.tolist() == [[True] * 4 + [False] * 4]
    _, keep = sparsegpt_prune(W, torch.eye(8), 0.5, pattern=NM(2, 4), blocksize=8)
    assert keep.tolist() == [[True, True, False, False] * 2]


# ---------------------------------------------------------------- quality
@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4)])
def test_lower_reconstruction_error_than_wanda_and_magnitude(pattern):
    W, X, H = _problem(rows=48, cols=128, n=512, seed=3)
    new, keep = sparsegpt_prune(W, H, 0.5, pattern=pattern, blocksize=32)
    norms = X.norm(dim=0)
    wanda, magnitude = W.abs() * norms[None, :], W.abs()
    if isinstance(pattern, NM):
        def select(scores):  # 2 best per group of 4 in each row
            g = scores.reshape(48, -1, 4)
            order = torch.argsort(g, dim=2, descending=True, stable=True)
            return torch.zeros_like(g, dtype=torch.bool).scatter_(2, order[..., :2], True).reshape(48, 128)
    else:
        def select(scores):  # 50% per output row (Wanda's comparison group)
            order = torch.argsort(scores, dim=1, descending=True, stable=True)
            return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :64], True)
    err_sgpt = reconstruction_error(W, new, H)
    err_wanda = reconstruction_error(W, W * select(wanda), H)
    err_mag = reconstruction_error(W, W * select(magnitude), H)
    assert err_sgpt < err_wanda < err_mag
    assert err_sgpt < 0.8 * err_wanda  # a clear margin, not a rounding artefact
    assert float((~keep).float().mean()) == 0.5


# ---------------------------------------------------------------- counts, dtype, scale
@settings(max_examples=25)
@given(
    w=arrays(np.float32, (6, 24), elements=st.floats(-5, 5, width=32, allow_subnormal=False)),
    s=st.floats(0.0, 0.95),
    blocksize=st.sampled_from([4, 8, 10, 24, 128]),
)
def test_exact_count_per_block_and_zeros(w, s, blocksize):
    W = torch.from_numpy(w)
    X = _correlated_inputs(48, 24, 7)
    new, keep = sparsegpt_prune(W, X.T @ X, s, blocksize=blocksize)
    for b in range(0, 24, blocksize):
        block = keep[:, b:b + blocksize]
        assert int((~block).sum()) == num_to_prune(block.numel(), s)
    assert bool((new[~keep] == 0).all()) and bool(torch.isfinite(new).all())


def test_nm_structure_holds():
    W, _, H = _problem(rows=16, cols=64, seed=4)
    _, keep = sparsegpt_prune(W, H, 0.75, pattern=NM(1, 4))
    assert bool((keep.reshape(16, -1, 4).sum(-1) == 1).all())
    NM(1, 4).validate(keep)


def test_dtype_and_device_preserved():
    W, _, H = _problem(rows=8, cols=32)
    new, keep = sparsegpt_prune(W.to(torch.bfloat16), H, 0.5)
    assert new.dtype == torch.bfloat16 and keep.dtype == torch.bool and new.shape == W.shape


def test_invariant_to_hessian_scale():
    # Relative damping makes the solver invariant to H -> cH (the reference uses 2/n·XᵀX).
    W, _, H = _problem(seed=6)
    H = H.double()  # scale exactly: float32 rounding of cH would perturb an ill-conditioned H
    a, ka = sparsegpt_prune(W, H, 0.5, dtype=torch.float64)
    b, kb = sparsegpt_prune(W, H * (2 / 256), 0.5, dtype=torch.float64)
    c, kc = sparsegpt_prune(W, H * 1e4, 0.5, dtype=torch.float64)
    assert torch.equal(ka, kb) and torch.equal(ka, kc)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(a, c, atol=1e-9, rtol=1e-9)


def test_existing_mask_stays_pruned():
    W, _, H = _problem(rows=8, cols=32, seed=8)
    prior = torch.ones_like(W, dtype=torch.bool)
    prior[:, :3] = False  # 24 weights already pruned
    new, keep = sparsegpt_prune(W, H, 0.5, mask=prior, blocksize=32)
    assert not bool(keep[:, :3].any())
    assert int((~keep).sum()) == 128  # forced ones count toward the 50%
    _, keep_hi = sparsegpt_prune(W, H, 0.05, mask=prior, blocksize=32)
    assert int((~keep_hi).sum()) == 24  # more forced than k: exactly the forced ones


# ---------------------------------------------------------------- singular and bad Hessians
def test_all_zero_inputs():
    W = torch.randn(4, 16)
    new, keep = sparsegpt_prune(W, torch.zeros(16, 16), 0.5)
    assert bool((new == 0).all())  # every input is dead: every weight is zeroed (as the reference)
    assert not bool(keep.any())  # ... and the mask says so (the weights are zero, not kept)


@pytest.mark.parametrize("pattern, sparsity", [(None, 0.5), (NM(2, 4), 0.5), (NM(1, 4), 0.75)])
def test_dead_inputs_are_pruned_in_the_mask(pattern, sparsity):
    """Dead inputs (H_jj = 0) are zeroed, as in the reference, and the keep mask matches the
    zeros: an N:M group of dead inputs keeps none, and no zero weight is reported as kept."""
    X = _correlated_inputs(256, 32, 3)
    X[:, 8:12] = 0.0  # a whole 4-group of dead inputs
    X[:, 20] = 0.0  # and one more, inside a live group
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    new, keep = sparsegpt_prune(W, X.T @ X, sparsity, pattern=pattern, blocksize=16)
    assert not bool(keep[:, 8:12].any()) and not bool(keep[:, 20].any())
    assert torch.equal(keep, new != 0)  # kept weights are non-zero; pruned ones are exactly zero
    if pattern is not None:
        pattern.validate(keep)
        assert int(keep[:, 16:20].sum()) == 16 * pattern.n  # live groups keep exactly n
        assert int(keep[:, 20:24].sum()) == 16 * pattern.n  # one dead input: n from the 3 live ones
    else:
        assert int((~keep).sum()) >= num_to_prune(W.numel(), sparsity)


def test_dead_and_duplicated_inputs():
    X = _correlated_inputs(200, 32, 9)
    X[:, 5] = 0.0  # dead input
    X[:, 7] = X[:, 6]  # duplicated input: XᵀX is singular
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(9))
    H = X.T @ X
    new, keep = sparsegpt_prune(W, H, 0.5, percdamp=0.0)  # needs the damping retries
    assert bool(torch.isfinite(new).all()) and bool((new[:, 5] == 0).all())
    wanda = W * (W.abs() * X.norm(dim=0)).ge((W.abs() * X.norm(dim=0)).median(dim=1, keepdim=True).values)
    assert reconstruction_error(W, new, H) < reconstruction_error(W, wanda, H)


def test_non_finite_hessian_and_weight():
    W, _, H = _problem(rows=4, cols=8)
    bad = H.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(NumericalInstability) as info:
        sparsegpt_prune(W, bad, 0.5, name="blk.0.q")
    assert info.value.layer == "blk.0.q" and info.value.index == (2, 3)
    W2 = W.clone()
    W2[0, 0] = float("inf")
    with pytest.raises(NumericalInstability, match="weight"):
        sparsegpt_prune(W2, H, 0.5)


def test_hessian_that_never_factors():
    H = -torch.eye(8)  # negative definite: no damping of 1% of a negative mean fixes it
    with pytest.raises(NumericalInstability, match="λ=") as info:
        sparsegpt_prune(torch.ones(2, 8), H, 0.5, name="down")
    assert info.value.layer == "down"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"weight": torch.ones(8)}, ShapeMismatch),
        ({"weight": torch.ones(2, 8, 1)}, ShapeMismatch),
        ({"hessian": torch.eye(7)}, ShapeMismatch),
        ({"sparsity": 1.0}, InvalidSparsity),
        ({"sparsity": -0.1}, InvalidSparsity),
        ({"pattern": Block(2, 2)}, InvalidPattern),
        ({"pattern": NM(2, 3), "sparsity": 1 / 3}, InvalidPattern),  # 8 % 3
        ({"pattern": NM(2, 4), "blocksize": 6}, ConfigError),
        ({"pattern": NM(2, 4), "sparsity": 0.6}, InvalidSparsity),
        ({"pattern": NM(5, 4)}, InvalidPattern),
        ({"blocksize": 0}, ConfigError),
        ({"mask": torch.ones(3, 8, dtype=torch.bool)}, ShapeMismatch),
        ({"percdamp": float("nan")}, ConfigError),
    ],
)
def test_argument_errors(kwargs, error):
    args = {"weight": torch.ones(2, 8), "hessian": torch.eye(8), "sparsity": 0.5}
    args.update(kwargs)
    w, h, s = args.pop("weight"), args.pop("hessian"), args.pop("sparsity")
    with pytest.raises(error):
        sparsegpt_prune(w, h, s, **args)
