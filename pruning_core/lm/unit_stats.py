"""Per-unit calibration statistics of streamed blocks: the ``observe`` of :func:`calibrate_blocks`.

Stage: streaming + calibration. :class:`UnitStatistics` attaches the calibration stage's unit
hooks (:func:`pruning_core.calibration.hooks.attach_unit_hooks`: Linear, GPT-2 Conv1D, every fused
MoE expert on the tokens routed to it; float64 sums, optional ``XᵀX``) to each block while
:func:`pruning_core.lm.stream.calibrate_blocks` runs it, and keeps one
:class:`~pruning_core.calibration.CalibrationContext` per block with the whole model's unit
names (``model.layers.3.mlp.up_proj``), exactly as ``collect_activation_stats`` on the full model
would name and fill them.

    stats = UnitStatistics(hessian=True)
    def finish(i, block):
        context = stats.pop(i)                      # the block's statistics, then forgotten
        ...prune block's units with context...
    calibrate_blocks(stream, finish, observe=stats, writer=writer)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pruning_core.calibration.capture import LayerSelection, select_units
from pruning_core.calibration.context import CalibrationContext
from pruning_core.calibration.hooks import PartialsCache, attach_unit_hooks, report_unrouted


@dataclass
class _Observation:
    """The hooks on one block while it runs; removed on exit, when the samples are counted."""

    context: CalibrationContext
    handles: list[Any]
    cache: PartialsCache
    units: list[Any]
    prefix: str
    samples: int

    def __enter__(self) -> _Observation:
        return self

    def after_batch(self) -> None:
        self.cache.clear()

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.cache.clear()
        if exc[0] is None:
            self.context.increment_samples(self.samples)
            report_unrouted(self.context, self.units, self.prefix)


@dataclass
class UnitStatistics:
    """``observe(i, block, inputs)`` collecting per-unit statistics of every streamed block.

    Args:
        hessian: also accumulate ``XᵀX`` per unit (SparseGPT).
        batch_dtype: dtype of each batch's partial sums (added into float64 sums).
        layers: unit selection within a block (names relative to the block, or a filter).
        dataset: name recorded in the contexts.
    """

    hessian: bool = False
    batch_dtype: torch.dtype = torch.float32
    layers: LayerSelection = None
    dataset: str = ""
    contexts: dict[int, CalibrationContext] = field(default_factory=dict)

    def __call__(self, index: int, block: nn.Module, inputs: Any) -> _Observation:
        prefix = f"{inputs.stream.reader.block_prefix}.{index}."
        units = select_units(block, self.layers)
        context = CalibrationContext(self.dataset)
        handles, cache = attach_unit_hooks(block, units, context, hessian=self.hessian,
                                           batch_dtype=self.batch_dtype, prefix=prefix)
        self.contexts[index] = context
        return _Observation(context, handles, cache, units, prefix, inputs.num_samples)

    def pop(self, index: int) -> CalibrationContext:
        """Block ``index``'s statistics, forgotten here (memory stays bounded by one block's)."""
        return self.contexts.pop(index)


__all__ = ["UnitStatistics"]
