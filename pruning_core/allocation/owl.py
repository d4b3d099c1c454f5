"""OWL: Outlier Weighed Layerwise sparsity (Yin et al. 2023, arXiv:2310.05175).

Stage: allocation. For every unit (decoder block, or layer) the *layer-wise outlier
distribution* ``D_u`` is the share of its Wanda scores ``|W_ij|·‖X_j‖₂`` above ``M`` times
their mean (all the unit's layers pooled, as the reference pools a block's layers). Units with
more outliers get lower sparsity: ``S_u ∝ 1 − D_u``, held inside ``[s − λ, s + λ]`` and
averaging exactly ``s`` (parameter-weighted).

The mapping (luuyin/OWL ``prune_wanda_outlier``, llm-compressor ``_infer_owl_layer_sparsity``):
``raw_u = s + λ − 2λ·(D_u − min D)/(max D − min D)`` lies in the band; it is shifted by the
``c`` that makes the weighted mean exactly ``s``. The references shift by the (unweighted) mean
and can leave the band (one outlier-rich block among many gets ``s − 2λ + 2λ/U``); here, when
the plain shift would leave the band, ``c`` is found by bisection on the *clipped* mean
``Σ n_u·clip(raw_u + c) / N``, which is continuous and non-decreasing in ``c`` and goes from
``s − λ`` to ``s + λ``. Degenerate inputs (all ``D_u`` equal, one unit, ``λ = 0``) give the
uniform allocation; the references divide by ``max − min`` there and produce NaN.

The allocation uses Wanda scores whatever method prunes afterwards (Wanda, SparseGPT,
magnitude), as the paper does for SparseGPT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruning_core.allocation.units import Allocation, AllocationUnit
from pruning_core.calibration.context import CalibrationContext
from pruning_core.errors import ConfigError
from pruning_core.importance.wanda import wanda_scores
from pruning_core.validate import check_finite

_BISECTION_STEPS = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class OWLConfig:
    """OWL hyper-parameters (the paper's defaults for LLaMA: M = 5, λ = 0.08).

    Attributes:
        m: outlier threshold, in multiples of the unit's mean score (> 0).
        lam: half-width of the sparsity band around the target (>= 0).
    """

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        if not (math.isfinite(self.m) and self.m > 0):
            raise ConfigError("owl.m", f"must be a finite number > 0, got {self.m}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError("owl.lambda", f"must be a finite number >= 0, got {self.lam}")


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of the pooled ``scores`` strictly above ``m`` times their mean (OWL's ``D``).

    Args:
        scores: the unit's score tensors (any shapes), pooled as one population.
        m: the threshold multiple.

    Returns:
        A fraction in ``[0, 1]`` (the references report it in percent; the scale cancels).
    """
    count = sum(int(s.numel()) for s in scores)
    if count == 0:
        raise ConfigError("scores", "outlier_ratio needs at least one score")
    mean = math.fsum(float(s.double().sum()) for s in scores) / count
    above = sum(int(torch.count_nonzero(s.double() > m * mean)) for s in scores)
    return above / count


def _clipped_mean(raw: torch.Tensor, n: torch.Tensor, shift: float, lo: float, hi: float) -> float:
    return float(((raw + shift).clamp(lo, hi) * n).sum() / n.sum())


def owl_sparsities(ratios: torch.Tensor, sizes: torch.Tensor, sparsity: float, lam: float) -> torch.Tensor:
    """Map outlier ratios to sparsities in ``[s − λ, s + λ]`` with weighted mean exactly ``s``.

    Args:
        ratios: ``[U]`` outlier ratios ``D_u`` (higher = more outliers = less pruning).
        sizes: ``[U]`` weights per unit (the averaging weights).
        sparsity: the target ``s``.
        lam: the band half-width ``λ``; ``s − λ >= 0`` and ``s + λ < 1`` are required.

    Returns:
        ``[U]`` float64 sparsities (uniform ``s`` when the ratios are all equal or ``λ = 0``).

    Raises:
        ConfigError: shapes differ, a size is not positive, or the band leaves ``[0, 1)``.
        NumericalInstability: a NaN/Inf ratio.
    """
    r, n = ratios.detach().double().flatten(), sizes.detach().double().flatten()
    if r.numel() == 0 or r.shape != n.shape or bool((n <= 0).any()):
        raise ConfigError("owl", f"need one positive size per ratio; got {r.numel()} ratios, sizes {n.tolist()[:5]}")
    check_finite(r, method="owl", what="outlier ratio")
    lo, hi = sparsity - lam, sparsity + lam
    if not (0.0 <= lo and hi < 1.0):
        raise ConfigError("owl.lambda", f"the band [{lo:.4f}, {hi:.4f}] (sparsity {sparsity} ± lambda {lam}) "
                                        "must lie in [0, 1)")
    spread = float(r.max() - r.min())
    if lam == 0 or not spread > 0:
        return torch.full_like(r, sparsity)
    raw = sparsity + lam - 2 * lam * (r - r.min()) / spread  # [U], in the band
    shift = sparsity - float((raw * n).sum() / n.sum())
    out = raw + shift
    if float(out.min()) < lo or float(out.max()) > hi:
        low, high = -2 * lam, 2 * lam  # clipped mean: lo at `low`, hi at `high`
        for _ in range(_BISECTION_STEPS):
            mid = (low + high) / 2
            low, high = (mid, high) if _clipped_mean(raw, n, mid, lo, hi) < sparsity else (low, mid)
        out = (raw + (low + high) / 2).clamp(lo, hi)
    check_finite(out, method="owl", what="allocated sparsity")
    return out


def unit_outlier_ratios(model: nn.Module, context: CalibrationContext, units: Sequence[AllocationUnit],
                        m: float, *, prefix: str = "") -> list[float]:
    """OWL's ``D_u`` of every unit from the model's weights and the context's ``Σx²``.

    ``model`` may be one decoder block: ``prefix`` (``"model.layers.3."``) is then stripped from
    the units' layer names to find the block's modules (statistics stay keyed by full names).

    Raises:
        MissingActivationStats: a layer of a unit has no statistics in ``context``.
    """
    ratios = []
    for unit in units:
        scores = [wanda_scores(model.get_submodule(name.removeprefix(prefix)).weight,
                               context.require_stats(name).sum_sq, layer_name=name) for name in unit.layers]
        ratios.append(outlier_ratio(scores, m))
    return ratios


def owl_allocation(model: nn.Module, context: CalibrationContext, units: Sequence[AllocationUnit],
                   sparsity: float, config: OWLConfig = OWLConfig()) -> Allocation:
    """The OWL allocation of ``units`` (from :func:`~pruning_core.allocation.allocation_units`).

    Args:
        model: the dense model (its weights give the Wanda scores).
        context: one-pass activation statistics of the dense model (``collect_activation_stats``).
        units: blocks or layers to allocate.
        sparsity: the target mean.
        config: ``m`` and ``lam``.
    """
    ratios = unit_outlier_ratios(model, context, units, config.m)
    return allocation_from_ratios(units, ratios, sparsity, config.lam)


def allocation_from_ratios(units: Sequence[AllocationUnit], ratios: Sequence[float] | Mapping[str, float],
                           sparsity: float, lam: float) -> Allocation:
    """:func:`owl_sparsities` on precomputed ratios (a list in unit order, or by unit name)."""
    values = [ratios[u.name] for u in units] if isinstance(ratios, Mapping) else list(ratios)
    sizes = torch.tensor([u.num_params for u in units], dtype=torch.float64)
    out = owl_sparsities(torch.tensor(values, dtype=torch.float64), sizes, sparsity, lam)
    return Allocation(float(sparsity), tuple(units), tuple(out.tolist()), "owl")


__all__ = ["OWLConfig", "allocation_from_ratios", "outlier_ratio", "owl_allocation", "owl_sparsities",
           "unit_outlier_ratios"]
