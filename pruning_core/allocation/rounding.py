"""Integer rounding of an allocation to the pruners' comparison groups.

Stage: allocation. Mask selection prunes ``k = floor(g·s)`` weights in every comparison group of
``g`` weights (a row of ``in`` weights for Wanda's per-row groups, the whole ``out × in`` layer
for LAYER scope). Pruning at a float allocation directly would therefore fall short of the
target by up to one weight per group, differently per layer. :func:`round_to_groups` instead
chooses one integer ``k_l`` per layer:

1. ``k_l = floor(s_l·g_l)`` (what the selector would do);
2. the shortfall ``D = floor(Σ_l s_l·n_l) − Σ_l r_l·k_l`` (``r_l`` groups per layer) is made up
   by adding 1 to ``k_l`` of the layers with the largest fractional parts ``s_l·g_l − k_l``
   (ties: layer order), each at most once and only while ``r_l <= D``.

The realised count ``Σ r_l·k_l`` is then ``floor(Σ s_l·n_l)`` minus less than the group count
``r_l`` of every layer left unincremented (not all can be: that would exceed the target), i.e.
less than 1,536 weights per SmolLM2 block at per-row scope and 0 at LAYER scope, and every layer
stays within one group step of its allocation. The allocation code rounds each unit on its own
(``apply.layer_targets``, ``database.build_variant``), so unit ``u`` prunes ``floor(s_u·n_u)``
weights up to that slack, and the model's total falls short of ``s·N`` by less than the sum of
the slacks plus one weight per unit (at most 4e-4 of SmolLM2's 106 M decoder weights; uniform
Wanda at 70% per row falls 3e-4 short, as every row rounds down). The returned per-layer fractions are ``k_l / g_l``, which the selectors' rounding
(``validate.num_to_prune``: floor of ``g·s`` rounded to 9 decimals) turns back into ``k_l``
exactly. SparseGPT selects per column block of 128 inputs rather than per layer: its realised
count can fall short of ``k_l`` by less than one weight per column block (at most 12 per
SmolLM2 layer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pruning_core.errors import ConfigError
from pruning_core.masks import MaskScope

Groups = tuple[int, int]  # (number of comparison groups r, weights per group g)


def comparison_groups(shape: tuple[int, ...], scope: MaskScope) -> Groups:
    """``(r, g)`` of a ``[out, in]`` weight: ROW ``(out, in)``; LAYER ``(1, out·in)``.

    Raises:
        ConfigError: GLOBAL scope (one group across layers cannot carry per-layer sparsities).
    """
    out, inp = int(shape[0]), int(math.prod(shape[1:]))
    if scope is MaskScope.ROW:
        return out, inp
    if scope is MaskScope.LAYER:
        return 1, out * inp
    raise ConfigError("scope", f"a non-uniform allocation needs ROW or LAYER comparison groups, got {scope.value}")


def round_to_groups(sparsities: Mapping[str, float], groups: Mapping[str, Groups]) -> dict[str, float]:
    """Per-layer sparsities on each layer's group grid whose total count matches the allocation.

    Args:
        sparsities: ``{layer: s_l}`` fractions in ``[0, 1)``.
        groups: ``{layer: (r_l, g_l)}`` from :func:`comparison_groups`.

    Returns:
        ``{layer: k_l / g_l}`` in the order of ``sparsities`` (see the module docstring).

    Raises:
        ConfigError: a layer without groups, or a sparsity outside ``[0, 1)``.
    """
    missing = [name for name in sparsities if name not in groups]
    if missing:
        raise ConfigError("groups", f"no comparison groups for layers {missing[:3]}")
    bad = [(n, s) for n, s in sparsities.items() if not (math.isfinite(s) and 0.0 <= s < 1.0)]
    if bad:
        raise ConfigError("sparsity", f"must be finite in [0, 1); got {bad[:3]}")
    ideal = {n: s * groups[n][1] for n, s in sparsities.items()}  # pruned weights per group, as a float
    counts = {n: math.floor(round(x, 9)) for n, x in ideal.items()}
    target = math.floor(round(math.fsum(s * groups[n][0] * groups[n][1] for n, s in sparsities.items()), 6))
    deficit = target - sum(groups[n][0] * k for n, k in counts.items())
    order = sorted(counts, key=lambda n: -(ideal[n] - counts[n]))  # stable: ties keep layer order
    for name in order:
        rows, size = groups[name]
        if deficit <= 0:
            break
        if rows <= deficit and counts[name] + 1 < size:
            counts[name] += 1
            deficit -= rows
    return {n: counts[n] / groups[n][1] for n in sparsities}


def realised_count(sparsities: Mapping[str, float], groups: Mapping[str, Groups]) -> int:
    """Weights a floor-per-group selector prunes at ``sparsities`` (``Σ r_l·floor(g_l·s_l)``)."""
    return sum(groups[n][0] * math.floor(round(groups[n][1] * s, 9)) for n, s in sparsities.items())


__all__ = ["Groups", "comparison_groups", "realised_count", "round_to_groups"]
