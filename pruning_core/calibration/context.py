"""The calibration context: per-layer activation (and gradient) statistics by layer name.

Stage: calibration. A :class:`CalibrationContext` is what scoring reads: ``require_stats(name)``
for activation statistics, ``require_gradients(name)`` for Taylor gradients, plus the number of
calibration samples (sequences) and the dataset name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import ConfigError, MissingActivationStats

if TYPE_CHECKING:
    from pruning_core.calibration.gradients import GradientStats


class CalibrationContext:
    """Per-layer calibration statistics by layer name, plus the sample count and dataset name.

    Also holds per-layer gradient statistics (:class:`~pruning_core.calibration.gradients.GradientStats`)
    for first-order Taylor importance.
    """

    def __init__(self, dataset: str = "") -> None:
        self.dataset = dataset
        self.num_samples = 0
        self.activation_stats: dict[str, ActivationStats] = {}
        self.gradient_stats: dict[str, GradientStats] = {}

    def add_layer_stats(self, name: str, stats: ActivationStats) -> None:
        """Insert (or replace) the statistics of layer ``name``."""
        if stats.name is None:
            stats.name = name
        self.activation_stats[name] = stats

    def get_stats(self, name: str) -> ActivationStats | None:
        return self.activation_stats.get(name)

    def require_stats(self, name: str) -> ActivationStats:
        """The statistics of ``name``; MissingActivationStats (listing the available layers) if absent."""
        stats = self.activation_stats.get(name)
        if stats is None:
            raise MissingActivationStats(name, available=self.layer_names())
        return stats

    def has_stats(self, name: str) -> bool:
        return name in self.activation_stats

    def empty_layers(self) -> list[str]:
        """Names of the layers whose statistics saw no token (e.g. MoE experts no token was routed to)."""
        return [name for name, stats in self.activation_stats.items() if stats.count == 0]

    def layer_names(self) -> list[str]:
        """Names of the layers with activation statistics, in insertion order."""
        return list(self.activation_stats)

    def add_gradient_stats(self, name: str, grads: GradientStats) -> None:
        """Insert (or replace) the accumulated gradients of layer ``name``."""
        self.gradient_stats[name] = grads

    def require_gradients(self, name: str) -> GradientStats:
        """The gradients of ``name``; MissingActivationStats (listing the layers that have them) if absent."""
        grads = self.gradient_stats.get(name)
        if grads is None:
            raise MissingActivationStats(name, available=list(self.gradient_stats))
        return grads

    def has_gradients(self, name: str) -> bool:
        return name in self.gradient_stats

    def increment_samples(self, n: int) -> None:
        """Add ``n`` calibration samples (sequences) to :attr:`num_samples`."""
        if n < 0:
            raise ConfigError("num_samples", f"cannot add a negative number of samples ({n})")
        self.num_samples += int(n)

    def merge(self, other: CalibrationContext) -> CalibrationContext:
        """A new context with the exact sum of both (layers present in one only are copied)."""
        out = CalibrationContext(self.dataset or other.dataset)
        out.num_samples = self.num_samples + other.num_samples
        for name in dict.fromkeys([*self.layer_names(), *other.layer_names()]):
            a, b = self.get_stats(name), other.get_stats(name)
            if a is not None and b is not None:
                out.add_layer_stats(name, a.merge(b))
            else:
                only = a if a is not None else b
                assert only is not None
                out.add_layer_stats(name, only.to(only.sum_sq.device))  # a copy
        for name in dict.fromkeys([*self.gradient_stats, *other.gradient_stats]):
            ga, gb = self.gradient_stats.get(name), other.gradient_stats.get(name)
            if ga is not None and gb is not None:
                out.add_gradient_stats(name, ga.merge(gb))
            else:
                only_g = ga if ga is not None else gb
                assert only_g is not None
                out.add_gradient_stats(name, only_g.copy())
        return out

    def __iter__(self) -> Iterator[tuple[str, ActivationStats]]:
        return iter(self.activation_stats.items())

    def __len__(self) -> int:
        return len(self.activation_stats)

    def __repr__(self) -> str:
        return (f"CalibrationContext(dataset={self.dataset!r}, num_samples={self.num_samples}, "
                f"layers={len(self.activation_stats)}, gradients={len(self.gradient_stats)})")


def merge_contexts(contexts: Iterable[CalibrationContext]) -> CalibrationContext:
    """Exact sum of several contexts (e.g. one per worker)."""
    result = CalibrationContext()
    for ctx in contexts:
        result = result.merge(ctx)
    return result


__all__ = ["CalibrationContext", "merge_contexts"]
