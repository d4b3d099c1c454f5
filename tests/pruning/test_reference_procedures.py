"""prune_sequential against transcriptions of the authors' per-block procedures on a tiny Llama.

- locuslab/wanda @ 8e8fc87 ``lib/prune.py`` ``prune_wanda`` with ``lib/layerwrapper.py``
  ``WrappedGPT`` (running ``scaler_row``, ``|W|·sqrt(scaler_row)``, per-row stable sort, N:M by
  ``topk`` every m columns, weights zeroed, block outputs recomputed through the pruned block);
- IST-DASLab/sparsegpt @ 147d215 ``llama.py`` ``llama_sequential`` (not true-sequential) with
  ``SparseGPT.add_batch`` / ``fasterprune`` (tests/solvers/reference_fasterprune.py).

The decoder-block input capture (the references' ``Catcher``) is replaced by
``capture_block_inputs``: with transformers 5 a Llama block also needs the rotary
``position_embeddings``, which the references predate. Everything after the capture is transcribed.
"""

from __future__ import annotations

import math

import torch

from pruning_core.calibration import capture_block_inputs, run_block
from pruning_core.masks import NM, MaskScope, SparsitySpec
from pruning_core.methods import get_method
from pruning_core.pruning import prune_sequential
from tests.conftest import make_tiny_llama
from tests.solvers.reference_fasterprune import reference_fasterprune


class WrappedGPT:  # lib/layerwrapper.py
    def __init__(self, layer):
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(inp.type(torch.float32), p=2, dim=1) ** 2 / self.nsamples


class SparseGPTAccumulator:  # sparsegpt.py SparseGPT.add_batch
    def __init__(self, layer):
        self.layer = layer
        self.H = torch.zeros(layer.weight.shape[1], layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())


def _find_layers(block):
    return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def _collect(block, inputs, wrapper):
    subset = _find_layers(block)
    wrapped = {n: wrapper(m) for n, m in subset.items()}
    handles = [m.register_forward_hook(lambda _m, inp, _o, n=n: wrapped[n].add_batch(inp[0].data))
               for n, m in subset.items()]
    run_block(block, inputs)
    for h in handles:
        h.remove()
    return subset, wrapped


@torch.no_grad()
def reference_prune_wanda(model, batches, sparsity, prune_n=0, prune_m=0):
    inputs = capture_block_inputs(model, batches, progress=False)
    for layer in model.model.layers:
        subset, wrapped = _collect(layer, inputs, WrappedGPT)
        for name in subset:
            W_metric = torch.abs(subset[name].weight.data) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
            W_mask = torch.zeros_like(W_metric) == 1
            if prune_n != 0:
                for ii in range(W_metric.shape[1]):
                    if ii % prune_m == 0:
                        tmp = W_metric[:, ii:(ii + prune_m)].float()
                        W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            else:
                sort_res = torch.sort(W_metric, dim=-1, stable=True)
                indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity)]
                W_mask.scatter_(1, indices, True)
            subset[name].weight.data[W_mask] = 0
        inputs = run_block(layer, inputs)


@torch.no_grad()
def reference_llama_sequential(model, batches, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    inputs = capture_block_inputs(model, batches, progress=False)
    for layer in model.model.layers:
        subset, gpts = _collect(layer, inputs, SparseGPTAccumulator)
        for name in subset:
            W = reference_fasterprune(subset[name].weight.data, gpts[name].H, sparsity, prunen, prunem,
                                      blocksize, percdamp)
            subset[name].weight.data = W.reshape(subset[name].weight.shape).to(subset[name].weight.data.dtype)
        inputs = run_block(layer, inputs)


def _batches():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 128, (2, 48), generator=g) for _ in range(3)]


def _linear_weights(model):
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def test_wanda_unstructured_equals_reference():
    ours, ref = make_tiny_llama(), make_tiny_llama()
    prune_sequential(ours, _batches(), get_method("wanda"), SparsitySpec(0.5, scope=MaskScope.ROW), progress=False)
    reference_prune_wanda(ref, _batches(), 0.5)
    for name, w in _linear_weights(ours).items():
        assert torch.equal(w, ref.get_submodule(name).weight), name


def test_wanda_2_4_equals_reference():
    ours, ref = make_tiny_llama(), make_tiny_llama()
    prune_sequential(ours, _batches(), get_method("wanda"), SparsitySpec.parse(None, NM(2, 4)), progress=False)
    reference_prune_wanda(ref, _batches(), 0.5, prune_n=2, prune_m=4)
    for name, w in _linear_weights(ours).items():
        assert torch.equal(w, ref.get_submodule(name).weight), name


def test_sparsegpt_2_4_equals_reference():
    # 2:4 has no count difference (the unstructured reference prunes one weight more per block).
    ours, ref = make_tiny_llama(), make_tiny_llama()
    prune_sequential(ours, _batches(), get_method("sparsegpt"), SparsitySpec(0.5, NM(2, 4)), progress=False)
    reference_llama_sequential(ref, _batches(), 0.5, prunen=2, prunem=4)
    for name, w in _linear_weights(ours).items():
        r = ref.get_submodule(name).weight
        assert float(((w == 0) == (r == 0)).float().mean()) > 0.999, name
        torch.testing.assert_close(w, r, atol=1e-4, rtol=1e-3)
