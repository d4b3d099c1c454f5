"""io.variants: a unit's variants at every level round-trip exactly (masks and SparseGPT weights),
one level read at a time, through the lazy (unit, level) store the candidate assembler reads."""

from __future__ import annotations

import pytest
import torch

from pruning_core.allocation.database import UnitVariant
from pruning_core.errors import ArtifactError
from pruning_core.io.tensors import save_tensors
from pruning_core.io.variants import VariantStore, load_unit_variant, save_unit_variants, variant_levels


def _variants(seed: int, weights: bool) -> dict[int, UnitVariant]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for level in (-1, 0, 2):
        masks = {"a.q": torch.rand(6, 10, generator=g) < 0.5, "a.k": torch.rand(3, 10, generator=g) < 0.5}
        pruned = {n: torch.randn(m.shape, generator=g) * m for n, m in masks.items()} if weights else {}
        out[level] = UnitVariant(masks, pruned, 0.5 + 0.1 * level)
    return out


def test_variants_round_trip_one_level_at_a_time(tmp_path):
    variants = _variants(0, weights=True)
    save_unit_variants(tmp_path / "u.safetensors", variants, {"unit": "a"})
    assert variant_levels(tmp_path / "u.safetensors") == {lv: v.sparsity for lv, v in variants.items()}
    for level, want in variants.items():
        got = load_unit_variant(tmp_path / "u.safetensors", level)
        assert got.sparsity == want.sparsity and set(got.masks) == set(want.masks) == set(got.weights)
        for name in want.masks:
            assert torch.equal(got.masks[name], want.masks[name]) and torch.equal(got.weights[name], want.weights[name])
    with pytest.raises(ArtifactError, match="no variant at level 1"):
        load_unit_variant(tmp_path / "u.safetensors", 1)


def test_store_maps_unit_and_level_lazily(tmp_path):
    files = [tmp_path / f"u{i}.safetensors" for i in range(2)]
    for i, f in enumerate(files):
        save_unit_variants(f, _variants(i, weights=False))
    store = VariantStore(files)
    assert len(store) == 6 and sorted(store) == [(u, lv) for u in (0, 1) for lv in (-1, 0, 2)]
    assert store[(1, 2)].weights == {} and torch.equal(store[(1, 2)].masks["a.q"], _variants(1, False)[2].masks["a.q"])
    assert store.get((0, 1)) is None and store.get((2, 0)) is None
    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="not a unit-variants file"):
        variant_levels(tmp_path / "other.safetensors")
