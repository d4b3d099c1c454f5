"""Sparse export: exact round trips, the compressed-tensors layout checked against the library
itself, hand-computed golden arrays, byte counts, and clear errors before anything is written."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from pruning_core.errors import ArtifactError, ConfigError, InvalidMask, InvalidPattern
from pruning_core.masks import generate_nm_mask, generate_unstructured_mask
from pruning_core.sparse import ExportFormat, bitmask24, export_sparse, load_sparse_export, read_export_info
from tests.conftest import make_tiny_llama
from tests.legacy_ct import run_legacy_check

FORMATS = [f.value for f in ExportFormat]
T = torch.tensor


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float32 tensor, with -0.0 folded into +0.0 (the documented exception)."""
    return (t + 0.0).contiguous().view(torch.int32)


def _prune(model: torch.nn.Module, pattern: str) -> dict[str, torch.Tensor]:
    """Magnitude-prune every decoder nn.Linear in place (2:4 or 50% per row); returns the masks."""
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                w = module.weight
                mask = (generate_nm_mask(w.abs(), 2, 4) if pattern == "2:4"
                        else generate_unstructured_mask(w.abs(), 0.5, scope="row")).tensor
                w.mul_(mask)  # leaves -0.0 at pruned negative weights
                masks[name] = mask
    return masks


@pytest.fixture(scope="module")
def pruned24():
    model = make_tiny_llama()
    return model, _prune(model, "2:4")


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_bit_exact(pruned24, tmp_path, fmt):
    model, masks = pruned24
    info = export_sparse(model, masks, tmp_path / "x", fmt)
    state = model.state_dict()
    loaded = load_sparse_export(tmp_path / "x")
    assert list(loaded) == list(state)  # every tensor, in order, lm_head included (tied: stored once)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(_bits(loaded[name]), _bits(tensor)), name
    assert info.layers == len(masks) == 14
    assert info.file_bytes == (tmp_path / "x" / ("model.safetensors" if fmt == "compressed_tensors"
                                                  else "weights.safetensors")).stat().st_size
    assert info.dense_bytes == sum(t.numel() * 4 for n, t in state.items() if n != "lm_head.weight")
    assert read_export_info(tmp_path / "x") == info


def test_stored_bytes_per_layer_match_the_formats(pruned24, tmp_path):
    """Per [rows, cols] fp32 layer at 2:4: CSR stores values + int32 columns for half the entries
    and rows + 1 pointers; the 2:4 layouts store half the values plus cols/8 bytes of metadata per
    row (2 bits per stored slot, or 1 bit per column), and the bitmask layout its int64 shape."""
    model, masks = pruned24
    name = "model.layers.0.mlp.down_proj"
    rows, cols = model.get_submodule(name).weight.shape
    expected = {"csr": rows * cols // 2 * (4 + 4) + (rows + 1) * 4,
                "semi_structured": rows * cols // 2 * 4 + rows * cols // 8,
                "compressed_tensors": rows * cols // 2 * 4 + rows * cols // 8 + 2 * 8}
    for fmt in FORMATS:
        export_sparse(model, masks, tmp_path / fmt, fmt)
        index = json.loads((tmp_path / fmt / "sparse_index.json").read_text())
        entry = index["tensors"][f"{name}.weight"]
        file = tmp_path / fmt / index["weights_file"]
        with safe_open(file, "pt") as f:
            stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in entry["arrays"].values())
        assert stored == expected[fmt], fmt
    ratios = {fmt: read_export_info(tmp_path / fmt).size_ratio for fmt in FORMATS}
    assert ratios["csr"] > 0.99  # CSR at 50% with int32 indices saves nothing over dense fp32
    assert ratios["semi_structured"] < 0.9 and ratios["compressed_tensors"] < 0.9


def test_bitmask24_golden():
    # row 0 keeps columns 1, 3 | 4, 7; row 1 keeps only column 0 in its first group, so the
    # spare slot is the lowest pruned column (1, stored as 0.0), then 6, 7.
    w = T([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 4.0],
           [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0]])
    mask = w != 0
    parts = bitmask24.encode(w, mask)
    assert parts["compressed"].tolist() == [[1.5, -2.0, 3.0, 4.0], [5.0, 0.0, 6.0, 7.0]]
    assert parts["bitmask"].tolist() == [[2 + 8 + 16 + 128], [1 + 2 + 64 + 128]]
    assert parts["bitmask"].dtype == torch.uint8
    assert parts["shape"].tolist() == [[2], [8]] and parts["shape"].dtype == torch.int64
    assert torch.equal(bitmask24.decode(**parts, name="w"), w)


def test_compressed_tensors_arrays_equal_the_library_compressor(pruned24, tmp_path):
    """For magnitude 2:4 masks (no ties) compressed-tensors' own compressor (0.13, the last release
    with it: tests/legacy_ct.py), which picks the two largest |w| of each group, must produce
    byte-identical arrays."""
    model, masks = pruned24
    dense = {name: model.get_submodule(name).weight.detach().contiguous() for name in masks}
    ours = {f"{name}.{role}": t for name in masks for role, t in bitmask24.encode(dense[name], masks[name]).items()}
    save_file(dense, tmp_path / "dense.safetensors")
    save_file(ours, tmp_path / "ours.safetensors")
    assert run_legacy_check("arrays", tmp_path / "dense.safetensors", tmp_path / "ours.safetensors") == "ok"


def test_compressed_tensors_model_compressor_decompresses_our_export(pruned24, tmp_path):
    """The library's own load path (compressed-tensors 0.13): ModelCompressor from our
    config.json, then its decompressor yields exactly our pruned weights for the 14 layers."""
    model, masks = pruned24
    export_sparse(model, masks, tmp_path / "ct", "compressed_tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    sc = qc["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    assert sc["ignore"] == ["lm_head"] and sorted(sc["targets"]) == sorted(masks)
    zeros = sum(int((t == 0).sum()) for n, t in model.state_dict().items() if n != "lm_head.weight")
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(p.numel() for p in model.parameters()))
    expected = {f"{name}.weight": (model.get_submodule(name).weight + 0.0).detach().contiguous() for name in masks}
    save_file(expected, tmp_path / "expected.safetensors")
    assert run_legacy_check("decompress", tmp_path / "ct", tmp_path / "expected.safetensors") == "ok"


def test_export_from_a_model_directory_copies_its_files(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    masks = _prune(model, "2:4")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    export_sparse(tmp_path / "model", masks, tmp_path / "ct", "compressed_tensors")
    files = {p.name for p in (tmp_path / "ct").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "sparse_index.json"} <= files
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.up_proj.compressed" in keys and "model.layers.1.mlp.up_proj.weight" not in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied, as in the source
    loaded = load_sparse_export(tmp_path / "ct")
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        assert set(loaded) == set(f.keys())
        for name in f.keys():
            assert torch.equal(_bits(loaded[name]), _bits(f.get_tensor(name))), name


@pytest.mark.parametrize("fmt", ["semi_structured", "compressed_tensors"])
def test_two_four_formats_refuse_other_masks(tmp_path, fmt):
    model = make_tiny_llama()
    masks = _prune(model, "unstructured")
    with pytest.raises(InvalidPattern, match=rf"model.layers.0.self_attn.q_proj.*{fmt} export stores 2:4 sparsity only"):
        export_sparse(model, masks, tmp_path / "x", fmt)
    assert not (tmp_path / "x").exists()
    export_sparse(model, masks, tmp_path / "csr", "csr")  # CSR takes any mask, exactly
    loaded = load_sparse_export(tmp_path / "csr")
    assert all(torch.equal(_bits(loaded[n]), _bits(t)) for n, t in model.state_dict().items())


def test_bad_inputs_are_refused_before_writing(pruned24, tmp_path):
    model, masks = pruned24
    name = "model.layers.0.mlp.up_proj"
    with pytest.raises(ConfigError, match="must be one of csr, semi_structured, compressed_tensors"):
        export_sparse(model, masks, tmp_path / "x", "bsr")
    with pytest.raises(ConfigError, match="mask 'model.layers.9.mlp.up_proj' names no 2-D tensor"):
        export_sparse(model, {"model.layers.9.mlp.up_proj": masks[name]}, tmp_path / "x", "csr")
    with pytest.raises(InvalidMask, match="bool"):
        export_sparse(model, {name: masks[name].float()}, tmp_path / "x", "csr")
    dense = make_tiny_llama()  # not pruned: the mask would silently drop weights
    with pytest.raises(InvalidMask, match=rf"'{name}.weight'.*non-zero"):
        export_sparse(dense, {f"{name}.weight": masks[name]}, tmp_path / "x", "csr")
    with pytest.raises(ConfigError, match="config.json"):
        export_sparse(dict(model.state_dict()), masks, tmp_path / "x", "compressed_tensors")
    assert not (tmp_path / "x").exists()


def test_corrupt_exports_are_artifact_errors(pruned24, tmp_path):
    model, masks = pruned24
    with pytest.raises(ArtifactError, match="no sparse_index.json"):
        load_sparse_export(tmp_path)
    export_sparse(model, masks, tmp_path / "x", "compressed_tensors")
    file = tmp_path / "x" / "model.safetensors"
    with safe_open(file, "pt") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    arrays["model.layers.0.mlp.up_proj.bitmask"][0, 0] = 0xFF  # 4 positions in one group
    from safetensors.torch import save_file

    save_file(arrays, str(file))
    with pytest.raises(ArtifactError, match="row 0, group 0 stores 4 positions"):
        load_sparse_export(tmp_path / "x")
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ArtifactError):
        load_sparse_export(tmp_path / "x")


@settings(max_examples=25)
@given(rows=st.integers(1, 6), groups=st.integers(1, 4), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(FORMATS), keep=st.sampled_from(["nm", "fewer"]))
def test_round_trip_property(rows, groups, seed, fmt, keep):
    """Any 2:4 (or sparser) mask, any values incl. zeros kept by the mask: exact round trip."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * 4, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.2] = 0.0  # kept zeros and groups keeping fewer than 2
    mask = generate_nm_mask(torch.rand(w.shape, generator=g), 2, 4).tensor
    if keep == "fewer":
        mask &= torch.rand(w.shape, generator=g) < 0.6
    w = w * mask
    state = {"layer.weight": w, "norm.weight": torch.randn(3, generator=g)}
    with tempfile.TemporaryDirectory() as d:
        export_sparse(state, {"layer": mask}, Path(d) / "x", fmt, config={"model_type": "llama"})
        loaded = load_sparse_export(Path(d) / "x")
    assert torch.equal(_bits(loaded["layer.weight"]), _bits(w))
    assert torch.equal(loaded["norm.weight"], state["norm.weight"])
    bits = np.unpackbits(bitmask24.encode(w, mask)["bitmask"].numpy(), axis=-1, bitorder="little")
    assert (bits[:, : groups * 4].reshape(rows, groups, 4).sum(-1) == 2).all()
