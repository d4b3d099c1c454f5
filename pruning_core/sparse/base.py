"""The common base of the sparse formats, the format enum and shared argument checks.

Stage: formats (after masks). A sparse tensor here is always a 2-D matrix ``[rows, cols]`` (an
nn.Linear weight) stored in one of four layouts. Two ways to decide what is stored:

* ``from_dense(dense)``: "nnz by value" - every non-zero value is stored.
* ``from_dense(dense, mask)``: "nnz by mask" - every position the mask keeps is stored, even if
  its value is 0; values at pruned positions are dropped. ``to_dense()`` then returns
  ``dense * mask`` exactly and ``nnz == mask.sum()``.
"""

from __future__ import annotations

import abc
import enum
import warnings
from typing import Any, ClassVar

import torch

from pruning_core.errors import InvalidMask, ShapeMismatch
from pruning_core.masks.mask import SparsityMask

_INT32_MAX = 2**31 - 1


class SparseFormat(enum.Enum):
    """The stored layouts: compressed rows, coordinates, dense blocks, 2:4 compressed."""

    CSR = "csr"
    COO = "coo"
    BLOCK = "block"
    SEMI_STRUCTURED = "semi_structured"


class SparseTensor(abc.ABC):
    """A 2-D sparse matrix: conversion to and from dense, ``self @ x`` and real byte counts."""

    format: ClassVar[SparseFormat]

    @classmethod
    @abc.abstractmethod
    def from_dense(cls, dense: torch.Tensor, mask: Any = None, **kwargs: Any) -> SparseTensor:
        """Build from a 2-D dense tensor; with ``mask``, nnz is by mask, else by value."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """The logical (original) ``(rows, cols)``."""

    @property
    @abc.abstractmethod
    def nnz(self) -> int:
        """Number of structurally stored entries (kept by the mask, or non-zero)."""

    @property
    @abc.abstractmethod
    def values(self) -> torch.Tensor:
        """The stored values (layout depends on the format)."""

    @abc.abstractmethod
    def _arrays(self) -> tuple[torch.Tensor, ...]:
        """Every stored array (values and index metadata), for :attr:`nbytes`."""

    @abc.abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The dense ``[rows, cols]`` matrix (zeros where nothing is stored)."""

    @abc.abstractmethod
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``self @ x`` for a 2-D ``x`` of shape ``[cols, k]`` with matching dtype and device."""

    @abc.abstractmethod
    def to_torch(self) -> torch.Tensor:
        """The equivalent native torch sparse tensor."""

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        """``1 - nnz / (rows * cols)``; 0.0 for an empty matrix."""
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    @property
    def nbytes(self) -> int:
        """Real bytes of every stored array (values and indices, dtype-aware)."""
        return sum(a.numel() * a.element_size() for a in self._arrays())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same matrix stored densely in the values' dtype."""
        return self.numel * self.values.element_size()

    @property
    def memory_savings_ratio(self) -> float:
        """``dense_nbytes / nbytes`` (> 1 means the sparse form is smaller)."""
        return self.dense_nbytes / self.nbytes if self.nbytes else float("inf")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``self @ x`` for a dense ``x`` of shape ``[cols]`` or ``[cols, k]``.

        Returns ``[rows]`` or ``[rows, k]`` in the promoted dtype of the values and ``x``.

        Raises:
            ShapeMismatch: ``x`` is not 1-D/2-D or its first dimension is not ``cols``.
        """
        if x.dim() not in (1, 2) or x.shape[0] != self.shape[1]:
            raise ShapeMismatch(
                f"[{self.shape[1]}] or [{self.shape[1]}, k]", list(x.shape), name="matmul input"
            )
        dtype = torch.promote_types(self.dtype, x.dtype)
        x2 = (x[:, None] if x.dim() == 1 else x).to(device=self.device, dtype=dtype)
        out = self._matmul(x2)
        return out[:, 0] if x.dim() == 1 else out

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={list(self.shape)}, nnz={self.nnz}, "
            f"sparsity={self.sparsity:.4f}, dtype={self.dtype}, nbytes={self.nbytes})"
        )


# --------------------------------------------------------------------- shared checks
def check_dense(dense: torch.Tensor, fmt: str) -> None:
    """A sparse format stores 2-D matrices only: else ShapeMismatch."""
    if not isinstance(dense, torch.Tensor):
        raise TypeError(f"{fmt}: dense must be a torch.Tensor, got {type(dense).__name__}")
    if dense.dim() != 2:
        raise ShapeMismatch(
            [0, 0], list(dense.shape), name=fmt, reason=f"needs a 2-D tensor, got {dense.dim()}-D"
        )


def keep_of(dense: torch.Tensor, mask: Any, fmt: str) -> torch.Tensor:
    """The bool tensor of positions to store: ``mask`` (validated binary) or ``dense != 0``."""
    if mask is None:
        return dense != 0
    keep = mask.tensor if isinstance(mask, SparsityMask) else SparsityMask(mask, name=fmt).tensor
    if keep.shape != dense.shape:
        raise ShapeMismatch(list(dense.shape), list(keep.shape), name=f"{fmt} mask")
    return keep.to(dense.device)


def check_shape(shape: Any, fmt: str) -> tuple[int, int]:
    """``shape`` as a pair of non-negative ints, else ShapeMismatch."""
    try:
        rows, cols = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ShapeMismatch(
            "(rows, cols)", [], name=fmt, reason=f"shape must be 2 integers, got {shape!r}"
        ) from None
    if rows < 0 or cols < 0:
        raise ShapeMismatch("(rows, cols) >= 0", [rows, cols], name=fmt, reason="negative dimension")
    return rows, cols


def as_index(t: Any, what: str, fmt: str) -> torch.Tensor:
    """A 1-D integer tensor (lists are converted), else InvalidMask naming ``what``."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
        t = t.to(torch.int64) if t.numel() == 0 else t  # [] parses as float32
    if t.dtype.is_floating_point or t.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise InvalidMask(f"{what} must be an integer tensor, got {t.dtype}", name=fmt)
    if t.dim() != 1:
        raise InvalidMask(f"{what} must be 1-D, got shape {list(t.shape)}", name=fmt)
    return t


def as_values(t: Any, fmt: str, dim: int = 1) -> torch.Tensor:
    """A floating-point tensor with ``dim`` dimensions (lists are converted to float32)."""
    t = torch.as_tensor(t, dtype=torch.float32) if not isinstance(t, torch.Tensor) else t
    if not t.is_floating_point():
        raise InvalidMask(f"values must be floating point, got {t.dtype}", name=fmt)
    if t.dim() != dim:
        raise InvalidMask(f"values must be {dim}-D, got shape {list(t.shape)}", name=fmt)
    return t


def check_range(idx: torch.Tensor, upper: int, what: str, fmt: str) -> None:
    """Every entry of ``idx`` in ``[0, upper)``, else InvalidMask naming the first bad one."""
    bad = (idx < 0) | (idx >= upper)
    if idx.numel() and bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise InvalidMask(f"{what}[{i}] = {int(idx[i])} is out of range [0, {upper})", name=fmt)


def index_dtype(*bounds: int) -> torch.dtype:
    """int32 when every index (and count) fits, else int64: indices cost half the bytes."""
    return torch.int32 if max(bounds, default=0) <= _INT32_MAX else torch.int64


def quiet_sparse(fn: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Call a torch sparse constructor without its one-time 'beta' UserWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*support is in beta state.*", category=UserWarning)
        return fn(*args, **kwargs)


__all__ = ["SparseFormat", "SparseTensor"]
