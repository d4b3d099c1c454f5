"""Per-layer activation statistics (the context that holds them is in ``context.py``).

Stage: calibration. :class:`ActivationStats` keeps *exact* running sums over every calibration
token seen by one layer's input (float64 ``Σx²``, ``Σ|x|``, a token count and, for SparseGPT,
``XᵀX``). Sums, not running means, so the result does not depend on how the tokens were split
into batches, two collections can be merged exactly (:meth:`ActivationStats.merge`), and the
derived statistics (RMS, Wanda's ``‖X_j‖₂``, the Hessian ``XᵀX / n``) are computed once at the end.

Precision: the running sums are float64. Each batch's partial sums (``Σx²``, ``Σ|x|`` and the
product ``XᵀX``) are computed in ``batch_dtype``: float32 by default (torch reduces with pairwise
summation, so a batch's partial sum has a relative error of about 1e-7), or float64 for split
invariance up to float64 rounding. Measured on SmolLM2 (benchmarks/results/scoring.md): float64
partial sums raise the hook overhead from +5.5% to +7.9% of a forward pass, and a float64 ``XᵀX``
costs +63% of a forward pass for a relative difference of 2e-7.
"""

from __future__ import annotations

import math

import torch

from pruning_core.errors import ConfigError, NumericalInstability, ShapeMismatch
from pruning_core.validate import check_finite

ACCUM_DTYPE = torch.float64


class ActivationStats:
    """Exact running sums over the input tokens of one layer.

    Attributes:
        in_features: number of input channels ``D``.
        sum_sq: ``Σ_t x_tj²`` per channel, float64 ``[D]``.
        sum_abs: ``Σ_t |x_tj|`` per channel, float64 ``[D]``.
        count: number of tokens accumulated.
        xtx: ``Σ_t x_t x_tᵀ``, float64 ``[D, D]``, or None when the Hessian is not tracked.
        name: the layer name, used in error messages.
        batch_dtype: dtype of each batch's partial sums (see the module docstring).
    """

    def __init__(
        self,
        in_features: int,
        *,
        hessian: bool = False,
        name: str | None = None,
        device: torch.device | str | None = None,
        batch_dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ConfigError("in_features", f"must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self.name = name
        self.batch_dtype = batch_dtype
        self.count = 0
        self.sum_sq = torch.zeros(in_features, dtype=ACCUM_DTYPE, device=device)
        self.sum_abs = torch.zeros(in_features, dtype=ACCUM_DTYPE, device=device)
        self.xtx: torch.Tensor | None = (
            torch.zeros(in_features, in_features, dtype=ACCUM_DTYPE, device=device) if hessian else None
        )

    # ----------------------------------------------------------------------------- accumulation
    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[tokens, D]``; ShapeMismatch naming the layer on a wrong last dim."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeMismatch(
                [-1, self.in_features], list(x.shape), name=self.name,
                reason=f"activations must be [..., {self.in_features}]",
            )
        return x.reshape(-1, self.in_features)

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` (shape ``[..., in_features]``, e.g. ``[B, T, D]``).

        All leading dimensions are flattened into tokens. An input with no tokens is a no-op.

        Raises:
            ShapeMismatch: the last dimension is not ``in_features``.
            NumericalInstability: ``x`` holds NaN/Inf (names the layer and the first bad index).
        """
        tokens = self._flatten(x)
        if tokens.shape[0] == 0:
            return
        self.add_partial(*batch_partials(tokens, hessian=self.xtx is not None, batch_dtype=self.batch_dtype),
                         source=x)

    def add_partial(
        self,
        sum_sq: torch.Tensor,
        sum_abs: torch.Tensor,
        count: int,
        xtx: torch.Tensor | None = None,
        *,
        source: torch.Tensor | None = None,
    ) -> None:
        """Add one batch's precomputed partial sums (see :func:`batch_partials`).

        Used by the hook collector to compute the partial sums once for several layers that read
        the very same input tensor. ``source`` (the raw batch) is only used to locate the first
        bad element when the partial sums are not finite.
        """
        if not math.isfinite(float(sum_sq.sum(dtype=ACCUM_DTYPE))):
            # One reduction checks everything: a NaN/Inf anywhere in the batch makes Σx²
            # non-finite. (So does a float32 Σx² overflowing, for |x| > ~1e19: reported below.)
            check_finite(source if source is not None else sum_sq, method="calibration",
                         what="activation", layer=self.name)
            raise NumericalInstability(
                "calibration", f"activation sums overflow {self.batch_dtype} (|x| too large for it); "
                               "collect with batch_dtype=torch.float64", layer=self.name)
        self.sum_sq += sum_sq.to(self.sum_sq.device, ACCUM_DTYPE)
        self.sum_abs += sum_abs.to(self.sum_abs.device, ACCUM_DTYPE)
        self.count += int(count)
        if self.xtx is not None:
            if xtx is None:
                raise ConfigError("xtx", f"layer '{self.name}' tracks XᵀX but the batch brought none")
            self.xtx += xtx.to(self.xtx.device, ACCUM_DTYPE)

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Return a new ActivationStats holding the exact sum of ``self`` and ``other``."""
        if other.in_features != self.in_features:
            raise ShapeMismatch([self.in_features], [other.in_features], name=self.name,
                                reason="cannot merge statistics of different widths")
        if (self.xtx is None) != (other.xtx is None):
            raise ConfigError("xtx", f"layer '{self.name}': cannot merge statistics with and without XᵀX")
        xtx = None if self.xtx is None or other.xtx is None else self.xtx + other.xtx.to(self.xtx.device)
        return ActivationStats.from_arrays(
            self.sum_sq + other.sum_sq.to(self.sum_sq.device),
            self.sum_abs + other.sum_abs.to(self.sum_abs.device),
            self.count + other.count, xtx, name=self.name,
        )

    # ----------------------------------------------------------------------------- derived values
    def _mean(self, total: torch.Tensor) -> torch.Tensor:
        return total / self.count if self.count else torch.zeros_like(total)

    @property
    def squared_mean(self) -> torch.Tensor:
        """``E[x²]`` per channel, float64 ``[D]`` (zeros before any token)."""
        return self._mean(self.sum_sq)

    @property
    def rms(self) -> torch.Tensor:
        """Root mean square ``sqrt(E[x²])`` per channel, float64 ``[D]``."""
        return self.squared_mean.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        """``E[|x|]`` per channel, float64 ``[D]``."""
        return self._mean(self.sum_abs)

    @property
    def input_norms(self) -> torch.Tensor:
        """``‖X_j‖₂ = sqrt(Σ_t x_tj²)`` over all tokens, float64 ``[D]`` (Wanda's activation norm)."""
        return self.sum_sq.sqrt()

    @property
    def hessian(self) -> torch.Tensor | None:
        """``XᵀX / count``, float64 ``[D, D]``, or None if XᵀX is not tracked.

        The SparseGPT reference uses ``2/n · XᵀX``; with relative damping the solver is invariant
        to this scale, so the plain mean is used.
        """
        if self.xtx is None:
            return None
        return self._mean(self.xtx)

    @property
    def has_hessian(self) -> bool:
        return self.xtx is not None

    # ----------------------------------------------------------------------------- (de)serialization
    @classmethod
    def from_arrays(
        cls,
        sum_sq: torch.Tensor,
        sum_abs: torch.Tensor,
        count: int,
        xtx: torch.Tensor | None = None,
        *,
        name: str | None = None,
    ) -> ActivationStats:
        """Rebuild statistics from stored sums (inverse of :meth:`to_arrays`); validates shapes and values."""
        sum_sq = torch.as_tensor(sum_sq).to(ACCUM_DTYPE)
        sum_abs = torch.as_tensor(sum_abs).to(ACCUM_DTYPE)
        if sum_sq.dim() != 1 or sum_abs.shape != sum_sq.shape:
            raise ShapeMismatch(list(sum_sq.shape), list(sum_abs.shape), name=name,
                                reason="sum_sq and sum_abs must be equal-length vectors")
        if int(count) < 0:
            raise ConfigError("count", f"layer '{name}': token count must be >= 0, got {count}")
        stats = cls(sum_sq.shape[0], name=name, device=sum_sq.device)
        for what, t in (("sum_sq", sum_sq), ("sum_abs", sum_abs)):
            check_finite(t, method="calibration", what=what, layer=name)
            if bool((t < 0).any()):
                raise NumericalInstability("calibration", f"negative value in {what}", layer=name)
        stats.sum_sq, stats.sum_abs, stats.count = sum_sq.clone(), sum_abs.clone(), int(count)
        if xtx is not None:
            xtx = torch.as_tensor(xtx).to(ACCUM_DTYPE)
            if list(xtx.shape) != [stats.in_features] * 2:
                raise ShapeMismatch([stats.in_features] * 2, list(xtx.shape), name=name, reason="XᵀX")
            check_finite(xtx, method="calibration", what="XᵀX", layer=name)
            stats.xtx = xtx.clone()
        return stats

    def to_arrays(self) -> dict[str, torch.Tensor | int | None]:
        """The raw sums: ``{"sum_sq", "sum_abs", "count", "xtx"}`` (xtx may be None)."""
        return {"sum_sq": self.sum_sq, "sum_abs": self.sum_abs, "count": self.count, "xtx": self.xtx}

    def to(self, device: torch.device | str) -> ActivationStats:
        """A copy on ``device``."""
        return ActivationStats.from_arrays(
            self.sum_sq.to(device), self.sum_abs.to(device), self.count,
            None if self.xtx is None else self.xtx.to(device), name=self.name,
        )

    def __repr__(self) -> str:
        return (f"ActivationStats(name={self.name!r}, in_features={self.in_features}, count={self.count}, "
                f"hessian={self.xtx is not None})")


def batch_partials(
    tokens: torch.Tensor, *, hessian: bool, batch_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """Partial sums of one batch of tokens ``[N, D]``: ``(Σx², Σ|x|, N, XᵀX or None)``.

    Computed in ``batch_dtype`` (the caller adds them into float64 running sums).
    """
    x = tokens.detach().to(batch_dtype)
    sum_sq = x.square().sum(dim=0)
    sum_abs = x.abs().sum(dim=0)
    xtx = x.T @ x if hessian else None  # (D, D)
    return sum_sq, sum_abs, tokens.shape[0], xtx


__all__ = ["ACCUM_DTYPE", "ActivationStats", "batch_partials"]
