"""The tensor-level method contract: registry, golden cases, dtype/device round trip, a toy method."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pruning_core.calibration import ActivationStats, collect_activation_stats
from pruning_core.compat import MagnitudePruner, SparseGPTPruner, WandaPruner
from pruning_core.errors import CalibrationRequired, ConfigError, InvalidPattern, ShapeMismatch
from pruning_core.importance import NormType, magnitude_scores, wanda_scores
from pruning_core.masks import NM, MaskScope, Row, SparsitySpec, generate_mask
from pruning_core.methods import METHODS, Magnitude, Method, SparseGPT, Wanda, get_method
from pruning_core.pruning import prune_module, target_layers
from pruning_core.solvers import sparsegpt_prune
from tests.conftest import make_tiny_llama
from tests.methods.toy_method import SmallestFirst

HALF = SparsitySpec(0.5)
HALF_24 = SparsitySpec(0.5, NM(2, 4))


def _stats(x: torch.Tensor, hessian: bool = True) -> ActivationStats:
    s = ActivationStats(x.shape[-1], hessian=hessian)
    s.update(x)
    return s


def _random(rows=16, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, cols // 2, generator=g) @ torch.randn(cols // 2, cols, generator=g)
    x += 0.1 * torch.randn(256, cols, generator=g)
    return torch.randn(rows, cols, generator=g), _stats(x)


# ---------------------------------------------------------------- registry
def test_registry_lists_the_three_methods_one_line_each():
    assert list(METHODS) == ["magnitude", "wanda", "sparsegpt"]
    for name, cls in METHODS.items():
        assert cls.name == name
        assert cls.__module__ == f"pruning_core.methods.{name}"  # one file per method
        assert isinstance(get_method(name), Method)
    assert get_method("magnitude") == Magnitude() and get_method("magnitude", norm="l1").norm is NormType.L1
    assert get_method("sparsegpt", blocksize=64, percdamp=0.1, dtype="float64") == SparseGPT(64, 0.1, torch.float64)


@pytest.mark.parametrize(
    ("name", "options", "field", "listed"),
    [
        ("wandaa", {}, "method", "magnitude, wanda, sparsegpt"),
        ("sparsegpt", {"block": 3}, "block", "blocksize, percdamp, dtype"),
        ("wanda", {"blocksize": 3}, "blocksize", "its options: none"),
        ("magnitude", {"norm": "l3"}, "norm", "l1, l2, linf"),
        ("sparsegpt", {"blocksize": 0}, "blocksize", "positive integer"),
        ("sparsegpt", {"percdamp": -1.0}, "percdamp", ">= 0"),
        ("sparsegpt", {"dtype": "bfloat16"}, "dtype", "float32"),
    ],
)
def test_registry_errors_name_the_field_and_list_the_choices(name, options, field, listed):
    with pytest.raises(ConfigError) as info:
        get_method(name, **options)
    assert info.value.field == field and listed in str(info.value)


def test_wanda_row_default_lives_in_the_method():
    assert Wanda.default_scope is MaskScope.ROW
    assert Magnitude.default_scope is SparseGPT.default_scope is MaskScope.LAYER
    assert WandaPruner().default_scope is Wanda.default_scope  # the seed's pruner reads it from there
    assert SparsitySpec.parse(0.5, default_scope=get_method("wanda").default_scope).scope is MaskScope.ROW


# ---------------------------------------------------------------- golden cases (hand-computed)
def test_magnitude_2_4_golden():
    # |w| = 1..8 in groups [1 2 3 4] [5 6 7 8]: keep the two largest of each -> 3, 4, 7, 8
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    new, keep = Magnitude().prune_weight(w, None, HALF_24)
    assert keep.tolist() == [[False, False, True, True, False, False, True, True]]
    assert new.tolist() == [[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]]


def test_magnitude_layer_golden_with_signs_and_ties():
    # |w| = [[1, 4], [3, 2]]: 50% of the layer prunes 1 and 2
    w = torch.tensor([[1.0, -4.0], [-3.0, 2.0]])
    new, keep = Magnitude().prune_weight(w, None, HALF)
    assert new.tolist() == [[0.0, -4.0], [-3.0, 0.0]]
    # ties: [1, 1, 1, 1] at 50% keeps exactly two, the lower indices (the seed pruned all four)
    _, keep = Magnitude().prune_weight(torch.ones(1, 4), None, HALF)
    assert keep.tolist() == [[True, True, False, False]]


def test_wanda_golden_activations_decide_and_rows_compare():
    # equal weights, activation norms ∝ [100, 10, 1, 0.1]: every row keeps its first two inputs
    x = torch.tensor([[100.0, 10.0, 1.0, 0.1]])
    stats = _stats(x, hessian=False)
    new, keep = Wanda().prune_weight(torch.ones(2, 4), stats, SparsitySpec(0.5, scope=MaskScope.ROW))
    assert keep.tolist() == [[True, True, False, False]] * 2
    # per row vs per layer: row 1 is 10x larger; ROW keeps 2 in each row, LAYER all of row 1
    w = torch.tensor([[1.0, 2, 3, 4], [10, 20, 30, 40]])
    flat = _stats(torch.ones(1, 4), hessian=False)
    _, row = Wanda().prune_weight(w, flat, SparsitySpec(0.5, scope=MaskScope.ROW))
    _, layer = Wanda().prune_weight(w, flat, HALF)
    assert row.tolist() == [[False, False, True, True]] * 2
    assert layer.tolist() == [[False] * 4, [True] * 4]


def test_sparsegpt_with_identity_hessian_is_magnitude_per_block_and_keeps_weights():
    # H = I: no cross-column terms, so the OBS update leaves kept weights unchanged and the
    # saliency w²/[H⁻¹]_jj ranks like w² within each block of columns.
    w, _ = _random(8, 32, seed=3)
    stats = ActivationStats.from_arrays(torch.ones(32), torch.ones(32), 1, torch.eye(32))
    new, keep = SparseGPT(blocksize=8).prune_weight(w, stats, HALF)
    for b in range(4):
        block = slice(8 * b, 8 * b + 8)
        expected = generate_mask(magnitude_scores(w[:, block]), "unstructured", 0.5).tensor
        assert torch.equal(keep[:, block], expected)
    torch.testing.assert_close(new[keep], w[keep], rtol=0, atol=1e-6)
    assert bool((new[~keep] == 0).all())


# ---------------------------------------------------------------- equals the pre-contract behaviour
@pytest.mark.parametrize("spec", [HALF, SparsitySpec(0.3, scope=MaskScope.ROW), HALF_24,
                                  SparsitySpec(0.25, Row()), SparsitySpec(0.6, scope=MaskScope.GLOBAL)])
@pytest.mark.parametrize("method", [Magnitude(), Magnitude(NormType.LINF), Wanda()])
def test_masking_methods_equal_the_reference_computation(method, spec):
    """Pre-contract definition: mask = generate_mask(scores, pattern, sparsity, scope) & (w != 0),
    weight = w * mask (kept weights unchanged)."""
    w, stats = _random(seed=1)
    w[0, :5] = 0  # earlier zeros count as pruned
    scores = wanda_scores(w, stats.sum_sq) if isinstance(method, Wanda) else magnitude_scores(w, method.norm)
    reference = generate_mask(scores, spec.pattern, spec.sparsity, scope=spec.scope,
                              reduce=method.group_reduction).tensor & (w != 0)
    new, keep = method.prune_weight(w, stats, spec)
    assert torch.equal(keep, reference)
    assert torch.equal(new, w * reference)


@pytest.mark.parametrize("spec", [HALF, HALF_24])
def test_sparsegpt_equals_sparsegpt_prune_with_the_weights_zeros_as_earlier_mask(spec):
    w, stats = _random(seed=2)
    w[1, 3] = 0
    new, keep = SparseGPT(blocksize=16).prune_weight(w, stats, spec, name="fc")
    ref_w, ref_k = sparsegpt_prune(w, stats.xtx, 0.5, pattern=spec.pattern, blocksize=16, mask=w != 0)
    assert torch.equal(keep, ref_k) and torch.equal(new, ref_w)


@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner(), SparseGPTPruner(blocksize=16)])
def test_the_seed_pruners_give_the_method_results(pruner):
    w, stats = _random(seed=4)
    lin = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    from pruning_core.calibration import CalibrationContext

    ctx = CalibrationContext()
    ctx.add_layer_stats("fc", stats)
    mask = pruner.prune_layer(lin, None, NM(2, 4), ctx, name="fc")
    new, keep = pruner.method.prune_weight(w, stats, HALF_24, name="fc")
    assert torch.equal(mask.tensor, keep) and torch.equal(lin.weight.detach(), new)


# ---------------------------------------------------------------- dtype / device / inputs
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", [Magnitude(), Wanda(), SparseGPT(blocksize=16)])
@pytest.mark.parametrize("spec", [HALF, HALF_24])
def test_dtype_round_trip(method, dtype, spec):
    w32, stats = _random(seed=5)
    w = w32.to(dtype)
    before = w.clone()
    new, keep = method.prune_weight(w, stats, spec, name="fc")
    assert new.dtype == dtype and new.device == w.device and keep.dtype == torch.bool
    assert torch.equal(w, before)  # the input is not modified
    assert int(keep.sum()) == keep.numel() // 2 and bool((new[~keep] == 0).all())
    if not isinstance(method, SparseGPT):
        assert torch.equal(new[keep], w[keep])  # kept weights bit-identical
        # scores are float32 of the weight: the same mask as for the weight upcast to float32
        assert torch.equal(keep, method.prune_weight(w.float(), stats, spec)[1])


def test_bf16_model_stays_bf16_through_prune_module():
    model = make_tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ctx = collect_activation_stats(model.float(), [ids], hessian=True, progress=False)
    model = model.to(torch.bfloat16)
    for method in (Wanda(), SparseGPT()):
        result = prune_module(model, method, HALF_24, ctx, measure_memory=False)
        assert result.achieved_sparsity == 0.5
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_earlier_mask_and_errors():
    w, stats = _random(seed=6)
    earlier = torch.rand(16, 32, generator=torch.Generator().manual_seed(7)) > 0.3
    _, keep = Magnitude().prune_weight(w, None, HALF, mask=earlier)
    assert not bool((keep & ~earlier).any())
    with pytest.raises(ShapeMismatch, match="earlier mask"):
        Magnitude().prune_weight(w, None, HALF, mask=earlier[:, :4], name="fc")
    with pytest.raises(CalibrationRequired, match="fc"):
        Wanda().prune_weight(w, None, HALF, name="fc")
    with pytest.raises(CalibrationRequired, match="hessian"):
        SparseGPT().prune_weight(w, _stats(torch.randn(4, 32), hessian=False), HALF, name="fc")
    with pytest.raises(ConfigError, match="scope"):
        SparseGPT().prune_weight(w, stats, SparsitySpec(0.5, scope=MaskScope.ROW), name="fc")
    with pytest.raises(InvalidPattern):
        SparseGPT().prune_weight(w, stats, SparsitySpec(0.5, Row()), name="fc")


@settings(max_examples=25, deadline=None)
@given(s1=st.floats(0.0, 0.9), s2=st.floats(0.0, 0.9), seed=st.integers(0, 100))
def test_pruning_twice_is_monotone(s1, s2, seed):
    w, stats = _random(seed=seed)
    for method in (Magnitude(), Wanda(), SparseGPT(blocksize=16)):
        w1, k1 = method.prune_weight(w, stats, SparsitySpec(s1))
        w2, k2 = method.prune_weight(w1, stats, SparsitySpec(s2))  # default earlier mask: w1's zeros
        assert not bool((k2 & ~k1).any())
        assert bool((w2[~k2] == 0).all())


# ---------------------------------------------------------------- adding a method
def test_adding_a_method_is_one_file_and_one_registry_line(monkeypatch, tiny_llama):
    registry = importlib.import_module("pruning_core.methods.registry")
    monkeypatch.setitem(registry.METHODS, "smallest_first", SmallestFirst)  # the one line

    method = get_method("smallest_first", offset=2.0)
    assert isinstance(method, Method) and method.offset == 2.0
    with pytest.raises(ConfigError, match="offset"):
        get_method("smallest_first", offsett=1.0)
    # prune_weight comes from the base class: masks, patterns, earlier masks, dtype
    w = torch.tensor([[1.0, -8.0, 3.0, 0.5]], dtype=torch.bfloat16)
    new, keep = method.prune_weight(w, None, HALF)
    assert keep.tolist() == [[True, False, False, True]] and new.dtype == torch.bfloat16
    # ... and the whole-model loop runs it on every layer, in every scope
    for spec in (HALF, HALF_24, SparsitySpec(0.5, scope=MaskScope.GLOBAL)):
        model = make_tiny_llama()
        result = prune_module(model, method, spec, measure_memory=False)
        assert result.achieved_sparsity == 0.5
    layer = "model.layers.0.mlp.up_proj"
    dense = target_layers(tiny_llama)[layer].weight.detach().abs()
    kept = dense[result.masks[layer].tensor]
    assert float(kept.max()) <= float(dense[~result.masks[layer].tensor].min())  # the smallest survive
