"""SparsityMask: a validated, immutable boolean keep-mask (True = keep) with its pattern.

Stage: masks. Generators in :mod:`pruning_core.masks.generate` build these; pruners apply them;
iterative pruning combines them with ``&`` so that a weight pruned once stays pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pruning_core.errors import InvalidMask, ShapeMismatch
from pruning_core.masks.pattern import NM, SparsityPattern, Unstructured

_BINARY_TOL = 1e-6
_UNSTRUCTURED = Unstructured()  # patterns are frozen value objects, safe as a default


def _to_bool(mask: Any, name: str | None) -> torch.Tensor:
    """A fresh bool copy of ``mask``: bool tensors, or 0/1 numeric values (within 1e-6)."""
    t = (mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)).detach()
    if t.dtype == torch.bool:
        return t.clone()
    if t.is_complex():
        raise InvalidMask(f"mask must be real, got {t.dtype}", name=name)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    ones = (t - 1).abs() <= _BINARY_TOL
    binary = ones | (t.abs() <= _BINARY_TOL)  # NaN fails both tests
    if not bool(binary.all()):
        flat = int(torch.nonzero(~binary.reshape(-1))[0, 0])
        index = [int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape)] if t.dim() else []
        raise InvalidMask(f"non-binary value {float(t.reshape(-1)[flat])} at index {index}", name=name)
    return ones


class SparsityMask:
    """A boolean keep-mask with its :class:`SparsityPattern`; True keeps, False prunes.

    Construction copies the input and validates it: values must be bool or within 1e-6 of 0 or
    1 (else :class:`InvalidMask` "non-binary value v"), and the mask must satisfy ``pattern``
    (else :class:`InvalidPattern` / :class:`ShapeMismatch`). Attributes cannot be reassigned.

    ``.tensor`` returns the internal bool tensor without a copy (no O(n) cost on hot paths):
    treat it as read-only. Mutating it in place breaks the pattern and the cached counts.

    Args:
        mask: bool tensor, or 0/1 numeric tensor / nested sequence.
        pattern: the pattern the mask satisfies (default unstructured).
        name: layer name used in error messages.
    """

    __slots__ = ("_mask", "_name", "_nnz", "_pattern")

    def __init__(
        self, mask: Any, pattern: SparsityPattern = _UNSTRUCTURED, *, name: str | None = None
    ) -> None:
        if not isinstance(pattern, SparsityPattern):
            raise TypeError(f"pattern must be a SparsityPattern, got {type(pattern).__name__}")
        tensor = _to_bool(mask, name)
        pattern.validate(tensor, name=name)
        self._init(tensor, pattern, name)

    def _init(self, tensor: torch.Tensor, pattern: SparsityPattern, name: str | None) -> None:
        object.__setattr__(self, "_mask", tensor)
        object.__setattr__(self, "_pattern", pattern)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_nnz", None)

    @classmethod
    def _trusted(cls, keep: torch.Tensor, pattern: SparsityPattern, name: str | None = None) -> SparsityMask:
        """Wrap a freshly computed bool tensor that satisfies ``pattern`` by construction.

        No copy and no validation: for the generators, whose output is property-tested.
        """
        obj = cls.__new__(cls)
        obj._init(keep, pattern, name)
        return obj

    @classmethod
    def from_keep(cls, keep: torch.Tensor, pattern: SparsityPattern, *, name: str | None = None) -> SparsityMask:
        """Wrap a bool keep tensor (no copy) with ``pattern`` if it satisfies it, else as unstructured.

        For the result of a pruning step: a new mask ANDed with an earlier one keeps an N:M
        pattern, and a Row/Column/Block pattern only while its groups stay uniform.
        """
        if keep.dtype != torch.bool:
            raise InvalidMask(f"keep tensor must be torch.bool, got {keep.dtype}", name=name)
        if not isinstance(pattern, Unstructured):
            try:
                pattern.validate(keep, name=name)
            except ValueError:
                pattern = _UNSTRUCTURED
        return cls._trusted(keep, pattern, name)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"SparsityMask is immutable; cannot set {key!r}")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"SparsityMask is immutable; cannot delete {key!r}")

    @classmethod
    def dense(
        cls, shape: Sequence[int], *, name: str | None = None, device: torch.device | str | None = None
    ) -> SparsityMask:
        """An all-keep (sparsity 0) unstructured mask of ``shape``."""
        return cls._trusted(torch.ones(tuple(shape), dtype=torch.bool, device=device), Unstructured(), name)

    # ----------------------------------------------------------------- properties
    @property
    def tensor(self) -> torch.Tensor:
        """The bool keep-tensor itself (no copy). Read-only by contract: never mutate it."""
        return self._mask

    @property
    def pattern(self) -> SparsityPattern:
        return self._pattern

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def shape(self) -> torch.Size:
        return self._mask.shape

    @property
    def device(self) -> torch.device:
        return self._mask.device

    @property
    def numel(self) -> int:
        return self._mask.numel()

    @property
    def nnz(self) -> int:
        """Number of kept elements (cached after the first call)."""
        if self._nnz is None:
            object.__setattr__(self, "_nnz", int(torch.count_nonzero(self._mask)))
        return self._nnz

    @property
    def num_zeros(self) -> int:
        """Number of pruned elements."""
        return self.numel - self.nnz

    @property
    def sparsity(self) -> float:
        """Fraction pruned (0.0 for an empty mask)."""
        return self.num_zeros / self.numel if self.numel else 0.0

    @property
    def density(self) -> float:
        """Fraction kept, ``1 - sparsity``."""
        return 1.0 - self.sparsity

    # ----------------------------------------------------------------- operations
    def _check_shape(self, other_shape: Sequence[int]) -> None:
        if tuple(other_shape) != tuple(self.shape):
            raise ShapeMismatch(list(self.shape), list(other_shape), name=self._name)

    def _on(self, device: torch.device) -> torch.Tensor:
        return self._mask if self._mask.device == device else self._mask.to(device)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """Return ``weight`` with pruned positions set to exactly 0 (out of place).

        Gradients flow to kept positions only. Pruned Inf/NaN weights become 0 (no ``inf * 0``).

        Raises:
            ShapeMismatch: ``weight.shape != mask.shape`` (expected = mask shape).
        """
        self._check_shape(weight.shape)
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
        return torch.where(self._on(weight.device), weight, zero)

    def apply_(self, weight: torch.Tensor) -> torch.Tensor:
        """Zero the pruned positions of ``weight`` in place (works on an ``nn.Parameter``)."""
        self._check_shape(weight.shape)
        with torch.no_grad():
            weight.masked_fill_(~self._on(weight.device), 0)
        return weight

    def combine(self, other: SparsityMask | torch.Tensor) -> SparsityMask:
        """Keep only what both masks keep (logical AND): iterative pruning stays monotone.

        The result keeps the stricter pattern that it still satisfies: an N:M pattern always
        survives an AND (it bounds the kept count per group from above); Row/Column/Block
        survive when the result is still uniform; otherwise the result is unstructured.
        """
        if not isinstance(other, SparsityMask):
            other = SparsityMask(other, name=self._name)
        self._check_shape(other.shape)
        keep = self._mask & other._on(self.device)
        pattern = _combined_pattern(self._pattern, other.pattern, keep)
        return SparsityMask._trusted(keep, pattern, self._name or other.name)

    def __and__(self, other: SparsityMask | torch.Tensor) -> SparsityMask:
        return self.combine(other)

    def is_subset_of(self, other: SparsityMask | torch.Tensor) -> bool:
        """True if every position this mask keeps is also kept by ``other``."""
        if not isinstance(other, SparsityMask):
            other = SparsityMask(other, name=self._name)
        self._check_shape(other.shape)
        return not bool((self._mask & ~other._on(self.device)).any())

    def to(self, device: torch.device | str) -> SparsityMask:
        """The same mask on ``device`` (self if already there)."""
        device = torch.device(device)
        if self._mask.device == device:
            return self
        return SparsityMask._trusted(self._mask.to(device), self._pattern, self._name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparsityMask):
            return NotImplemented
        return (
            self.shape == other.shape
            and self._pattern == other.pattern
            and bool(torch.equal(self._mask, other._on(self.device)))
        )

    __hash__ = None  # type: ignore[assignment]  # holds a tensor; equality is by value

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickling (Dask, Prefect results) must not go through the blocked __setattr__.
        return (_rebuild, (self._mask, self._pattern, self._name))

    def __repr__(self) -> str:
        name = f"name={self._name!r}, " if self._name else ""
        return (
            f"SparsityMask({name}shape={list(self.shape)}, pattern={self._pattern}, "
            f"sparsity={self.sparsity:.4f})"
        )


def _rebuild(tensor: torch.Tensor, pattern: SparsityPattern, name: str | None) -> SparsityMask:
    return SparsityMask._trusted(tensor, pattern, name)


def _combined_pattern(a: SparsityPattern, b: SparsityPattern, keep: torch.Tensor) -> SparsityPattern:
    """The strictest of ``a``/``b`` that ``keep`` (= mask_a & mask_b) satisfies."""
    for p in (a, b):
        if isinstance(p, NM):
            return p
    if a == b:
        return a  # Row & Row, Column & Column, same-size Block & Block stay uniform
    for p in (a, b):
        if isinstance(p, Unstructured):
            continue
        try:
            p.validate(keep)
        except ValueError:
            continue
        return p
    return Unstructured()


__all__ = ["SparsityMask"]
