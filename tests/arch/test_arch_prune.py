"""One-shot pruning through prunable units on every family (fp32 and bf16), and the GPT-2 Conv1D golden case.

The pruning loop here is the current library API applied per unit: ``wanda_scores`` / ``keep_nm`` /
``keep_topk`` and ``sparsegpt_prune`` on ``unit.read(model)``, written back with ``unit.write``;
for Linear-only families it is also checked against ``prune_module`` with a ``filter_fn``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning_core.arch import prunable_units
from pruning_core.calibration import collect_activation_stats
from pruning_core.importance.wanda import wanda_scores
from pruning_core.masks import NM, keep_nm, keep_topk
from pruning_core.pruning import WandaPruner, prune_module
from pruning_core.solvers.sparsegpt import sparsegpt_prune
from tests.tiny_models import ARCHITECTURES, MOE, VOCAB, make_tiny

DTYPES = [torch.float32, torch.bfloat16]


def _calibrate(model, units):
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    return collect_activation_stats(model, [ids], layers=[u.name for u in units], hessian=True, progress=False)


def _wanda(model, units, ctx, pattern):
    masks = {}
    for u in units:
        w = u.read(model)
        scores = wanda_scores(w, ctx.require_stats(u.name).sum_sq, layer_name=u.name)
        masks[u.name] = keep_nm(scores, 2, 4) if pattern == "2:4" else keep_topk(scores, 0.5, dim=-1)
        u.write(model, w * masks[u.name])
    return masks


def _sparsegpt(model, units, ctx):
    masks = {}
    for u in units:
        w = u.read(model)
        new, masks[u.name] = sparsegpt_prune(w, ctx.require_stats(u.name).xtx, 0.5, pattern=NM(2, 4), name=u.name)
        assert new.dtype == w.dtype
        u.write(model, new)
    return masks


def _is_2_4(mask):
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def _generates(model):
    prompt = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        logits = model(prompt).logits
        out = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)
    assert torch.isfinite(logits.float()).all() and out.shape == (1, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_wanda_and_sparsegpt_exact_per_unit_sparsity_dtype_and_generation(family, dtype):
    model = make_tiny(family, dtype=dtype)
    units = prunable_units(model)
    ctx = _calibrate(model, units)
    assert ctx.empty_layers() == []  # every expert got tokens from 64 calibration tokens
    for pattern in ("2:4", "unstructured"):
        pruned = copy.deepcopy(model)
        masks = _wanda(pruned, units, ctx, pattern)
        for u in units:
            w, keep = u.read(pruned), masks[u.name]
            assert w.dtype == dtype
            assert int((w == 0).sum()) == w.numel() // 2  # exact: random weights have no zeros of their own
            assert torch.equal(w != 0, keep)
            assert _is_2_4(keep) if pattern == "2:4" else bool((keep.sum(1) == u.in_features // 2).all())
        _generates(pruned)
    masks = _sparsegpt(model, units, ctx)
    for u in units:
        w = u.read(model)
        assert w.dtype == dtype and _is_2_4(masks[u.name]) and bool((w[~masks[u.name]] == 0).all())
    _generates(model)


@pytest.mark.parametrize("family", sorted(set(ARCHITECTURES) - {"gpt2", *MOE}))
def test_prune_module_with_a_unit_filter_gives_the_same_model(family):
    model = make_tiny(family)
    units = prunable_units(model)
    ctx = _calibrate(model, units)
    reference = copy.deepcopy(model)
    _wanda(reference, units, ctx, "2:4")
    names = {u.name for u in units}
    result = prune_module(model, WandaPruner(), None, "2:4", ctx, filter_fn=lambda n, m: n in names,
                          measure_memory=False)
    assert set(result.layer_sparsity) == names and set(result.layer_sparsity.values()) == {0.5}
    for u in units:
        assert torch.equal(u.read(model), u.read(reference))


# ------------------------------------------------------------------ GPT-2 Conv1D: the math input dimension
def _conv1d_model():
    from transformers.pytorch_utils import Conv1D

    model = nn.ModuleDict({"proj": Conv1D(4, 8)})  # nf=4 outputs, nx=8 inputs: weight stored [8, 4]
    i = torch.arange(8)[:, None]
    o = torch.arange(4)[None, :]
    storage = ((i % 4 + 1) * (o + 1) * (1 - 2 * (i % 2))).float()  # |S[i, o]| = (i%4 + 1)(o + 1)
    with torch.no_grad():
        model.proj.weight.copy_(storage)
        model.proj.bias.zero_()
    return model, storage


def test_conv1d_nm_groups_lie_along_the_math_input_dimension():
    model, storage = _conv1d_model()
    (unit,) = prunable_units(model)
    assert (unit.name, unit.transposed, unit.shape) == ("proj", True, (4, 8))
    # Hand-written reference: in every group of 4 inputs, |W| grows with i % 4, so 2:4 by magnitude
    # keeps inputs i % 4 in {2, 3}: storage rows 2, 3, 6, 7, for every output column.
    expected = storage.clone()
    expected[[0, 1, 4, 5], :] = 0
    w = unit.read(model)
    unit.write(model, w * keep_nm(w.abs(), 2, 4))
    assert torch.equal(model.proj.weight.detach(), expected)
    # The storage orientation would group outputs instead: a different (wrong) pattern.
    wrong = storage * keep_nm(storage.abs(), 2, 4)
    assert not torch.equal(wrong, expected)


def test_conv1d_statistics_and_sparsegpt_run_along_the_math_input_dimension():
    model, storage = _conv1d_model()
    (unit,) = prunable_units(model)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    ctx = collect_activation_stats(model.proj, [x], hessian=True, progress=False)
    stats = ctx.require_stats("")  # the Conv1D alone: its unit is the root module
    flat = x.reshape(-1, 8).double()
    assert stats.in_features == 8 and stats.count == 15
    torch.testing.assert_close(stats.sum_sq, (flat ** 2).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.xtx, flat.T @ flat, rtol=1e-5, atol=1e-5)
    assert wanda_scores(unit.read(model), stats.sum_sq).shape == (4, 8)
    # SparseGPT with H = I is magnitude selection per N:M group and keeps the kept weights unchanged.
    new, keep = sparsegpt_prune(unit.read(model), torch.eye(8), 0.5, pattern=NM(2, 4))
    unit.write(model, new)
    expected = storage.clone()
    expected[[0, 1, 4, 5], :] = 0
    assert torch.equal(model.proj.weight.detach(), expected) and torch.equal(keep, expected.T != 0)
