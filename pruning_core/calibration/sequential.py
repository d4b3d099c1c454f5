"""Block-by-block (sequential) calibration of decoder models, as in the Wanda/SparseGPT references.

Stage: calibration. The reference procedure prunes decoder block ``i`` with statistics of its
inputs, then computes block ``i+1``'s inputs *through the pruned block*. This module provides the
three steps, so that a flow can run each block in its own task:

1. :func:`capture_block_inputs` runs the model up to decoder block 0 and records, per batch, the
   hidden states and the keyword arguments the block receives (attention mask, position ids,
   rotary position embeddings, ...). It stops the forward pass with a private ``BaseException``
   subclass that no model code can mistake for a real error (the references raise ValueError
   and swallow every ValueError).
2. :func:`calibrate_block` collects the statistics of one block's prunable units on those inputs.
3. :func:`run_block` runs the (pruned) block and returns the next block's inputs.

Blocks are found with :func:`pruning_core.arch.decoder_blocks` (``find_decoder_blocks`` is its
old name, kept as an alias); units and their statistics as in :mod:`pruning_core.calibration.hooks`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.arch import decoder_blocks, eval_mode, model_device
from pruning_core.calibration.capture import Batch, LayerSelection, select_units
from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.hooks import attach_unit_hooks, report_unrouted
from pruning_core.errors import ConfigError

logger = logging.getLogger(__name__)

_SCALAR_TAGS = {"bool": bool, "int": int, "float": float}


class _StopForward(BaseException):
    """Private signal that stops a forward pass once block 0's inputs are recorded (never a real error)."""


find_decoder_blocks = decoder_blocks  # the old name (tests and benchmarks import it)


@dataclass
class BlockInputs:
    """Inputs of one decoder block for every calibration batch.

    Attributes:
        hidden_states: one ``[B, T, D]`` tensor per batch.
        kwargs: one dict per batch of the keyword arguments the block is called with. Values are
            tensors, tuples of tensors (e.g. ``position_embeddings = (cos, sin)``) or bool/int/float
            scalars; None values and non-tensor objects (KV caches) are dropped at capture.
    """

    hidden_states: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def __post_init__(self) -> None:
        if len(self.hidden_states) != len(self.kwargs):
            raise ConfigError("kwargs", f"{len(self.kwargs)} kwargs dicts for {len(self.hidden_states)} batches")

    @property
    def num_batches(self) -> int:
        return len(self.hidden_states)

    @property
    def num_samples(self) -> int:
        return sum(int(h.shape[0]) for h in self.hidden_states)

    def with_hidden_states(self, hidden_states: list[torch.Tensor]) -> BlockInputs:
        """Same keyword arguments, new hidden states (the next block's inputs)."""
        return BlockInputs(list(hidden_states), self.kwargs)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flatten into a ``{name: tensor}`` dict (safetensors-ready). Keys:

        - ``hidden_states.{i}``: batch i's hidden states;
        - ``kwargs.{i}.{key}``: a tensor argument;
        - ``kwargs.{i}.{key}#{j}``: element j of a tuple argument;
        - ``kwargs.{i}.{key}@{bool|int|float}``: a scalar argument as a 0-d tensor.
        """
        out: dict[str, torch.Tensor] = {}
        for i, (hs, kw) in enumerate(zip(self.hidden_states, self.kwargs, strict=True)):
            out[f"hidden_states.{i}"] = hs.contiguous()
            for key, value in kw.items():
                base = f"kwargs.{i}.{key}"
                if isinstance(value, torch.Tensor):
                    out[base] = value.contiguous()
                elif isinstance(value, tuple):
                    for j, item in enumerate(value):
                        out[f"{base}#{j}"] = item.contiguous()
                else:
                    tag = type(value).__name__
                    out[f"{base}@{tag}"] = torch.tensor(value)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> BlockInputs:
        """Inverse of :meth:`to_tensors`."""
        n = sum(1 for k in tensors if k.startswith("hidden_states."))
        hidden = [tensors[f"hidden_states.{i}"] for i in range(n)]
        kwargs: list[dict[str, Any]] = [{} for _ in range(n)]
        tuples: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        for key, value in tensors.items():
            if not key.startswith("kwargs."):
                continue
            _, index, name = key.split(".", 2)
            i = int(index)
            if "#" in name:
                arg, j = name.rsplit("#", 1)
                tuples.setdefault((i, arg), {})[int(j)] = value
            elif "@" in name:
                arg, tag = name.rsplit("@", 1)
                kwargs[i][arg] = _SCALAR_TAGS[tag](value.item())
            else:
                kwargs[i][name] = value
        for (i, arg), items in tuples.items():
            kwargs[i][arg] = tuple(items[j] for j in range(len(items)))
        return cls(hidden, kwargs)


def _keep_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The block keyword arguments worth carrying: tensors, tuples of tensors, plain scalars."""
    kept: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            kept[key] = value.detach()
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            kept[key] = tuple(v.detach() for v in value)
        elif isinstance(value, bool | int | float):
            kept[key] = value
    return kept


def capture_block_inputs(model: nn.Module, batches: Iterable[Batch], *, progress: bool = True) -> BlockInputs:
    """Record decoder block 0's inputs for every batch, without running the decoder blocks.

    Token tensors are passed as ``input_ids`` with ``use_cache=False``; dict batches are passed
    as keyword arguments (``use_cache`` defaults to False).
    """
    _, blocks = decoder_blocks(model)
    device = model_device(model)
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def record(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hs = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(hs.detach())
        kwargs_list.append(_keep_kwargs(kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in tqdm(batches, desc="block inputs", unit="batch", disable=not progress):
                kwargs = ({"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch))
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                kwargs.setdefault("use_cache", False)
                try:
                    model(**kwargs)
                except _StopForward:
                    continue
                raise ConfigError("model", "the forward pass finished without calling decoder block 0")
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs_list)


def _call_block(block: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    device = model_device(block)
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor)
                 else tuple(t.to(device) for t in v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    out = block(hidden.to(device), **moved)
    return out[0] if isinstance(out, tuple | list) else out


def calibrate_block(
    block: nn.Module,
    inputs: BlockInputs,
    *,
    hessian: bool = False,
    prefix: str = "",
    layers: LayerSelection = None,
    batch_dtype: torch.dtype = torch.float32,
    dataset: str = "",
) -> CalibrationContext:
    """Statistics of ``block``'s units on ``inputs`` (names are ``prefix + unit name in block``).

    ``layers`` selects within the block (unit names relative to the block, or a filter on them);
    the default is every Linear, Conv1D and fused-expert unit (see :func:`select_units`).
    """
    units = select_units(block, layers)
    ctx = CalibrationContext(dataset)
    handles, cache = attach_unit_hooks(block, units, ctx, hessian=hessian, batch_dtype=batch_dtype, prefix=prefix)
    try:
        with eval_mode(block), torch.no_grad():
            for hs, kw in zip(inputs.hidden_states, inputs.kwargs, strict=True):
                _call_block(block, hs, kw)
                ctx.increment_samples(int(hs.shape[0]))
                cache.clear()
    finally:
        for handle in handles:
            handle.remove()
        cache.clear()
    report_unrouted(ctx, units, prefix)
    return ctx


def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Run ``block`` on every batch of ``inputs``; the result is the next block's inputs."""
    with eval_mode(block), torch.no_grad():
        outs = [_call_block(block, hs, kw).detach()
                for hs, kw in zip(inputs.hidden_states, inputs.kwargs, strict=True)]
    return inputs.with_hidden_states(outs)


__all__ = [
    "BlockInputs",
    "calibrate_block",
    "capture_block_inputs",
    "find_decoder_blocks",
    "run_block",
]
