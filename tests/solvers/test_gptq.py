"""gptq_quantize against the authors' GPTQ / SparseGPT-with-quantizer code, hand cases and RTN."""

from __future__ import annotations

import pytest
import torch

from pruning_core.errors import ConfigError, NumericalInstability, ShapeMismatch
from pruning_core.masks.pattern import NM
from pruning_core.metrics import reconstruction_error
from pruning_core.quant import QuantSpec, quantize_rtn
from pruning_core.solvers import gptq_quantize, sparsegpt_prune
from tests.solvers.reference_fasterquant import reference_fasterprune_quant, reference_fasterquant
from tests.solvers.test_sparsegpt import _correlated_inputs, _problem

SPECS = [QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=32, symmetric=False),
         QuantSpec(bits=8, group_size=-1), QuantSpec(bits=4, group_size=-1, symmetric=False)]


# ---------------------------------------------------------------- the authors' code
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_matches_the_authors_fasterquant(spec):
    # Group size = block size: the reference then reads each group's weights fully updated too.
    W, X, H = _problem(rows=32, cols=128, seed=11)
    ref = reference_fasterquant(W, H, spec.bits, spec.symmetric, blocksize=32, groupsize=spec.group_size,
                                dtype=torch.float64)
    qw, keep = gptq_quantize(W, H, spec, blocksize=32, dtype=torch.float64, scale_dtype=torch.float64)
    assert bool(keep.all())
    torch.testing.assert_close(qw.dequantize(), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("spec", SPECS[:2], ids=str)
def test_groups_read_the_updated_weights_whatever_the_block_size(spec):
    # Lazy batching is exact: the result does not depend on the block size (up to round-off),
    # so groups of 32 in blocks of 128 give the reference's answer with blocks of 32.
    W, X, H = _problem(rows=32, cols=128, seed=12)
    ref = reference_fasterquant(W, H, spec.bits, spec.symmetric, blocksize=32, groupsize=32, dtype=torch.float64)
    qw, _ = gptq_quantize(W, H, spec, blocksize=128, dtype=torch.float64, scale_dtype=torch.float64)
    torch.testing.assert_close(qw.dequantize(), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("sym", [True, False])
def test_joint_matches_the_authors_fasterprune_with_quantizer(sym):
    # SparseGPT's joint pass: per-channel grid from the dense weight, prune then quantize each
    # column. The reference prunes int(numel·s) + 1 per block; ask for that exact count.
    W, X, H = _problem(rows=32, cols=96, seed=13)
    ref = reference_fasterprune_quant(W, H, 0.5, 4, sym, blocksize=32, dtype=torch.float64)
    numel = 32 * 32
    spec = QuantSpec(bits=4, group_size=-1, symmetric=sym)
    qw, keep = gptq_quantize(W, H, spec, sparsity=(int(numel * 0.5) + 1) / numel, blocksize=32,
                             dtype=torch.float64, scale_dtype=torch.float64)
    torch.testing.assert_close(qw.dequantize(), ref, atol=1e-10, rtol=0)
    assert bool((ref[~keep] == 0).all())  # (a kept weight may round to 0 too)
    for b in range(0, 96, 32):
        assert int((~keep[:, b:b + 32]).sum()) == int(numel * 0.5) + 1


# ---------------------------------------------------------------- golden: diagonal Hessian = RTN
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_diagonal_hessian_is_round_to_nearest(spec):
    # With a diagonal H, U is diagonal: no error reaches another column, every grid is computed
    # from the untouched weights, and each weight is simply rounded: exactly RTN.
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    H = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5)
    qw, _ = gptq_quantize(W, H, spec, blocksize=32)
    rtn = quantize_rtn(W, spec)
    assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.zero_points, rtn.zero_points)
    assert torch.equal(qw.scales, rtn.scales)


# ---------------------------------------------------------------- quality
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_clearly_lower_error_than_round_to_nearest(spec):
    W, X, H = _problem(rows=48, cols=128, n=512, seed=14)
    qw, _ = gptq_quantize(W, H, spec)
    err_gptq = reconstruction_error(W, qw.dequantize(), H)
    err_rtn = reconstruction_error(W, quantize_rtn(W, spec).dequantize(), H)
    assert err_gptq < 0.5 * err_rtn


@pytest.mark.parametrize("pattern, sparsity", [(None, 0.5), (NM(2, 4), 0.5)])
def test_joint_beats_prune_then_round(pattern, sparsity):
    W, X, H = _problem(rows=48, cols=128, n=512, seed=15)
    spec = QuantSpec(bits=4, group_size=32)
    qw, keep = gptq_quantize(W, H, spec, sparsity=sparsity, pattern=pattern, blocksize=32)
    pruned, pkeep = sparsegpt_prune(W, H, sparsity, pattern=pattern, blocksize=32)
    err_joint = reconstruction_error(W, qw.dequantize(), H)
    err_rtn = reconstruction_error(W, quantize_rtn(pruned, spec, mask=pkeep).dequantize(), H)
    assert err_joint < err_rtn
    assert float((~keep).float().mean()) == 0.5
    if pattern is not None:
        pattern.validate(keep)


# ---------------------------------------------------------------- masks and exact zeros
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_fixed_mask_is_kept_exactly(spec):
    # A Wanda job's output: the weight already pruned by its mask, then quantized with the mask kept.
    W, X, H = _problem(rows=24, cols=64, seed=16)
    wanda = W.abs() * X.norm(dim=0)
    mask = wanda >= wanda.median(dim=1, keepdim=True).values  # a Wanda-like per-row mask
    pruned = W * mask
    qw, keep = gptq_quantize(pruned, H, spec, mask=mask, blocksize=32)
    dense = qw.dequantize()
    assert torch.equal(keep, mask)
    assert bool((dense[~mask] == 0).all())  # exactly 0: the zero point's code, nothing forced
    assert torch.equal(qw.codes[~mask], qw.zero_points.repeat_interleave(qw.group_width, 1)[~mask])
    rtn = quantize_rtn(pruned, spec, mask=mask).dequantize()
    assert reconstruction_error(pruned, dense, H) < 0.7 * reconstruction_error(pruned, rtn, H)


def test_fixed_mask_on_the_dense_weight_also_compensates_the_pruning():
    # Given the dense weight and a mask, the masked weights' error (w - 0) is spread over the
    # later columns too: SparseGPT's reconstruction with a fixed mask, plus quantization.
    W, X, H = _problem(rows=24, cols=64, seed=16)
    mask = torch.rand(24, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    spec = QuantSpec(bits=4, group_size=32)
    qw, keep = gptq_quantize(W, H, spec, mask=mask, blocksize=32)
    assert torch.equal(keep, mask) and bool((qw.dequantize()[~mask] == 0).all())
    from_pruned, _ = gptq_quantize(W * mask, H, spec, mask=mask, blocksize=32)
    assert reconstruction_error(W, qw.dequantize(), H) < reconstruction_error(W, from_pruned.dequantize(), H)


def test_dead_inputs_are_zero_and_pruned():
    X = _correlated_inputs(256, 64, 4)
    X[:, 5] = 0.0
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    for spec in SPECS:
        qw, keep = gptq_quantize(W, X.T @ X, spec, blocksize=32)
        assert not bool(keep[:, 5].any()) and bool(keep[:, :5].all())
        assert bool((qw.dequantize()[:, 5] == 0).all())


def test_bfloat16_weight_stores_bfloat16_scales():
    W, _, H = _problem(rows=8, cols=64, seed=17)
    qw, _ = gptq_quantize(W.to(torch.bfloat16), H, QuantSpec(bits=4, group_size=32), blocksize=32)
    assert qw.scales.dtype == torch.bfloat16 and qw.dequantize().dtype == torch.bfloat16
    qw32, _ = gptq_quantize(W, H, QuantSpec(bits=4, group_size=32), blocksize=32, scale_dtype=torch.bfloat16)
    assert qw32.scales.dtype == torch.bfloat16


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"blocksize": 48}, ConfigError),  # not a multiple of the group size 32
        ({"spec": QuantSpec(bits=4, group_size=24)}, ShapeMismatch),  # 64 inputs, groups of 24
        ({"hessian": torch.eye(63)}, ShapeMismatch),
        ({"sparsity": 0.6, "pattern": NM(2, 4)}, ValueError),
        ({"scale_dtype": torch.int8}, ConfigError),
    ],
)
def test_argument_errors(kwargs, error):
    args = {"weight": torch.ones(4, 64), "hessian": torch.eye(64), "spec": QuantSpec(bits=4, group_size=32)}
    args.update(kwargs)
    w, h, spec = args.pop("weight"), args.pop("hessian"), args.pop("spec")
    with pytest.raises(error):
        gptq_quantize(w, h, spec, **args)


def test_non_symmetric_hessian_is_rejected():
    W, _, H = _problem(rows=4, cols=32, seed=18)
    bad = H.clone()
    bad[3, 7] += 1e-2 * float(torch.sqrt(H[3, 3] * H[7, 7]))
    for solve in (lambda: gptq_quantize(W, bad, QuantSpec(group_size=32), name="blk.1.up"),
                  lambda: sparsegpt_prune(W, bad, 0.5, name="blk.1.up")):
        with pytest.raises(NumericalInstability, match="not symmetric") as info:
            solve()
        assert info.value.layer == "blk.1.up" and set(info.value.index) == {3, 7}
