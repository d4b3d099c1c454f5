"""QuantSpec validation, the min-max grid (hand cases, properties) and QuantizedWeight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pruning_core.errors import ConfigError, NumericalInstability, ShapeMismatch
from pruning_core.quant import QuantizedWeight, QuantSpec, quantize_rtn


# ---------------------------------------------------------------- QuantSpec
@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 3}, "bits"), ({"bits": True}, "bits"), ({"bits": 8.0}, "bits"),
    ({"group_size": 0}, "group_size"), ({"group_size": -2}, "group_size"), ({"group_size": 1.5}, "group_size"),
    ({"symmetric": "yes"}, "symmetric"),
])
def test_spec_rejects_bad_fields(kwargs, field):
    with pytest.raises(ConfigError) as info:
        QuantSpec(**kwargs)
    assert info.value.field == field


def test_spec_round_trip_and_groups():
    spec = QuantSpec(bits=8, group_size=-1, symmetric=False)
    assert QuantSpec.from_dict(spec.to_dict()) == spec and str(spec) == "W8 per-channel asym"
    assert (spec.maxq, spec.offset, spec.num_groups(576)) == (255, 128, 1)
    assert QuantSpec().num_groups(1536) == 12 and str(QuantSpec()) == "W4 g128 sym"
    with pytest.raises(ShapeMismatch, match="576"):
        QuantSpec(group_size=128).num_groups(576, name="q_proj")
    with pytest.raises(ConfigError, match="group"):
        QuantSpec.from_dict({"bits": 4, "groupsize": 128})


# ---------------------------------------------------------------- hand-computed grids
def test_symmetric_golden():
    # max|w| = 3 -> s = 2·3/15 = 0.4; w/s = [-3.75, 0, 1.875, 7.5] -> round (half to even)
    # [-4, 0, 2, 8], clamped to the 4-bit range [-8, 7]: [-4, 0, 2, 7] -> [-1.6, 0, 0.8, 2.8]
    qw = quantize_rtn(torch.tensor([[-1.5, 0.0, 0.75, 3.0]]), QuantSpec(bits=4, group_size=4))
    assert qw.codes.tolist() == [[-4, 0, 2, 7]] and qw.zero_points.tolist() == [[0]]
    torch.testing.assert_close(qw.scales, torch.tensor([[0.4]]))
    torch.testing.assert_close(qw.dequantize(), torch.tensor([[-1.6, 0.0, 0.8, 2.8]]))


def test_asymmetric_golden():
    # range [-1, 4] -> s = 5/15 = 1/3, zero point round(1 / s) = 3 (unsigned) = -5 (signed);
    # unsigned codes round(w/s) + 3 = [0, 3, 9, 15] = signed [-8, -5, 1, 7]; 0 comes back exactly.
    qw = quantize_rtn(torch.tensor([[-1.0, 0.0, 2.0, 4.0]]), QuantSpec(bits=4, group_size=4, symmetric=False))
    assert qw.codes.tolist() == [[-8, -5, 1, 7]] and qw.zero_points.tolist() == [[-5]]
    torch.testing.assert_close(qw.dequantize(), torch.tensor([[-1.0, 0.0, 2.0, 4.0]]))
    assert float(qw.dequantize()[0, 1]) == 0.0


def test_groups_and_all_zero_group():
    # Two groups of 2 per row; an all-zero group gets the range [-1, 1] (GPTQ) and stays 0.
    w = torch.tensor([[1.0, -1.0, 0.0, 0.0]])
    qw = quantize_rtn(w, QuantSpec(bits=8, group_size=2, symmetric=False))
    assert qw.scales.shape == (1, 2) and bool((qw.scales > 0).all())
    assert torch.equal(qw.dequantize()[0, 2:], torch.zeros(2))


# ---------------------------------------------------------------- properties
SPECS = st.sampled_from([QuantSpec(bits=b, group_size=g, symmetric=s)
                         for b in (4, 8) for g in (8, -1) for s in (True, False)])


@settings(max_examples=40, deadline=None)
@given(w=arrays(np.float32, (5, 16), elements=st.floats(-8, 8, width=32, allow_subnormal=False)), spec=SPECS,
       zero_at=st.integers(0, 79))
def test_rtn_error_is_at_most_half_a_step_and_zeros_are_exact(w, spec, zero_at):
    W = torch.from_numpy(w)
    W.view(-1)[zero_at] = 0.0  # a pruned weight
    qw = quantize_rtn(W, spec)
    deq = qw.dequantize()
    step = qw.scales.repeat_interleave(qw.group_width, dim=1)
    assert bool(((deq - W).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())  # inside the range: no clipping loss
    assert float(deq.view(-1)[zero_at]) == 0.0
    assert int(qw.codes.min()) >= -spec.offset and int(qw.codes.max()) <= spec.offset - 1


@settings(max_examples=20, deadline=None)
@given(w=arrays(np.float32, (4, 16), elements=st.floats(-4, 4, width=32, allow_subnormal=False)), spec=SPECS)
def test_mask_gives_exact_zeros_and_scale_dtype_is_respected(w, spec):
    W = torch.from_numpy(w)
    mask = torch.arange(64).reshape(4, 16) % 3 != 0
    qw = quantize_rtn(W, spec, mask=mask, scale_dtype=torch.bfloat16)
    assert qw.scales.dtype == torch.bfloat16
    deq = qw.dequantize(torch.float32)
    assert bool((deq[~mask] == 0).all())
    # bf16 scales: the float32 product is exact, so rounding it to bf16 once is what a bf16 loader computes
    assert torch.equal(qw.dequantize(torch.bfloat16), deq.to(torch.bfloat16))


def test_dequantize_equals_compressed_tensors_dequantize():
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    for spec in (QuantSpec(bits=4, group_size=8, symmetric=False), QuantSpec(bits=8, group_size=-1)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            qw = quantize_rtn(W, spec, scale_dtype=dtype)
            ref = dequantize(qw.codes, qw.scales, None if spec.symmetric else qw.zero_points)
            assert ref.dtype == dtype and torch.equal(qw.dequantize(), ref)


# ---------------------------------------------------------------- QuantizedWeight validation
def test_quantized_weight_validation():
    spec = QuantSpec(bits=4, group_size=4)
    codes, scales, zps = torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int8)
    assert QuantizedWeight(codes, scales, zps, spec).shape == (2, 8)
    with pytest.raises(ShapeMismatch):
        QuantizedWeight(codes, torch.ones(2, 3), zps, spec)
    with pytest.raises(ConfigError, match="codes"):
        QuantizedWeight(codes + 8, scales, zps, spec)  # 8 is outside the 4-bit range [-8, 7]
    with pytest.raises(ConfigError, match="symmetric"):
        QuantizedWeight(codes, scales, zps + 1, spec)
    with pytest.raises(NumericalInstability):
        QuantizedWeight(codes, scales * 0, zps, spec)
    with pytest.raises(ShapeMismatch):
        quantize_rtn(torch.ones(2, 8), spec, mask=torch.ones(2, 4, dtype=torch.bool))
