"""SparsitySpec: what to prune (a fraction, a pattern, a comparison scope), validated once.

Stage: masks. Every pruning entry point (``Method.prune_weight``, ``prune_module``,
``prune_sequential``) takes one :class:`SparsitySpec` instead of a ``sparsity, pattern, scope``
trio; the spec is checked when it is built, so nothing downstream re-validates it.

Invariant: a valid spec never prunes a whole comparison group. Hence ``0 <= sparsity < 1`` (and
not so close to 1 that ``floor(n * s)``, rounded at 9 decimals by
:func:`~pruning_core.validate.num_to_prune`, reaches ``n``), and N:M needs ``1 <= N < M`` with
``sparsity == 1 - N/M``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from pruning_core.errors import ConfigError, InvalidSparsity
from pruning_core.masks.pattern import NM, MaskScope, SparsityPattern, Unstructured

# N:M fixes the sparsity at 1 - n/m; a requested value this close to it is taken as that value.
NM_SPARSITY_TOL = 1e-6
_UNSTRUCTURED = Unstructured()  # patterns are frozen value objects, safe as a default


def parse_scope(scope: MaskScope | str) -> MaskScope:
    """A :class:`MaskScope` from itself or its text (``"layer"``, ``"row"``, ``"global"``, any case).

    Raises:
        ConfigError: an unknown scope (the message lists the allowed ones).
    """
    try:
        return MaskScope(scope.lower() if isinstance(scope, str) else scope)
    except ValueError:
        allowed = ", ".join(s.value for s in MaskScope)
        raise ConfigError("scope", f"must be one of {allowed}; got {scope!r}") from None


def parse_pattern(pattern: SparsityPattern | str | None) -> SparsityPattern:
    """A :class:`SparsityPattern` from itself, its text (``"2:4"``) or None (unstructured).

    Raises:
        ConfigError: neither a pattern nor a string. InvalidPattern: see :meth:`SparsityPattern.parse`.
    """
    if pattern is None:
        return _UNSTRUCTURED
    if isinstance(pattern, str):
        return SparsityPattern.parse(pattern)
    if not isinstance(pattern, SparsityPattern):
        raise ConfigError("pattern", f"must be a SparsityPattern or its text (e.g. '2:4'), got {pattern!r}")
    return pattern


@dataclass(frozen=True, slots=True)
class SparsitySpec:
    """A validated pruning target.

    Attributes:
        sparsity: fraction pruned in every comparison group, ``0 <= s < 1`` (N:M: exactly
            ``1 - n/m``; Row/Column/Block: the fraction of rows/columns/blocks).
        pattern: which shapes of zeros are allowed (default unstructured).
        scope: comparison group of an unstructured mask: one threshold per LAYER, per output ROW
            (Wanda) or GLOBAL across all layers. Structured patterns fix their groups: LAYER only.

    Raises:
        InvalidPattern: a malformed pattern, or N:M outside ``1 <= N < M`` (names the pattern).
        InvalidSparsity: a sparsity that is not a number in ``[0, 1)``, that rounds to 1, or that
            contradicts an N:M pattern.
        ConfigError: a scope that is not a :class:`MaskScope`, or a non-LAYER scope with a
            structured pattern.
    """

    sparsity: float
    pattern: SparsityPattern = _UNSTRUCTURED
    scope: MaskScope = MaskScope.LAYER

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, SparsityPattern):
            raise ConfigError("pattern", f"must be a SparsityPattern, got {self.pattern!r}; "
                                         "use SparsitySpec.parse for text forms such as '2:4'")
        self.pattern.check_prunable()
        object.__setattr__(self, "sparsity", _checked_sparsity(self.sparsity, self.pattern))
        if not isinstance(self.scope, MaskScope):
            raise ConfigError("scope", f"must be a MaskScope, got {self.scope!r}; use SparsitySpec.parse for text")
        if self.scope is not MaskScope.LAYER and not isinstance(self.pattern, Unstructured):
            raise ConfigError("scope", f"{self.scope.value} applies to unstructured masks only, not pattern "
                                       f"{self.pattern} (its groups are fixed; use scope layer)")

    @classmethod
    def parse(
        cls,
        sparsity: float | None = None,
        pattern: SparsityPattern | str | None = "unstructured",
        scope: MaskScope | str | None = None,
        *,
        default_scope: MaskScope = MaskScope.LAYER,
    ) -> SparsitySpec:
        """Build a spec from loose values: text forms, an implied N:M sparsity, a default scope.

        Args:
            sparsity: the fraction to prune; None for N:M (implied ``1 - n/m``).
            pattern: a pattern, its text (``"unstructured"``, ``"2:4"``, ``"block:4x4"``, ``"row"``,
                ``"column"``) or None (unstructured).
            scope: a scope or its text; None picks ``default_scope`` for unstructured patterns
                (a method's default, e.g. ROW for Wanda) and LAYER for structured ones.
            default_scope: see ``scope``.

        Raises:
            The errors of :class:`SparsitySpec`; InvalidSparsity when ``sparsity`` is None for a
            pattern that does not imply one; ConfigError for an unknown scope text.
        """
        p = parse_pattern(pattern)
        if sparsity is None:
            p.check_prunable()  # "0:4" reports the pattern, not a derived sparsity of 1.0
            implied = p.theoretical_sparsity()
            if implied is None:
                raise InvalidSparsity(math.nan, f"a sparsity is required for the {p} pattern")
            sparsity = implied
        if scope is None:
            chosen = default_scope if isinstance(p, Unstructured) else MaskScope.LAYER
        else:
            chosen = parse_scope(scope)
        return cls(sparsity, p, chosen)

    def with_sparsity(self, sparsity: float) -> SparsitySpec:
        """The same pattern and scope at another sparsity (non-uniform allocations, e.g. OWL)."""
        return dataclasses.replace(self, sparsity=sparsity)

    def __str__(self) -> str:
        scope = f", scope {self.scope.value}" if isinstance(self.pattern, Unstructured) else ""
        return f"sparsity {self.sparsity:g}, pattern {self.pattern}{scope}"


def _checked_sparsity(value: object, pattern: SparsityPattern) -> float:
    """``value`` as a float if it is a valid sparsity for ``pattern`` (see :class:`SparsitySpec`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidSparsity(math.nan, f"must be a number in [0, 1), got {value!r}")
    s = float(value)
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise InvalidSparsity(s, "must be a finite fraction in [0, 1) (1.0 would prune every weight)")
    if round(s, 9) >= 1.0:  # num_to_prune rounds n*s at 9 decimals: a group of one would lose its weight
        raise InvalidSparsity(s, "rounds to 1.0 at 9 decimals, which would prune every weight of a group")
    if isinstance(pattern, NM):
        implied = 1.0 - pattern.n / pattern.m
        if abs(s - implied) > NM_SPARSITY_TOL:
            raise InvalidSparsity(s, f"N:M = {pattern} fixes the sparsity at {implied:g}; pass {implied:g} or None")
        return implied
    return s


__all__ = ["NM_SPARSITY_TOL", "SparsitySpec", "parse_pattern", "parse_scope"]
