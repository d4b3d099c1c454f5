"""The seed's pruners (pruning_core.compat) and PruningResult: seed cases (§5 Pruner) and per-layer behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pruning_core.calibration import ActivationStats, CalibrationContext
from pruning_core.compat import (
    ImportancePruner,
    ImportanceScores,
    MagnitudeImportance,
    MagnitudePruner,
    Pruner,
    SparseGPTPruner,
    TaylorImportance,
    WandaPruner,
    prune_weight,
)
from pruning_core.errors import CalibrationRequired, ConfigError, InvalidSparsity, NoParameters
from pruning_core.masks import NM, Block, Column, MaskScope, Row, SparsityMask, Unstructured
from pruning_core.pruning import PruningResult, sparse_savings_bytes
from pruning_core.sparse import SparseFormat, sparsify


class Weights(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(values, dtype=torch.float32))


# ---------------------------------------------------------------- PruningResult (seed)
def test_compression_ratio_seed_cases():
    assert PruningResult(0.5, 50, 100).compression_ratio() == 2.0
    assert PruningResult(0.0, 0, 100).compression_ratio() == 1.0
    assert PruningResult(0.75, 75, 100).compression_ratio() == 4.0
    assert math.isinf(PruningResult(0.0, 0, 0).compression_ratio())
    assert math.isinf(PruningResult(1.0, 100, 100).compression_ratio())


def test_layer_map_kept_and_merge():
    r = PruningResult(0.5, 50, 100).with_layer_sparsity("layer0", 0.4).with_layer_sparsity("layer1", 0.6)
    assert r.layer_sparsity == {"layer0": 0.4, "layer1": 0.6}
    merged = PruningResult.merge([PruningResult(0.5, 5, 10, {"a": 0.5}, 7), PruningResult(0.1, 3, 30, {"b": 0.1}, -2)])
    assert (merged.parameters_pruned, merged.total_parameters, merged.memory_savings_bytes) == (8, 40, 5)
    assert merged.achieved_sparsity == 0.2 and merged.layer_sparsity == {"a": 0.5, "b": 0.1}


def test_memory_savings_are_measured_in_real_formats():
    w = torch.randn(16, 64)
    mask_u = SparsityMask(torch.rand(16, 64) > 0.9)
    expected = w.numel() * 4 - sparsify(w, mask_u, SparseFormat.CSR).nbytes
    assert sparse_savings_bytes(w, mask_u) == expected > 0
    keep24 = torch.tensor([True, True, False, False]).repeat(16, 16)
    mask24 = SparsityMask(keep24, NM(2, 4))
    assert sparse_savings_bytes(w, mask24) == w.numel() * 4 - sparsify(w, mask24, SparseFormat.SEMI_STRUCTURED).nbytes
    # 2:4 stores half the values plus 2-bit indices: it saves a bit under half of the dense bytes.
    assert 0.4 * w.numel() * 4 < sparse_savings_bytes(w, mask24) < 0.5 * w.numel() * 4


# ---------------------------------------------------------------- MagnitudePruner (seed)
@pytest.mark.parametrize(("sparsity", "pruned"), [(0.5, 2), (1.0, 4), (0.0, 0)])
def test_magnitude_on_four_weights(sparsity, pruned):
    module = Weights([1.0, 2.0, 3.0, 4.0])
    pruner = MagnitudePruner()
    mask = pruner.generate_mask(pruner.importance.compute(module), sparsity, Unstructured())
    result = pruner.apply_mask(module, mask, name="w")
    assert result.parameters_pruned == pruned and result.achieved_sparsity == pruned / 4
    assert result.layer_sparsity == {"w": pruned / 4}
    assert module.weight.detach().tolist() == [0.0] * pruned + [float(v) for v in range(pruned + 1, 5)]


@pytest.mark.parametrize("pattern", [NM(2, 4), Row(), Column(), Block(1, 1)])
def test_magnitude_structured_patterns(pattern):
    module = Weights(torch.arange(1.0, 9.0).reshape(2, 4))
    pruner = MagnitudePruner()
    mask = pruner.generate_mask(pruner.importance.compute(module), 0.5, pattern, name="x")
    assert mask.sparsity == 0.5 and mask.pattern == pattern


def test_linf_reduces_groups_with_max():
    # Rows [10, 0, 0, 0] and [3, 3, 3, 3]: by sum of |w| row 1 wins (12 > 10), by max row 0 (10 > 3).
    scores = torch.tensor([[10.0, 0, 0, 0], [3, 3, 3, 3]])
    l1 = MagnitudePruner.l1().generate_mask(scores, 0.5, Row())
    linf = MagnitudePruner(MagnitudeImportance.linf()).generate_mask(scores, 0.5, Row())
    assert l1.tensor[:, 0].tolist() == [False, True]
    assert linf.tensor[:, 0].tolist() == [True, False]


def test_names_and_protocol():
    for pruner, name in [(MagnitudePruner(), "magnitude_pruner"), (MagnitudePruner.l1(), "magnitude_pruner"),
                         (WandaPruner(), "wanda_pruner"), (SparseGPTPruner(), "sparsegpt_pruner"),
                         (ImportancePruner(TaylorImportance()), "taylor_pruner")]:
        assert isinstance(pruner, Pruner) and pruner.name == name
    assert MagnitudePruner().importance.name == "magnitude_l2"
    assert MagnitudePruner.l1().importance.name == "magnitude_l1"
    assert WandaPruner().default_scope is MaskScope.ROW and MagnitudePruner().default_scope is MaskScope.LAYER
    assert SparseGPTPruner().requires_hessian and not WandaPruner().requires_hessian


def test_empty_module_rejected():
    with pytest.raises(NoParameters):
        MagnitudePruner().apply_mask(nn.ReLU(), SparsityMask(torch.ones(2, dtype=torch.bool)))
    with pytest.raises(NoParameters):
        MagnitudePruner().prune_layer(nn.ReLU(), 0.5, Unstructured())


# ---------------------------------------------------------------- WandaPruner (seed)
@pytest.mark.parametrize("pattern", [Row(), Column(), NM(2, 4), Unstructured()])
def test_wanda_on_supplied_scores(pattern):
    scores = ImportanceScores(torch.arange(1.0, 9.0).reshape(2, 4), "wanda")
    mask = WandaPruner().generate_mask(scores, 0.5, pattern)
    assert mask.sparsity == 0.5


def test_wanda_block_and_apply():
    mask = WandaPruner().generate_mask(torch.rand(3, 3), 0.5, Block(1, 1))
    assert mask.num_zeros == 4  # floor(9 · 0.5)
    module = Weights([1.0, 2.0, 3.0, 4.0])
    assert WandaPruner().apply_mask(module, SparsityMask(torch.tensor([1, 0, 1, 0]))).parameters_pruned == 2


def test_wanda_prunes_each_row_to_the_target():
    lin = nn.Linear(8, 6, bias=False)
    x = torch.randn(50, 8) * torch.logspace(-1, 1, 8)
    stats = ActivationStats(8)
    stats.update(x)
    ctx = CalibrationContext()
    ctx.add_layer_stats("fc", stats)
    mask = WandaPruner().prune_layer(lin, 0.5, Unstructured(), ctx, name="fc")
    assert (mask.tensor.sum(dim=1) == 4).all()
    assert bool((lin.weight[~mask.tensor] == 0).all())
    with pytest.raises(CalibrationRequired):
        WandaPruner().prune_layer(lin, 0.5, Unstructured(), None, name="fc")


# ---------------------------------------------------------------- iterative, monotone
def test_prune_layer_is_monotone_and_keeps_weights():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    original = lin.weight.detach().clone()
    m1 = MagnitudePruner().prune_layer(lin, 0.5, Unstructured(), name="fc")
    m2 = MagnitudePruner().prune_layer(lin, 0.75, Unstructured(), name="fc")
    assert m2.is_subset_of(m1) and m2.num_zeros == 96
    assert torch.equal(lin.weight[m2.tensor], original[m2.tensor])  # kept weights untouched
    prior = SparsityMask(torch.arange(128).reshape(8, 16) % 2 == 0)  # an earlier mask, weights not zeroed
    m3 = MagnitudePruner().prune_layer(nn.Linear(16, 8), 0.25, Unstructured(), name="fc", mask=prior)
    assert m3.is_subset_of(prior)


# ---------------------------------------------------------------- SparseGPTPruner
def _hessian_ctx(name: str, d: int, n: int = 256) -> CalibrationContext:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d // 2, generator=g) @ torch.randn(d // 2, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    stats = ActivationStats(d, hessian=True)
    stats.update(x)
    ctx = CalibrationContext()
    ctx.add_layer_stats(name, stats)
    return ctx


@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4)])
def test_sparsegpt_updates_kept_weights(pattern):
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    before = lin.weight.detach().clone()
    mask = SparseGPTPruner(blocksize=16).prune_layer(lin, 0.5, pattern, _hessian_ctx("fc", 32), name="fc")
    w = lin.weight.detach()
    assert mask.num_zeros == 128 and bool((w[~mask.tensor] == 0).all())
    assert not torch.allclose(w[mask.tensor], before[mask.tensor])  # OBS reconstruction moved them
    if isinstance(pattern, NM):
        assert mask.pattern == NM(2, 4)


def test_sparsegpt_pruner_errors():
    lin = nn.Linear(8, 4)
    with pytest.raises(CalibrationRequired):
        SparseGPTPruner().prune_layer(lin, 0.5, Unstructured(), None, name="fc")
    no_h = CalibrationContext()
    no_h.add_layer_stats("fc", ActivationStats(8))
    with pytest.raises(CalibrationRequired, match="hessian"):
        SparseGPTPruner().prune_layer(lin, 0.5, Unstructured(), no_h, name="fc")
    with pytest.raises(ConfigError):
        SparseGPTPruner().prune_layer(lin, 0.5, Unstructured(), _hessian_ctx("fc", 8), name="fc",
                                      scope=MaskScope.ROW)
    with pytest.raises(InvalidSparsity):
        SparseGPTPruner().prune_layer(lin, 1.0, Unstructured(), _hessian_ctx("fc", 8), name="fc")


# ---------------------------------------------------------------- prune_weight (per-layer tasks)
def test_prune_weight_is_out_of_place_and_equals_prune_layer():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    original = lin.weight.detach().clone()
    ctx = _hessian_ctx("fc", 32)
    new, mask = prune_weight(SparseGPTPruner(blocksize=16), lin.weight, 0.5, NM(2, 4), ctx.require_stats("fc"),
                             name="fc")
    assert torch.equal(lin.weight, original)  # the input is untouched
    SparseGPTPruner(blocksize=16).prune_layer(lin, 0.5, NM(2, 4), ctx, name="fc")
    assert torch.equal(new, lin.weight.detach()) and mask.num_zeros == 128
    new_m, mask_m = prune_weight(MagnitudePruner(), original, 0.25, Unstructured())
    assert mask_m.num_zeros == 64 and bool((new_m[~mask_m.tensor] == 0).all())
