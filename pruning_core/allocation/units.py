"""Allocation units and allocations: which weights share one sparsity, and how much each gets.

Stage: allocation (between calibration and pruning). A non-uniform allocation gives each *unit*
its own sparsity: a decoder block (all prunable layers of block ``i``, the OWL paper's
granularity) or a single layer. :class:`Allocation` is the plain, JSON-able result that OWL, the
allocation search and a saved file all produce; pruning reads it through
:meth:`Allocation.layer_sparsities`.

"Average" always means parameter-weighted: ``Σ_u n_u·s_u / Σ_u n_u`` over the units' weight
counts ``n_u``, so the allocation prunes the same number of weights as uniform pruning at the
target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from pruning_core.arch import decoder_blocks
from pruning_core.errors import ConfigError
from pruning_core.pruning.model import target_layers

Granularity = Literal["block", "layer"]
GRANULARITIES: tuple[str, ...] = ("block", "layer")
LayerFilter = Callable[[str, nn.Module], bool]


@dataclass(frozen=True, slots=True)
class AllocationUnit:
    """Weights that share one sparsity.

    Attributes:
        name: ``"model.layers.3"`` (a block) or ``"model.layers.3.mlp.up_proj"`` (a layer).
        layers: qualified names of the unit's prunable layers, in module order.
        sizes: number of weights of each layer (``out * in``).
    """

    name: str
    layers: tuple[str, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.layers or len(self.layers) != len(self.sizes) or min(self.sizes) < 1:
            raise ConfigError("units", f"unit {self.name!r}: {len(self.layers)} layers with sizes {self.sizes}")

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layers": list(self.layers), "sizes": list(self.sizes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AllocationUnit:
        return cls(str(data["name"]), tuple(data["layers"]), tuple(int(s) for s in data["sizes"]))


def check_granularity(granularity: str) -> Granularity:
    """``granularity`` if it is ``"block"`` or ``"layer"``; ConfigError otherwise."""
    if granularity not in GRANULARITIES:
        raise ConfigError("granularity", f"must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    return granularity  # type: ignore[return-value]


def allocation_units(model: nn.Module, granularity: str = "block", *,
                     filter_fn: LayerFilter | None = None) -> list[AllocationUnit]:
    """The units of ``model``'s decoder blocks, in block order.

    Args:
        model: a causal LM whose blocks :func:`pruning_core.arch.decoder_blocks` finds.
        granularity: ``"block"`` (one unit per decoder block) or ``"layer"`` (one per layer).
        filter_fn: ``(qualified name, module) -> bool`` over the blocks' ``nn.Linear`` layers
            (default: all of them, as ``prune_module`` selects).

    Raises:
        ConfigError: unknown granularity, or a model without decoder blocks.
        NoParameters: a block with no selected layer.
    """
    check_granularity(granularity)
    path, blocks = decoder_blocks(model)
    units: list[AllocationUnit] = []
    for i, block in enumerate(blocks):
        layers = target_layers(block, filter_fn, prefix=f"{path}.{i}.")
        sizes = {name: int(module.weight.numel()) for name, module in layers.items()}
        if granularity == "block":
            units.append(AllocationUnit(f"{path}.{i}", tuple(sizes), tuple(sizes.values())))
        else:
            units += [AllocationUnit(name, (name,), (size,)) for name, size in sizes.items()]
    return units


@dataclass(frozen=True)
class Allocation:
    """Per-unit sparsities (fractions pruned) with the target they average to.

    Attributes:
        target: the parameter-weighted mean the allocation was made for.
        units: the units, in order.
        sparsities: one fraction in ``[0, 1)`` per unit.
        source: where it came from (``"uniform"``, ``"owl"``, ``"search"``, ``"file"``).
    """

    target: float
    units: tuple[AllocationUnit, ...]
    sparsities: tuple[float, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.units) != len(self.sparsities) or not self.units:
            raise ConfigError("allocation", f"{len(self.sparsities)} sparsities for {len(self.units)} units")
        bad = [(u.name, s) for u, s in zip(self.units, self.sparsities, strict=True)
               if not (math.isfinite(s) and 0.0 <= s < 1.0)]
        if bad or not (math.isfinite(self.target) and 0.0 <= self.target < 1.0):
            raise ConfigError("allocation", f"sparsities must be finite in [0, 1); target {self.target}, "
                                            f"offending units (first 3): {bad[:3]}")

    @classmethod
    def uniform(cls, units: Sequence[AllocationUnit], target: float) -> Allocation:
        return cls(target, tuple(units), tuple(float(target) for _ in units), "uniform")

    @property
    def num_params(self) -> int:
        return sum(u.num_params for u in self.units)

    @property
    def mean(self) -> float:
        """Parameter-weighted mean sparsity (``math.fsum``, so exact to float64 rounding)."""
        return math.fsum(u.num_params * s for u, s in zip(self.units, self.sparsities, strict=True)) / self.num_params

    def layer_sparsities(self) -> dict[str, float]:
        """``{layer name: its unit's sparsity}`` (before rounding to comparison groups)."""
        return {layer: s for u, s in zip(self.units, self.sparsities, strict=True) for layer in u.layers}

    def check_units(self, units: Sequence[AllocationUnit]) -> None:
        """ConfigError unless ``units`` (e.g. of the model a saved allocation is reused on) are exactly
        this allocation's units: same names, layers and sizes, in order."""
        if tuple(units) != self.units:
            diff = next((f"{a.name} vs {b.name}" for a, b in zip(self.units, units, strict=False) if a != b),
                        f"{len(self.units)} vs {len(units)} units")
            raise ConfigError("allocation", f"made for other units than the model's ({diff})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``from_dict`` inverts it exactly: floats survive JSON round trips)."""
        return {"target": self.target, "source": self.source, "mean": self.mean,
                "units": [u.to_dict() for u in self.units], "sparsities": list(self.sparsities)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        units = tuple(AllocationUnit.from_dict(u) for u in data["units"])
        return cls(float(data["target"]), units, tuple(float(s) for s in data["sparsities"]),
                   str(data.get("source", "file")))


__all__ = ["GRANULARITIES", "Allocation", "AllocationUnit", "Granularity", "allocation_units",
           "check_granularity"]
