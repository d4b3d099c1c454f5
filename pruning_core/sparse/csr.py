"""CSR (compressed sparse row) and COO (coordinate) matrices.

Stage: formats. Both store indices as int32 when every index fits (half the bytes of int64).
``matmul`` runs torch's native sparse kernels (MKL sparse BLAS on CPU), never a dense product.
"""

from __future__ import annotations

from typing import Any

import torch

from pruning_core.errors import InvalidMask
from pruning_core.sparse.base import (
    SparseFormat,
    SparseTensor,
    as_index,
    as_values,
    check_dense,
    check_range,
    check_shape,
    index_dtype,
    keep_of,
    quiet_sparse,
)


class CSRTensor(SparseTensor):
    """Compressed sparse rows: ``values[nnz]``, ``col_indices[nnz]``, ``row_ptrs[rows + 1]``.

    Row ``r`` holds ``values[row_ptrs[r]:row_ptrs[r+1]]`` at the listed columns.

    Raises (constructor), all :class:`InvalidMask` naming the array and the numbers:
        values/col_indices of different lengths; ``row_ptrs`` not of length ``rows + 1``, not
        starting at 0, not ending at nnz, or decreasing; a column outside ``[0, cols)``; columns
        not strictly increasing (sorted and unique) within a row. A bad ``shape``:
        :class:`ShapeMismatch`.
    """

    format = SparseFormat.CSR

    def __init__(self, values: Any, col_indices: Any, row_ptrs: Any, shape: Any) -> None:
        rows, cols = check_shape(shape, "CSR")
        values = as_values(values, "CSR")
        col_indices = as_index(col_indices, "col_indices", "CSR")
        row_ptrs = as_index(row_ptrs, "row_ptrs", "CSR")
        nnz = values.numel()
        if col_indices.numel() != nnz:
            raise InvalidMask(f"{nnz} values but {col_indices.numel()} column indices", name="CSR")
        _check_row_ptrs(row_ptrs, rows, nnz)
        check_range(col_indices, cols, "col_indices", "CSR")
        _check_sorted_rows(col_indices, row_ptrs)
        idx = index_dtype(rows, cols, nnz)
        self._init(values, col_indices.to(idx), row_ptrs.to(idx), (rows, cols))

    def _init(
        self, values: torch.Tensor, cols: torch.Tensor, ptrs: torch.Tensor, shape: tuple[int, int]
    ) -> None:
        self._values, self._cols, self._ptrs, self._shape = values, cols, ptrs, shape
        self._torch: torch.Tensor | None = None

    @classmethod
    def _trusted(
        cls, values: torch.Tensor, cols: torch.Tensor, ptrs: torch.Tensor, shape: tuple[int, int]
    ) -> CSRTensor:
        obj = cls.__new__(cls)
        obj._init(values, cols, ptrs, shape)
        return obj

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: Any = None, **kwargs: Any) -> CSRTensor:
        """Store the non-zeros of ``dense`` [rows, cols], or every position ``mask`` keeps."""
        check_dense(dense, "CSR")
        keep = keep_of(dense, mask, "CSR")
        rows, cols = torch.nonzero(keep, as_tuple=True)  # row-major, so sorted within rows
        counts = torch.bincount(rows, minlength=dense.shape[0])
        ptrs = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        idx = index_dtype(*dense.shape, rows.numel())
        return cls._trusted(dense[rows, cols], cols.to(idx), ptrs.to(idx), (dense.shape[0], dense.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def nnz(self) -> int:
        return self._values.numel()

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @property
    def col_indices(self) -> torch.Tensor:
        return self._cols

    @property
    def row_ptrs(self) -> torch.Tensor:
        return self._ptrs

    def _arrays(self) -> tuple[torch.Tensor, ...]:
        return (self._values, self._cols, self._ptrs)

    def row_indices(self) -> torch.Tensor:
        """The row of every stored entry, int64 ``[nnz]`` (expanded from ``row_ptrs``)."""
        counts = (self._ptrs[1:] - self._ptrs[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(self._shape[0], device=self.device), counts)

    def to_dense(self) -> torch.Tensor:
        dense = self._values.new_zeros(self._shape)
        dense[self.row_indices(), self._cols.to(torch.int64)] = self._values
        return dense

    def get(self, row: int, col: int) -> float:
        """The value at ``(row, col)``, 0.0 if not stored. Out of bounds -> IndexError."""
        if not (0 <= row < self._shape[0] and 0 <= col < self._shape[1]):
            raise IndexError(f"({row}, {col}) is outside the {self._shape[0]}x{self._shape[1]} matrix")
        lo, hi = int(self._ptrs[row]), int(self._ptrs[row + 1])
        cols = self._cols[lo:hi]
        pos = int(torch.searchsorted(cols, torch.tensor(col, dtype=cols.dtype, device=cols.device)))
        return float(self._values[lo + pos]) if pos < hi - lo and int(cols[pos]) == col else 0.0

    def to_torch(self) -> torch.Tensor:
        """A ``torch.sparse_csr`` tensor sharing this tensor's arrays."""
        if self._torch is None:
            self._torch = quiet_sparse(
                torch.sparse_csr_tensor,
                self._ptrs,
                self._cols,
                self._values,
                self._shape,
                check_invariants=False,
            )
        return self._torch

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        a = self.to_torch() if self.dtype == x.dtype else self.to_torch().to(x.dtype)
        return a @ x

    def to_coo(self) -> COOTensor:
        return COOTensor._trusted(
            self._values, self.row_indices().to(self._cols.dtype), self._cols, self._shape
        )


def _check_row_ptrs(ptrs: torch.Tensor, rows: int, nnz: int) -> None:
    if ptrs.numel() != rows + 1:
        raise InvalidMask(f"row_ptrs has length {ptrs.numel()}, expected rows + 1 = {rows + 1}", name="CSR")
    if int(ptrs[0]) != 0 or int(ptrs[-1]) != nnz:
        raise InvalidMask(
            f"row_ptrs must start at 0 and end at nnz={nnz}, got {int(ptrs[0])}..{int(ptrs[-1])}", name="CSR"
        )
    drop = torch.nonzero(ptrs[1:] < ptrs[:-1])
    if drop.numel():
        r = int(drop[0, 0])
        raise InvalidMask(f"row_ptrs decreases at row {r}: {int(ptrs[r])} -> {int(ptrs[r + 1])}", name="CSR")


def _check_sorted_rows(cols: torch.Tensor, ptrs: torch.Tensor) -> None:
    """Columns strictly increase inside each row (consecutive entries not split by a row start)."""
    if cols.numel() < 2:
        return
    starts = torch.zeros(cols.numel() + 1, dtype=torch.bool, device=cols.device)
    starts[ptrs.to(torch.int64)] = True  # True where a new row begins
    bad = (cols[1:] <= cols[:-1]) & ~starts[1:-1]
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0]) + 1
        row = int(torch.searchsorted(ptrs, torch.tensor(i, dtype=ptrs.dtype), right=True)) - 1
        raise InvalidMask(
            f"column indices of row {row} must be sorted and unique; got {int(cols[i - 1])} then {int(cols[i])}",
            name="CSR",
        )


class COOTensor(SparseTensor):
    """Coordinates: ``values[nnz]`` at ``(row_indices[nnz], col_indices[nnz])``.

    The constructor sorts the entries into row-major order and REJECTS duplicate coordinates
    (InvalidMask naming the first one) rather than summing them silently; out-of-range indices
    are rejected too.
    """

    format = SparseFormat.COO

    def __init__(self, values: Any, row_indices: Any, col_indices: Any, shape: Any) -> None:
        rows, cols = check_shape(shape, "COO")
        values = as_values(values, "COO")
        r = as_index(row_indices, "row_indices", "COO").to(torch.int64)
        c = as_index(col_indices, "col_indices", "COO").to(torch.int64)
        if not values.numel() == r.numel() == c.numel():
            raise InvalidMask(
                f"lengths differ: {values.numel()} values, {r.numel()} rows, {c.numel()} columns", name="COO"
            )
        check_range(r, rows, "row_indices", "COO")
        check_range(c, cols, "col_indices", "COO")
        order = torch.argsort(r * cols + c, stable=True)
        r, c, values = r[order], c[order], values[order]
        dup = torch.nonzero((r[1:] == r[:-1]) & (c[1:] == c[:-1]))
        if dup.numel():
            i = int(dup[0, 0])
            raise InvalidMask(f"duplicate coordinate ({int(r[i])}, {int(c[i])})", name="COO")
        idx = index_dtype(rows, cols, values.numel())
        self._init(values, r.to(idx), c.to(idx), (rows, cols))

    def _init(
        self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]
    ) -> None:
        self._values, self._rows, self._cols, self._shape = values, rows, cols, shape
        self._torch: torch.Tensor | None = None

    @classmethod
    def _trusted(
        cls, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]
    ) -> COOTensor:
        obj = cls.__new__(cls)
        obj._init(values, rows, cols, shape)
        return obj

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: Any = None, **kwargs: Any) -> COOTensor:
        """Store the non-zeros of ``dense`` [rows, cols], or every position ``mask`` keeps."""
        check_dense(dense, "COO")
        rows, cols = torch.nonzero(keep_of(dense, mask, "COO"), as_tuple=True)
        idx = index_dtype(*dense.shape, rows.numel())
        return cls._trusted(dense[rows, cols], rows.to(idx), cols.to(idx), (dense.shape[0], dense.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def nnz(self) -> int:
        return self._values.numel()

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @property
    def row_indices(self) -> torch.Tensor:
        return self._rows

    @property
    def col_indices(self) -> torch.Tensor:
        return self._cols

    def _arrays(self) -> tuple[torch.Tensor, ...]:
        return (self._values, self._rows, self._cols)

    def to_dense(self) -> torch.Tensor:
        dense = self._values.new_zeros(self._shape)
        dense[self._rows.to(torch.int64), self._cols.to(torch.int64)] = self._values
        return dense

    def to_csr(self) -> CSRTensor:
        """The same matrix in CSR (entries are already in row-major order)."""
        counts = torch.bincount(self._rows.to(torch.int64), minlength=self._shape[0])
        ptrs = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(self._cols.dtype)
        return CSRTensor._trusted(self._values, self._cols, ptrs, self._shape)

    def to_torch(self) -> torch.Tensor:
        """A coalesced ``torch.sparse_coo`` tensor (int64 indices, as torch requires)."""
        if self._torch is None:
            indices = torch.stack([self._rows, self._cols]).to(torch.int64)
            self._torch = torch.sparse_coo_tensor(
                indices, self._values, self._shape, is_coalesced=True, check_invariants=False
            )
        return self._torch

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        a = self.to_torch() if self.dtype == x.dtype else self.to_torch().to(x.dtype)
        return torch.sparse.mm(a, x)


__all__ = ["COOTensor", "CSRTensor"]
