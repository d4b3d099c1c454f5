"""Save an in-memory model with quantized Linear layers as a compressed-tensors checkpoint.

Stage: formats -> disk. A Hugging Face directory (``save_pretrained`` with a state dict in which
every quantized layer's ``weight`` is replaced by :func:`~pruning_core.quant.compressed.pack_weight`'s
tensors, then ``config.json`` gets the ``quantization_config`` of
:func:`~pruning_core.quant.compressed.write_quantization_config`), built in a temporary sibling
directory and renamed into place (a crash leaves no partial export). Loaders: see
:mod:`pruning_core.quant.compressed`.

A streaming writer does the same block by block: ``pack_weight`` for each layer of a block,
those tensors into the block's shard, ``write_quantization_config`` once at the end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from pruning_core.errors import ConfigError, ShapeMismatch, UnsupportedOperation
from pruning_core.io.atomic import atomic_dir
from pruning_core.quant.compressed import pack_weight, write_quantization_config
from pruning_core.quant.spec import QuantSpec
from pruning_core.quant.weight import QuantizedWeight

logger = logging.getLogger(__name__)


def save_quantized(
    model: Any,
    quantized: Mapping[str, QuantizedWeight],
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
) -> Path:
    """Write ``model`` with the layers in ``quantized`` stored pack-quantized; returns ``out_dir``.

    Args:
        model: a ``transformers`` ``PreTrainedModel``; its other tensors are saved as they are
            (in their current dtype), tied weights once, as ``save_pretrained`` does.
        quantized: ``{module name: QuantizedWeight}`` of ``nn.Linear`` modules of ``model``, all
            with the same spec. The model's own ``.weight`` of those modules is not saved (for
            the saved model to be the evaluated one, set it to ``dequantize()`` beforehand).
        out_dir: the final directory (replaced if it exists).
        tokenizer: saved alongside when given.

    Raises:
        ConfigError: nothing to save, or layers with different specs.
        UnsupportedOperation: a name that is not an ``nn.Linear`` of ``model`` (compressed-tensors
            compresses Linear modules only: not Conv1D, not fused expert parameters).
        ShapeMismatch: a quantized weight whose shape is not its module's.
    """
    spec = _common_spec(quantized)
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = dict(model.state_dict())
    for name, qw in quantized.items():
        module = linear.get(name)
        if module is None:
            kind = type(dict(model.named_modules()).get(name)).__name__
            raise UnsupportedOperation(f"'{name}' ({kind}) is not an nn.Linear of the model: the pack-quantized "
                                       "export stores Linear weights only")
        if tuple(module.weight.shape) != tuple(qw.shape):
            raise ShapeMismatch(list(module.weight.shape), list(qw.shape), name=name, reason="quantized weight")
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": t for key, t in pack_weight(qw).items()})
    final = Path(out_dir)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        write_quantization_config(tmp, spec, ignore=sorted(set(linear) - set(quantized)))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved %d %s layers (pack-quantized) to %s", len(quantized), spec, final)
    return final


def _common_spec(quantized: Mapping[str, QuantizedWeight]) -> QuantSpec:
    specs = {qw.spec for qw in quantized.values()}
    if not specs:
        raise ConfigError("quantized", "no quantized layers to save")
    if len(specs) > 1:
        raise ConfigError("quantized", f"all layers must share one spec, got {sorted(map(str, specs))}")
    return specs.pop()


__all__ = ["save_quantized"]
