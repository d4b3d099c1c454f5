"""One-shot pruning through prunable units on every family (fp32 and bf16), the rule for experts
without calibration tokens, and the GPT-2 Conv1D golden case.

The pruning loop here is the library's tensor contract applied per unit:
``get_method(name).prune_weight(unit.read(model), stats[unit.name], spec)``, written back with
``unit.write``; for Linear-only families it is also checked against ``prune_module`` with a
``filter_fn`` over the unit names.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning_core.arch import prunable_units
from pruning_core.calibration import collect_activation_stats
from pruning_core.errors import CalibrationRequired
from pruning_core.importance.wanda import wanda_scores
from pruning_core.masks import NM, SparsitySpec, keep_nm
from pruning_core.methods import get_method
from pruning_core.pruning import prune_module
from pruning_core.solvers.sparsegpt import sparsegpt_prune
from tests.tiny_models import ARCHITECTURES, MOE, VOCAB, make_tiny

DTYPES = [torch.float32, torch.bfloat16]
WANDA_50 = SparsitySpec.parse(0.5, "unstructured", "row")
NM_2_4 = SparsitySpec.parse(None, "2:4")


def _calibrate(model, units, ids=None):
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)) if ids is None else ids
    return collect_activation_stats(model, [ids], layers=[u.name for u in units], hessian=True, progress=False)


def _prune(model, units, ctx, method, spec):
    """The per-unit loop; an expert with no calibration tokens is pruned by magnitude (the stated rule)."""
    masks = {}
    for u in units:
        stats = ctx.require_stats(u.name)
        chosen = get_method("magnitude") if u.expert is not None and stats.count == 0 else get_method(method)
        new, masks[u.name] = chosen.prune_weight(u.read(model), stats, spec, name=u.name)
        assert new.dtype == u.read(model).dtype
        u.write(model, new)
    return masks


def _is_2_4(mask):
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def _exact(model, units, masks, spec):
    for u in units:
        w, keep = u.read(model), masks[u.name]
        assert bool((w[~keep] == 0).all())
        if spec.pattern == NM(2, 4):
            assert _is_2_4(keep)
        else:  # per output row, floor(in / 2) pruned
            assert bool((keep.sum(1) == u.in_features - u.in_features // 2).all())


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
    for method, spec in (("wanda", WANDA_50), ("wanda", NM_2_4), ("sparsegpt", NM_2_4)):
        pruned = copy.deepcopy(model)
        masks = _prune(pruned, units, ctx, method, spec)
        _exact(pruned, units, masks, spec)
        assert {u.read(pruned).dtype for u in units} == {dtype}
        if method == "wanda":  # kept weights unchanged; random weights have no zeros of their own
            assert all(int((u.read(pruned) == 0).sum()) == u.read(pruned).numel() // 2 for u in units)
        _generates(pruned)


@pytest.mark.parametrize("family", MOE)
def test_experts_without_tokens_are_pruned_by_magnitude_to_the_same_sparsity(family):
    model = make_tiny(family)
    units = prunable_units(model)
    ctx = _calibrate(model, units, ids=torch.tensor([[7]]))  # one token: 2 of 4 experts per layer get none
    empty = set(ctx.empty_layers())
    assert len(empty) == 8
    unit = next(u for u in units if u.name in empty)
    with pytest.raises(CalibrationRequired):  # statistics methods refuse them: never silently skipped
        get_method("wanda").prune_weight(unit.read(model), ctx.require_stats(unit.name), NM_2_4)
    original = {u.name: u.read(model).clone() for u in units}
    masks = _prune(model, units, ctx, "sparsegpt", NM_2_4)
    _exact(model, units, masks, NM_2_4)
    for name in empty:  # the rule: magnitude at the same pattern
        assert torch.equal(masks[name], keep_nm(original[name].abs(), 2, 4))
    _generates(model)


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_prune_module_prunes_every_unit_like_the_per_unit_loop(family):
    """prune_module selects the prunable units (Conv1D and experts included, routers and heads
    never) and gives exactly the per-unit loop's model."""
    model = make_tiny(family)
    units = prunable_units(model)
    ctx = _calibrate(model, units)
    reference = copy.deepcopy(model)
    _prune(reference, units, ctx, "wanda", NM_2_4)
    untouched = {n: p.clone() for n, p in model.named_parameters()}
    result = prune_module(model, get_method("wanda"), NM_2_4, ctx, measure_memory=False)
    assert set(result.layer_sparsity) == {u.name for u in units}
    assert set(result.layer_sparsity.values()) == {0.5}
    for u in units:
        assert torch.equal(u.read(model), u.read(reference))
    stored = {u.tensor_name for u in units}
    for name, param in model.named_parameters():  # heads, embeddings, norms, routers unchanged
        if not any(name.endswith(t) for t in stored):
            assert torch.equal(param, untouched[name]), name


@pytest.mark.parametrize("family", MOE)
def test_prune_module_prunes_experts_without_tokens_by_magnitude(family):
    model = make_tiny(family)
    units = prunable_units(model)
    ctx = _calibrate(model, units, ids=torch.tensor([[7]]))
    empty = set(ctx.empty_layers())
    original = {u.name: u.read(model).clone() for u in units}
    prune_module(model, get_method("sparsegpt"), NM_2_4, ctx, measure_memory=False)
    assert empty
    for name in empty:
        unit = next(u for u in units if u.name == name)
        assert torch.equal(unit.read(model) != 0, keep_nm(original[name].abs(), 2, 4) & (original[name] != 0))


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
