"""pack_weight / unpack_weight / quantization_config against compressed-tensors and a hand layout."""

from __future__ import annotations

import json

import pytest
import torch

from pruning_core.quant import (
    QuantizedWeight,
    QuantSpec,
    pack_weight,
    quantization_config,
    quantize_rtn,
    unpack_weight,
    write_quantization_config,
)

pytest.importorskip("compressed_tensors")

SPECS = [QuantSpec(bits=b, group_size=g, symmetric=s) for b in (4, 8) for g in (16, -1) for s in (True, False)]


def test_packed_layout_by_hand():
    # 4 bits: 8 codes per int32, code j in bits 4j..4j+3, stored unsigned (q + 8). Codes -8..7 are
    # stored as 0..15: word 0 holds 0..7 -> 0x76543210, word 1 holds 8..15 -> 0xFEDCBA98.
    codes = torch.arange(-8, 8, dtype=torch.int8)[None, :]
    qw = QuantizedWeight(codes, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int8), QuantSpec(bits=4, group_size=16))
    t = pack_weight(qw)
    expected = [0x76543210, 0xFEDCBA98 - (1 << 32)]  # int32 two's complement
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].tolist() == [expected]
    assert t["weight_shape"].tolist() == [1, 16] and set(t) == {"weight_packed", "weight_scale", "weight_shape"}


def test_asymmetric_zero_points_are_packed_along_rows():
    # 13 rows of 8-bit zero points: 4 per int32 down each column, padded to 4 words.
    W = torch.randn(13, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    spec = QuantSpec(bits=8, group_size=16, symmetric=False)
    t = pack_weight(quantize_rtn(W, spec))
    assert t["weight_zero_point"].shape == (4, 2) and t["weight_zero_point"].dtype == torch.int32
    assert t["weight_packed"].shape == (13, 8) and t["weight_scale"].shape == (13, 2)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_round_trip_and_the_library_decompresses_to_our_weights(spec, scale_dtype):
    from compressed_tensors.compressors import BaseCompressor

    W = torch.randn(13, 64, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 64)
    qw = quantize_rtn(W, spec, scale_dtype=scale_dtype)
    tensors = pack_weight(qw)
    back = unpack_weight(tensors, spec)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero_points, qw.zero_points)
    assert torch.equal(back.scales, qw.scales) and tensors["weight_scale"].dtype == scale_dtype
    compressor = BaseCompressor.load_from_registry("pack-quantized")
    if hasattr(compressor, "decompress_weight"):  # compressed-tensors 0.13
        dense = compressor.decompress_weight(tensors, quantization_args=_args(spec))
        assert dense.dtype == scale_dtype and torch.equal(dense, qw.dequantize())


def _args(spec):
    from pruning_core.quant import quantization_args

    return quantization_args(spec)


def test_config_section(tmp_path):
    qc = quantization_config(QuantSpec(bits=4, group_size=128), ignore=["lm_head", "model.layers.0.mlp.down_proj"])
    weights = qc.config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.strategy, weights.symmetric, weights.type) == (
        4, 128, "group", True, "int")
    assert qc.format == "pack-quantized" and qc.quantization_status == "compressed"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_quantization_config(tmp_path, QuantSpec(bits=8, group_size=-1), ignore=["lm_head"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    section = cfg["quantization_config"]
    assert cfg["model_type"] == "llama" and section["quant_method"] == "compressed-tensors"
    assert section["format"] == "pack-quantized" and section["ignore"] == ["lm_head"]
    group = section["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert (group["weights"]["num_bits"], group["weights"]["strategy"]) == (8, "channel")
