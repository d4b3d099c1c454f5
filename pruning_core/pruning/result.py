"""PruningResult: what a pruning pass did, per layer and in total, with real sparse-format bytes.

Stage: apply. Counts are by mask (a weight pruned by the mask counts as pruned; a kept weight
that happens to be 0 does not). Memory savings are measured by storing each pruned weight in a
real sparse format from :mod:`pruning_core.sparse` (CSR for unstructured masks, the 2:4
compressed format for 2:4, block-sparse for block masks) and comparing its bytes with the dense
weight's; at low sparsity CSR's indices can cost more than they save (a negative saving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pruning_core.masks import NM, Block, SparsityMask
from pruning_core.sparse import SparseFormat, sparsify


@dataclass
class PruningResult:
    """Outcome of pruning one layer or a whole model.

    Attributes:
        achieved_sparsity: pruned / total over the targeted weights (by mask).
        parameters_pruned: number of weights the masks prune.
        total_parameters: number of targeted weights.
        layer_sparsity: layer name -> fraction pruned.
        memory_savings_bytes: dense bytes minus sparse-format bytes, summed over layers.
        layer_error: layer name -> relative output reconstruction error (when ``XᵀX`` was known).
        masks: layer name -> the final keep mask (combined with any earlier mask).
    """

    achieved_sparsity: float = 0.0
    parameters_pruned: int = 0
    total_parameters: int = 0
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    memory_savings_bytes: int = 0
    layer_error: dict[str, float] = field(default_factory=dict)
    masks: dict[str, SparsityMask] = field(default_factory=dict, repr=False)

    def compression_ratio(self) -> float:
        """``1 / (1 - achieved_sparsity)``; ``inf`` when nothing is targeted or everything is pruned."""
        if self.total_parameters == 0 or self.achieved_sparsity >= 1.0:
            return math.inf
        return 1.0 / (1.0 - self.achieved_sparsity)

    def with_layer_sparsity(self, name: str, sparsity: float) -> PruningResult:
        """Record one layer's sparsity (a chainable builder); returns self."""
        self.layer_sparsity[name] = sparsity
        return self

    @classmethod
    def for_layer(cls, name: str, weight: torch.Tensor, mask: SparsityMask, *,
                  measure_memory: bool = True, error: float | None = None) -> PruningResult:
        """The result of pruning one weight with ``mask`` (already applied to ``weight``)."""
        pruned, total = mask.num_zeros, mask.numel
        saved = sparse_savings_bytes(weight, mask) if measure_memory else 0
        return cls(
            achieved_sparsity=pruned / total if total else 0.0,
            parameters_pruned=pruned, total_parameters=total,
            layer_sparsity={name: pruned / total if total else 0.0},
            memory_savings_bytes=saved,
            layer_error={} if error is None else {name: error},
            masks={name: mask},
        )

    @classmethod
    def merge(cls, results: list[PruningResult]) -> PruningResult:
        """Sum several results (e.g. one per layer or per decoder block)."""
        out = cls()
        for r in results:
            out.parameters_pruned += r.parameters_pruned
            out.total_parameters += r.total_parameters
            out.memory_savings_bytes += r.memory_savings_bytes
            out.layer_sparsity.update(r.layer_sparsity)
            out.layer_error.update(r.layer_error)
            out.masks.update(r.masks)
        out.achieved_sparsity = out.parameters_pruned / out.total_parameters if out.total_parameters else 0.0
        return out


def sparse_format_for(mask: SparsityMask) -> SparseFormat:
    """The format a pruned weight would be stored in: 2:4 compressed, block-sparse or CSR."""
    pattern = mask.pattern
    if isinstance(pattern, NM) and (pattern.n, pattern.m) == (2, 4):
        return SparseFormat.SEMI_STRUCTURED
    if isinstance(pattern, Block):
        return SparseFormat.BLOCK
    return SparseFormat.CSR


def sparse_savings_bytes(weight: torch.Tensor, mask: SparsityMask) -> int:
    """Dense bytes of ``weight`` minus its bytes in :func:`sparse_format_for` ``(mask)``.

    Non-2-D weights are viewed as ``[-1, last dim]`` (and stored as CSR).
    """
    w = weight.detach()
    if w.dim() == 2:
        sparse = sparsify(w, mask, sparse_format_for(mask))  # the mask carries a Block pattern's size
    else:
        width = w.shape[-1] if w.dim() else 1
        sparse = sparsify(w.reshape(-1, width), mask.tensor.reshape(-1, width), SparseFormat.CSR)
    return int(w.numel() * w.element_size() - sparse.nbytes)


__all__ = ["PruningResult", "sparse_format_for", "sparse_savings_bytes"]
