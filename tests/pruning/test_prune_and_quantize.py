"""pruning_core.pruning.prune_and_quantize: one weight pruned and quantized on one Hessian.

Properties that could fail: pruned weights dequantize to exactly 0, N:M survives, the joint
SparseGPT + GPTQ solve is one pass of gptq_quantize (bit-identical to calling it directly) and is
no worse than prune-then-RTN on the same weights and Hessian; the mask-first path keeps the
method's mask exactly."""

from __future__ import annotations

import pytest
import torch

from pruning_core.calibration import ActivationStats
from pruning_core.errors import CalibrationRequired, ConfigError
from pruning_core.masks import SparsitySpec
from pruning_core.methods import get_method
from pruning_core.pruning.quantize import gptq_blocksize, prune_and_quantize
from pruning_core.quant import QuantSpec
from pruning_core.solvers.gptq import gptq_quantize

W4 = QuantSpec(bits=4, group_size=32)


def _layer(seed: int = 0, out: int = 48, inputs: int = 128) -> tuple[torch.Tensor, ActivationStats]:
    """A weight and the statistics (with XᵀX) of correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, inputs, generator=g) @ (torch.eye(inputs) + 0.3 * torch.randn(inputs, inputs, generator=g))
    x = x * torch.rand(inputs, generator=g) * 3
    stats = ActivationStats(inputs, hessian=True, name="layer")
    stats.update(x)
    return torch.randn(out, inputs, generator=g), stats


def _error(w: torch.Tensor, new: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - new).double()
    return float(((d @ h) * d).sum() / ((w.double() @ h) * w.double()).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_sparsegpt_gptq_is_exact_and_beats_prune_then_rtn(pattern):
    w, stats = _layer()
    spec = SparsitySpec.parse(0.5, pattern)
    method = get_method("sparsegpt")
    result = prune_and_quantize(method, w, stats, spec, W4, baseline=True, name="layer")
    new = result.quantized.dequantize(torch.float32)
    assert not new[~result.keep].any()  # pruned weights are exactly 0 after quantization
    assert float((~result.keep).float().mean()) == 0.5
    if pattern == "2:4":
        assert bool(((new != 0).reshape(48, -1, 4).sum(-1) <= 2).all())
    # one OBS pass: exactly gptq_quantize with the sparsity and the method's solver options
    direct, keep = gptq_quantize(w, stats.xtx, W4, sparsity=0.5, pattern=spec.pattern, blocksize=128)
    assert torch.equal(direct.codes, result.quantized.codes) and torch.equal(keep, result.keep)
    joint = _error(w, new, stats.xtx)
    baseline = _error(w, result.baseline.dequantize(torch.float32), stats.xtx)
    assert joint < baseline


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_mask_first_methods_keep_their_mask_exactly(method):
    w, stats = _layer(1)
    spec = SparsitySpec.parse(0.5, "2:4")
    pruned, mask = get_method(method).prune_weight(w, stats, spec)
    result = prune_and_quantize(get_method(method), w, stats, spec, W4, baseline=True)
    assert torch.equal(result.keep, mask)
    new = result.quantized.dequantize(torch.float32)
    assert not new[~mask].any() and bool(((new != 0).reshape(48, -1, 4).sum(-1) <= 2).all())
    direct, _ = gptq_quantize(pruned, stats.xtx, W4, mask=mask, blocksize=gptq_blocksize(W4))
    assert torch.equal(direct.codes, result.quantized.codes)
    # GPTQ against RTN of the same pruned weights, both measured from the pruned weight
    assert _error(pruned, new, stats.xtx) < _error(pruned, result.baseline.dequantize(torch.float32), stats.xtx)
    rtn = prune_and_quantize(get_method(method), w, stats, spec, W4, solver="rtn")
    assert torch.equal(rtn.quantized.codes, result.baseline.codes)


def test_bad_arguments():
    w, stats = _layer()
    spec = SparsitySpec.parse(0.5)
    with pytest.raises(ConfigError, match="solver"):
        prune_and_quantize(get_method("wanda"), w, stats, spec, W4, solver="awq")
    with pytest.raises(ConfigError, match="blocksize.*group_size=256"):
        prune_and_quantize(get_method("sparsegpt"), *_layer(inputs=256), spec, QuantSpec(4, 256))
    no_hessian = ActivationStats(128, name="layer")
    no_hessian.update(torch.randn(8, 128))
    with pytest.raises(CalibrationRequired):
        prune_and_quantize(get_method("wanda"), w, no_hessian, spec, W4)
    assert gptq_blocksize(QuantSpec(4, -1)) == 128 and gptq_blocksize(QuantSpec(4, 48)) == 96
    assert gptq_blocksize(QuantSpec(4, 256)) == 256
