"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): OBS mask selection with reconstruction of the kept weights.

Stage: methods. ``prune_weight`` is :func:`~pruning_core.solvers.sparsegpt_prune` on the layer's
Hessian (``stats.xtx``, the solver is scale invariant; collect with ``hessian=True``): it selects the mask per
block of columns (unstructured) or per group of M inputs (N:M) and *updates the kept weights* to
minimise ``‖WX - ŴX‖²``. ``score`` is the OBS saliency ``w²/[H⁻¹]_jj`` (ranking only). Only
unstructured (scope LAYER) and N:M patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import ConfigError
from pruning_core.importance import obs_saliency
from pruning_core.masks import MaskScope, SparsitySpec
from pruning_core.methods.base import BaseMethod, check_scope, earlier_mask, require_hessian
from pruning_core.solvers import sparsegpt_prune

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SparseGPT(BaseMethod):
    """Options: ``blocksize`` (columns per lazy-update block, 128), ``percdamp`` (relative
    dampening, 0.01), ``dtype`` (solver precision: float32 as the reference, or float64)."""

    name: ClassVar[str] = "sparsegpt"
    needs_stats: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = True
    scopes: ClassVar[frozenset[MaskScope]] = frozenset({MaskScope.LAYER})
    structured_patterns: ClassVar[bool] = False

    blocksize: int = 128
    percdamp: float = 0.01
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize <= 0:
            raise ConfigError("blocksize", f"must be a positive integer, got {self.blocksize!r}")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, int | float) \
                or not 0.0 <= self.percdamp < float("inf"):
            raise ConfigError("percdamp", f"must be a finite number >= 0, got {self.percdamp!r}")
        dtype = _DTYPES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        if dtype not in _DTYPES.values():
            raise ConfigError("dtype", f"must be torch.float32 or torch.float64 (or their names), got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)

    def score(
        self, weight: torch.Tensor, stats: ActivationStats | None = None, *, name: str | None = None
    ) -> torch.Tensor:
        """OBS saliency ``w²/[H⁻¹]_jj`` of the dampened Hessian ``XᵀX / n``, float32 ``[out, in]``."""
        hessian = require_hessian(self.name, stats, name).hessian
        assert hessian is not None
        return obs_saliency(weight, hessian, percdamp=self.percdamp, layer_name=name)

    def prune_weight(
        self,
        weight: torch.Tensor,
        stats: ActivationStats | None,
        spec: SparsitySpec,
        *,
        mask: torch.Tensor | None = None,
        name: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sparsegpt_prune` with the earlier mask (default: the weight's non-zeros) kept pruned.

        Returns:
            ``(new weight, keep)``: the reconstructed weight in ``weight``'s dtype and device
            (solved in ``self.dtype``), exactly 0 where ``keep`` is False.

        Raises:
            ConfigError: a scope other than LAYER. CalibrationRequired: no Hessian.
            InvalidPattern: a pattern other than unstructured or N:M, or one that does not fit.
        """
        check_scope(self, spec, name=name)
        # The solver is invariant to the Hessian's scale (sparsegpt_prune's docstring): XᵀX and
        # XᵀX / n give the same result up to rounding. The sum keeps results bit-identical to the
        # measurements in BENCHMARKS.md.
        xtx = require_hessian(self.name, stats, name).xtx
        prior = earlier_mask(weight, mask, name=name)
        return sparsegpt_prune(weight.detach(), xtx, spec.sparsity, pattern=spec.pattern,
                               blocksize=self.blocksize, percdamp=self.percdamp, name=name, mask=prior,
                               dtype=self.dtype)


__all__ = ["SparseGPT"]
