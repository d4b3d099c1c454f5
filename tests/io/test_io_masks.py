"""io.masks: bit-packed masks round-trip exactly and are 8x smaller than bool storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from pruning_core.errors import ArtifactError, ConfigError, InvalidMask
from pruning_core.io.masks import SHAPES_KEY, load_masks, pack_mask, save_masks, unpack_mask
from pruning_core.io.tensors import load_tensors, read_metadata


@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=4),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(tmp_path_factory, shapes, density, seed):
    g = torch.Generator().manual_seed(seed)
    masks = {f"layer{i}.weight": torch.rand(s, generator=g) < density for i, s in enumerate(shapes)}
    path = tmp_path_factory.mktemp("m") / "masks.safetensors"
    save_masks(path, masks)
    back = load_masks(path)
    assert list(back) == sorted(masks)
    for name, m in masks.items():
        assert back[name].dtype == torch.bool and back[name].shape == m.shape
        assert torch.equal(back[name], m)


def test_packing_layout_is_little_bit_order():
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    packed = pack_mask(mask)
    assert packed.tolist() == [0b0000_0001, 0b0000_0010]
    assert torch.equal(unpack_mask(packed, (10,)), mask)


def test_eight_times_smaller_than_bool_storage(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = {f"l{i}": torch.rand(512, 256, generator=g) < 0.5 for i in range(4)}
    save_file(masks, str(tmp_path / "bool.safetensors"))
    save_masks(tmp_path / "packed.safetensors", masks)
    bool_bytes = (tmp_path / "bool.safetensors").stat().st_size
    packed_bytes = (tmp_path / "packed.safetensors").stat().st_size
    assert bool_bytes / packed_bytes > 7.9
    stored = load_tensors(tmp_path / "packed.safetensors")
    assert sum(t.numel() for t in stored.values()) * 8 == sum(m.numel() for m in masks.values())


def test_shapes_live_in_metadata_and_user_metadata_is_kept(tmp_path):
    save_masks(tmp_path / "m.safetensors", {"a": torch.ones(3, 5, dtype=torch.bool)}, metadata={"run": "r1"})
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["run"] == "r1"
    assert json.loads(meta[SHAPES_KEY])["shapes"] == {"a": [3, 5]}
    with pytest.raises(ConfigError, match="reserved"):
        save_masks(
            tmp_path / "n.safetensors", {"a": torch.ones(1, dtype=torch.bool)}, metadata={SHAPES_KEY: "x"}
        )


def test_load_subset(tmp_path):
    masks = {"a": torch.tensor([True, False]), "b": torch.tensor([[False], [True]])}
    save_masks(tmp_path / "m.safetensors", masks)
    assert list(load_masks(tmp_path / "m.safetensors", ["b"])) == ["b"]
    with pytest.raises(ArtifactError, match="no masks named"):
        load_masks(tmp_path / "m.safetensors", ["zz"])


def test_non_bool_mask_is_refused_by_name(tmp_path):
    with pytest.raises(InvalidMask, match="'q_proj'.*torch.float32"):
        save_masks(tmp_path / "m.safetensors", {"q_proj": torch.ones(4)})
    assert list(tmp_path.iterdir()) == []


def test_plain_tensor_file_is_not_a_mask_file(tmp_path):
    save_file({"a": torch.ones(2, dtype=torch.uint8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ArtifactError, match="not a mask file"):
        load_masks(tmp_path / "x.safetensors")


def test_wrong_byte_count_or_dirty_padding_is_corruption():
    with pytest.raises(ArtifactError, match="expected 2 uint8 bytes"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), (10,))
    dirty = torch.from_numpy(np.array([0, 0b1000_0000], dtype=np.uint8))
    with pytest.raises(ArtifactError, match="padding bits"):
        unpack_mask(dirty, (10,))
