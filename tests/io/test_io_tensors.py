"""io.tensors: safetensors round trips, selective reads, finiteness and corruption errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from pruning_core.errors import ArtifactError, ConfigError, NumericalInstability
from pruning_core.io.tensors import check_safetensors, load_tensors, read_metadata, save_tensors

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


@given(
    shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype_idx=st.integers(0, len(DTYPES) - 1),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(tmp_path_factory, shapes, dtype_idx, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype_idx]
    tensors = {f"t{i}": (torch.randn(s, generator=g) * 10).to(dtype) for i, s in enumerate(shapes)}
    path = tmp_path_factory.mktemp("rt") / "x.safetensors"
    save_tensors(path, tensors, metadata={"model": "tiny"})
    back = load_tensors(path)
    assert list(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)
    assert read_metadata(path) == {"model": "tiny"}


def test_load_only_requested_names_in_requested_order(tmp_path):
    path = save_tensors(
        tmp_path / "x.safetensors", {"a": torch.ones(2), "b": torch.zeros(3), "c": torch.arange(4)}
    )
    back = load_tensors(path, ["c", "a"])
    assert list(back) == ["c", "a"]
    assert torch.equal(back["c"], torch.arange(4))


def test_missing_name_lists_what_is_there(tmp_path):
    path = save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)})
    with pytest.raises(ArtifactError, match=r"no tensors named \['zz'\].*holds 1: a"):
        load_tensors(path, ["zz"])


def test_nan_on_save_names_tensor_and_index_and_writes_nothing(tmp_path):
    w = torch.zeros(3, 4)
    w[2, 1] = float("nan")
    with pytest.raises(NumericalInstability, match=r"tensor 'layer.w' at index \[2, 1\]") as info:
        save_tensors(tmp_path / "x.safetensors", {"ok": torch.ones(2), "layer.w": w})
    assert info.value.index == (2, 1)
    assert list(tmp_path.iterdir()) == []


def test_inf_on_load_names_tensor_and_index(tmp_path):
    w = torch.zeros(5)
    w[3] = -float("inf")
    save_file({"w": w}, str(tmp_path / "x.safetensors"))
    with pytest.raises(NumericalInstability, match=r"-Inf detected in tensor 'w' .* at index \[3\]"):
        load_tensors(tmp_path / "x.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[:-7],  # truncated data
        lambda b: b[:5],  # truncated header length
        lambda b: b"\xff" * 16 + b[16:],  # garbage header length
        lambda b: b[:8] + b"{not json" + b[17:],  # garbage header
        lambda b: b + b"junk",  # trailing bytes
    ],
)
def test_corrupt_file_is_an_artifact_error_naming_the_file(tmp_path, corrupt):
    path = save_tensors(tmp_path / "x.safetensors", {"a": torch.randn(8, 8)})
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ArtifactError, match="x.safetensors"):
        load_tensors(path)
    with pytest.raises(ArtifactError, match="x.safetensors"):
        check_safetensors(path)


def test_bad_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a torch.Tensor"):
        save_tensors(tmp_path / "x.safetensors", {"a": [1, 2]})
    with pytest.raises(ConfigError, match="metadata"):
        save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(1)}, metadata={"k": 3})
    assert list(tmp_path.iterdir()) == []


def test_non_contiguous_and_grad_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    w = torch.nn.Parameter(base.t())  # non-contiguous, requires grad
    path = save_tensors(tmp_path / "x.safetensors", {"w": w})
    assert torch.equal(load_tensors(path)["w"], base.t())
