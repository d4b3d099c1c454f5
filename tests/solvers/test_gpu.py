"""GPU checks (skipped without CUDA): the same results on the device as on the CPU."""

from __future__ import annotations

import pytest
import torch

from pruning_core.calibration import collect_activation_stats
from pruning_core.masks import NM, SparsitySpec
from pruning_core.methods import SparseGPT, Wanda
from pruning_core.pruning import prune_module
from pruning_core.solvers import sparsegpt_prune
from tests.conftest import make_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_sparsegpt_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 32, generator=g) @ torch.randn(32, 128, generator=g)
    W = torch.randn(64, 128, generator=g)
    H = X.T @ X
    cpu_w, cpu_k = sparsegpt_prune(W, H, 0.5, pattern=NM(2, 4), dtype=torch.float64)
    gpu_w, gpu_k = sparsegpt_prune(W.cuda(), H.cuda(), 0.5, pattern=NM(2, 4), dtype=torch.float64)
    assert gpu_w.device.type == "cuda" and gpu_k.device.type == "cuda"
    assert torch.equal(gpu_k.cpu(), cpu_k)
    torch.testing.assert_close(gpu_w.cpu(), cpu_w, atol=1e-6, rtol=1e-6)


def test_collect_and_prune_on_cuda():
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    cpu, gpu = make_tiny_llama(), make_tiny_llama().cuda()
    ctx_c = collect_activation_stats(cpu, [ids], hessian=True, progress=False)
    ctx_g = collect_activation_stats(gpu, [ids], hessian=True, progress=False)
    name = "model.layers.1.mlp.down_proj"
    assert ctx_g.require_stats(name).sum_sq.device.type == "cuda"
    torch.testing.assert_close(ctx_g.require_stats(name).sum_sq.cpu(), ctx_c.require_stats(name).sum_sq,
                               rtol=1e-4, atol=1e-6)
    for method in (Wanda(), SparseGPT()):
        result = prune_module(gpu, method, SparsitySpec.parse(0.5, default_scope=method.default_scope), ctx_g)
        assert result.achieved_sparsity == 0.5


@pytest.mark.parametrize("method", [Wanda(), SparseGPT()])
def test_prune_weight_bf16_on_cuda_comes_back_bf16_on_cuda(method):
    """The contract on the device: bf16 in, bf16 out, on the input's device, a valid 2:4 mask; Wanda:
    kept weights unchanged and the same mask as on the CPU (SparseGPT's float32 solve may round
    differently on the device, so only its structure is compared)."""
    from pruning_core.calibration import ActivationStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    stats = ActivationStats(64, hessian=True)
    stats.update(x)
    w = torch.randn(32, 64, generator=g).to(torch.bfloat16)
    spec = SparsitySpec(0.5, NM(2, 4))
    new, keep = method.prune_weight(w.cuda(), stats, spec, name="fc")
    assert new.dtype == torch.bfloat16 and new.device.type == "cuda" and keep.device.type == "cuda"
    NM(2, 4).validate(keep.cpu())
    assert int(keep.sum()) == keep.numel() // 2 and bool((new[~keep] == 0).all())
    if isinstance(method, Wanda):
        _, keep_cpu = method.prune_weight(w, stats, spec, name="fc")
        assert torch.equal(keep.cpu(), keep_cpu)
        assert torch.equal(new.cpu()[keep_cpu], w[keep_cpu])


def test_gptq_on_cuda_matches_cpu():
    from pruning_core.quant import QuantSpec
    from pruning_core.solvers import gptq_quantize

    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 32, generator=g) @ torch.randn(32, 128, generator=g)
    W = torch.randn(64, 128, generator=g)
    H = X.T @ X
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    cpu_q, cpu_k = gptq_quantize(W, H, spec, sparsity=0.5, pattern=NM(2, 4), dtype=torch.float64)
    gpu_q, gpu_k = gptq_quantize(W.cuda(), H.cuda(), spec, sparsity=0.5, pattern=NM(2, 4), dtype=torch.float64)
    assert gpu_q.codes.device.type == "cuda" and torch.equal(gpu_k.cpu(), cpu_k)
    assert torch.equal(gpu_q.codes.cpu(), cpu_q.codes) and torch.equal(gpu_q.zero_points.cpu(), cpu_q.zero_points)
