"""compressed-tensors' ``pack-quantized`` format (W4A16 / W8A16, what vLLM serves), per layer.

Stage: formats. Everything format-specific is done by the ``compressed-tensors`` library (read:
0.13.0 ``compressors/quantized_compressors/pack_quantized.py``, ``quantization/quant_args.py``,
``quant_config.py``, ``ModelCompressor.update_config``; 0.15-0.20 ``compressors/pack_quantized``):
its ``QuantizationArgs``/``QuantizationScheme``/``QuantizationConfig`` build the config, its
``PackedQuantizationCompressor`` packs the codes, ``ModelCompressor.update_config`` writes
``config.json``. For one ``nn.Linear`` ``<module>`` the checkpoint holds, instead of ``.weight``:

* ``weight_packed``: int32 ``[out, ceil(in · bits / 32)]``, ``32 / bits`` codes per word (code j
  of a word in bits ``j·bits ...``, stored as ``q + 2^(bits-1)``);
* ``weight_scale``: ``[out, groups]`` in the scales' dtype;
* ``weight_zero_point`` (asymmetric only): int32 ``[ceil(out · bits / 32), groups]``, packed along rows;
* ``weight_shape``: ``[2]``, the dense ``(out, in)``.

Memory: :func:`pack_weight` touches one layer (a dense float copy of it while the library packs),
so a writer can go block by block: ``pack_weight`` per layer, then :func:`write_quantization_config`.

Loaders (checked on a tiny Llama, see tests/quant): compressed-tensors' own decompression reads
every case. ``transformers`` (5.x) needs compressed-tensors >= 0.15 to load the format at all;
with 0.15-0.17 it reloads symmetric and asymmetric checkpoints exactly, with 0.18-0.20.1 only
symmetric ones (it allocates unpacked zero points and rejects the packed ones). vLLM serves
symmetric W4A16/W8A16 (zero points only for 4 bits).

The library is imported when a function here is called (it is an optional dependency).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pruning_core.errors import ArtifactError
from pruning_core.quant.spec import QuantSpec
from pruning_core.quant.weight import QuantizedWeight

FORMAT = "pack-quantized"
#: The Linear modules quantized by default (compressed-tensors matches targets by class name).
TARGETS = ("Linear",)
_MODULE = "layer"  # a placeholder module path for the 0.13 state-dict compressor


def _ct() -> Any:
    try:
        import compressed_tensors
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the pack-quantized export needs the compressed-tensors package "
                          "(pip install compressed-tensors)") from exc
    return compressed_tensors


def quantization_args(spec: QuantSpec) -> Any:
    """compressed-tensors ``QuantizationArgs`` of ``spec`` (int weights, group or channel strategy)."""
    from compressed_tensors.quantization import QuantizationArgs

    _ct()
    strategy = "channel" if spec.per_channel else "group"
    group = None if spec.per_channel else spec.group_size
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy,
                            group_size=group, dynamic=False)


def quantization_config(spec: QuantSpec, *, ignore: Sequence[str] = ("lm_head",),
                        targets: Sequence[str] = TARGETS) -> Any:
    """compressed-tensors ``QuantizationConfig``: one weight-only scheme over ``targets`` (module
    class names or names), minus ``ignore`` (module names), format pack-quantized, compressed."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    _ct()
    scheme = QuantizationScheme(targets=list(targets), weights=quantization_args(spec))
    return QuantizationConfig(config_groups={"group_0": scheme}, format=FORMAT,
                              quantization_status="compressed", ignore=sorted(ignore))


def write_quantization_config(directory: Any, spec: QuantSpec, *, ignore: Sequence[str] = ("lm_head",),
                              targets: Sequence[str] = TARGETS) -> None:
    """Add ``quantization_config`` to ``directory/config.json`` with ``ModelCompressor.update_config``
    (in place: call it on a staging directory that is renamed into place afterwards)."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=quantization_config(spec, ignore=ignore, targets=targets)).update_config(
        str(directory))


def pack_weight(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized Linear, by local name (``weight_packed``,
    ``weight_scale``, ``weight_shape`` and, if asymmetric, ``weight_zero_point``), on the CPU.

    The library's compressor quantizes the dense weight ``(q - z) · s`` (formed in float32, where
    ``x / s`` lands within 1e-4 of the integer ``q - z``) with our scales and zero points, which
    gives back exactly our codes; the packed codes are unpacked and compared to make sure.

    Raises:
        ArtifactError: the library's packing did not reproduce the codes (a version mismatch).
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qw = qw.to("cpu")
    work = torch.promote_types(qw.scales.dtype, torch.float32)
    local = {"weight": qw.dequantize(work), "weight_scale": qw.scales.to(work)}
    if not qw.spec.symmetric:
        local["weight_zero_point"] = qw.zero_points
    scheme = QuantizationScheme(targets=list(TARGETS), weights=quantization_args(qw.spec))
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    if "names_to_scheme" in inspect.signature(compressor.compress).parameters:  # 0.13: state-dict API
        full = {f"{_MODULE}.{k}": v for k, v in local.items()}
        packed = compressor(config=None).compress(full, names_to_scheme={_MODULE: scheme})
        out = {k.removeprefix(f"{_MODULE}."): v for k, v in packed.items()}
    else:  # >= 0.15: per-module classmethod
        out = dict(compressor.compress(local, scheme))
    out["weight_scale"] = qw.scales.contiguous()  # stored in the scales' own dtype
    _check_round_trip(out, qw)
    return out


def unpack_weight(tensors: Mapping[str, torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Inverse of :func:`pack_weight` with the library's ``unpack_from_int32`` (for readers and tests)."""
    from compressed_tensors.compressors import unpack_from_int32

    shape = torch.Size(int(v) for v in tensors["weight_shape"])
    codes = unpack_from_int32(tensors["weight_packed"], spec.bits, shape)
    scales = tensors["weight_scale"]
    if spec.symmetric:
        zero_points = torch.zeros(scales.shape, dtype=torch.int8)
    else:
        zero_points = unpack_from_int32(tensors["weight_zero_point"], spec.bits,
                                        torch.Size((shape[0], scales.shape[1])), packed_dim=0)
    return QuantizedWeight(codes.to(torch.int8), scales, zero_points.to(torch.int8), spec)


def _check_round_trip(out: Mapping[str, torch.Tensor], qw: QuantizedWeight) -> None:
    back = unpack_weight(out, qw.spec)
    if not (torch.equal(back.codes, qw.codes) and torch.equal(back.zero_points, qw.zero_points)):
        raise ArtifactError("weight_packed", f"compressed-tensors {_ct().__version__} did not reproduce the "
                                             f"codes of a {list(qw.shape)} {qw.spec} weight")


__all__ = [
    "FORMAT",
    "TARGETS",
    "pack_weight",
    "quantization_args",
    "quantization_config",
    "unpack_weight",
    "write_quantization_config",
]
