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
from pruning_core.calibration.hooks import attach_unit_hooks, report_unrouted
from pruning_core.calibration.inputs import InputSample, attach_sample_hooks


@dataclass
class _Hooked:
    """Hooks on one block while it runs: ``cache`` (anything with ``clear()``) is cleared after each
    batch; on exit the hooks are removed and :meth:`finished` runs if the block ran through."""

    handles: list[Any]
    cache: Any

    def __enter__(self) -> _Hooked:
        return self

    def after_batch(self) -> None:
        self.cache.clear()

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.cache.clear()
        if exc[0] is None:
            self.finished()

    def finished(self) -> None:
        """Called once the block ran without error (nothing by default)."""


@dataclass
class _Observation(_Hooked):
    """Statistics hooks: on a clean exit the samples are counted and unrouted experts reported."""

    context: CalibrationContext
    units: list[Any]
    prefix: str
    samples: int

    def finished(self) -> None:
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
        return _Observation(handles, cache, context, units, prefix, inputs.num_samples)

    def pop(self, index: int) -> CalibrationContext:
        """Block ``index``'s statistics, forgotten here (memory stays bounded by one block's)."""
        return self.contexts.pop(index)


@dataclass
class UnitInputs:
    """``observe(i, block, inputs)`` keeping each unit's inputs as an
    :class:`~pruning_core.calibration.inputs.InputSample` (rows or ``XᵀX``, shared between units
    fed the same tensor), for the per-unit output error without a float64 ``XᵀX`` per unit."""

    layers: LayerSelection = None
    samples: dict[int, dict[str, InputSample]] = field(default_factory=dict)

    def __call__(self, index: int, block: nn.Module, inputs: Any) -> _Hooked:
        prefix = f"{inputs.stream.reader.block_prefix}.{index}."
        handles, collector = attach_sample_hooks(block, select_units(block, self.layers), prefix=prefix)
        self.samples[index] = collector.by_unit
        return _Hooked(handles, collector)

    def pop(self, index: int) -> dict[str, InputSample]:
        """Block ``index``'s samples by unit name, forgotten here."""
        return self.samples.pop(index)


@dataclass
class _Together:
    parts: list[Any]

    def __enter__(self) -> _Together:
        for part in self.parts:
            part.__enter__()
        return self

    def after_batch(self) -> None:
        for part in self.parts:
            part.after_batch()

    def __exit__(self, *exc: object) -> None:
        for part in reversed(self.parts):
            part.__exit__(*exc)


def combined(*observers: Any) -> Any:
    """One ``observe`` for :func:`~pruning_core.lm.stream.calibrate_blocks` that runs several
    (e.g. :class:`UnitStatistics` and :class:`UnitInputs`) on the same block run."""

    def observe(index: int, block: nn.Module, inputs: Any) -> _Together:
        return _Together([o(index, block, inputs) for o in observers])

    return observe


__all__ = ["UnitInputs", "UnitStatistics", "combined"]
