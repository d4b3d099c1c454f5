"""The dtype Minitron computes in, and the dtype a pruned candidate is saved in.

Stage: data handling around every Minitron step. A checkpoint is loaded in the dtype it is
stored in (bf16 stays bf16). On CPU, bf16/fp16 matmuls are about 40x slower than float32 and
less exact, so scores, losses and candidate evaluation run on a float32 copy of the weights
(the upcast is exact); on CUDA the model keeps its dtype. Pruning only selects weights, so a
candidate cast back to the stored dtype holds exactly the stored values of the weights it keeps
(Gemma's embedding rescaling aside, computed in float32 then rounded once).
"""

from __future__ import annotations

import torch
from torch import nn

from pruning_core.arch import model_device


def to_compute_dtype_(model: nn.Module) -> torch.dtype:
    """Cast ``model`` in place to the dtype Minitron computes in; return the dtype it had.

    On CPU, floating-point weights and buffers become float32; on other devices nothing
    changes. Pass the returned (stored) dtype to
    :func:`~pruning_core.minitron.search.build_candidate` (``dtype=``) or :func:`cast_parameters_`
    before saving, so the saved model keeps the checkpoint's dtype.

    Returns:
        The dtype of the model's first floating-point parameter before the cast.
    """
    stored = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if model_device(model).type == "cpu" and stored != torch.float32:
        model.float()
    return stored


def cast_parameters_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters of ``model`` to ``dtype`` in place (tied ones stay tied);
    buffers (rotary tables, Gemma's embedding scale) keep their dtype, as in a freshly loaded
    model. Sets ``config.dtype`` too, so ``save_pretrained`` records the dtype the weights have."""
    for param in model.parameters():  # each (tied) parameter once; same objects, so ties survive
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "dtype"):
        config.dtype = dtype
    return model


__all__ = ["cast_parameters_", "to_compute_dtype_"]
