"""Weight-only integer quantization (W4A16 / W8A16) and its compressed-tensors export.

Stage: two parts, arrows one way. The foundation part (``spec``, ``weight``, ``quantizer``:
torch and ``pruning_core.errors`` only) is what ``solvers.gptq`` quantizes with; the format part
(``compressed``, ``export``) writes the result in compressed-tensors' ``pack-quantized`` layout.
Nothing here imports the solvers.

    spec = QuantSpec(bits=4, group_size=128)
    qw, keep = gptq_quantize(weight, stats.hessian, spec)          # pruning_core.solvers
    qw_rtn = quantize_rtn(weight, spec)                            # the round-to-nearest baseline
    layer.weight.data = qw.dequantize(layer.weight.dtype)
    save_quantized(model, {"model.layers.0.mlp.up_proj": qw, ...}, "out/")
"""

from pruning_core.quant.compressed import (
    FORMAT,
    pack_weight,
    quantization_args,
    quantization_config,
    unpack_weight,
    write_quantization_config,
)
from pruning_core.quant.export import save_quantized
from pruning_core.quant.quantizer import from_grid, grid_params, quantize_rtn, to_grid
from pruning_core.quant.spec import SUPPORTED_BITS, QuantSpec
from pruning_core.quant.weight import QuantizedWeight

__all__ = [
    "FORMAT",
    "SUPPORTED_BITS",
    "QuantSpec",
    "QuantizedWeight",
    "from_grid",
    "grid_params",
    "pack_weight",
    "quantization_args",
    "quantization_config",
    "quantize_rtn",
    "save_quantized",
    "to_grid",
    "unpack_weight",
    "write_quantization_config",
]
