"""Decoder blocks of a causal LM, the device of a model, and an eval-mode context.

Stage: foundation. :func:`decoder_blocks` is the one place that knows where a Hugging Face
causal LM keeps its decoder layers (``model.layers`` for Llama-like families, ``transformer.h``
for GPT-2 and Falcon, ``model.decoder.layers`` for OPT, ``gpt_neox.layers`` for GPT-NeoX).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from pruning_core.errors import UnsupportedArchitecture

MODEL_BUILD_LOCK = threading.RLock()
"""Held while a ``transformers`` model is built (``from_pretrained``, ``from_config``, a class on
the ``meta`` device). ``from_pretrained`` patches process-wide state while it runs (it replaces
``PreTrainedModel.tie_weights`` with a no-op), so a model built in another thread at that moment
comes out untied; every build in pruning_core holds this lock (thread-run tasks build models
concurrently)."""

BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
               "model.language_model.layers", "layers")


def _submodule(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of ``model`` and their qualified name (e.g. ``"model.layers"``).

    Raises:
        UnsupportedArchitecture: none of :data:`BLOCK_PATHS` holds a non-empty ``nn.ModuleList``
            (names the model class and the paths tried; a ``ConfigError`` and a ``GraphError``).
    """
    for path in BLOCK_PATHS:
        blocks = _submodule(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise UnsupportedArchitecture(type(model).__name__, f"no decoder blocks at any of {list(BLOCK_PATHS)}")


def model_device(module: nn.Module) -> torch.device:
    """Device of the module's first parameter (then buffer); CPU for a module without either."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode inside the block and restore its training flag afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


__all__ = ["BLOCK_PATHS", "decoder_blocks", "eval_mode", "model_device"]
