"""2:4 semi-structured compressed matrices: the kept values plus 2-bit in-group indices.

Stage: formats. Layout (the same information as NVIDIA's sparse tensor cores use; Mishra et al.
2021, arXiv:2104.08378): every group of 4 consecutive columns of a row stores exactly 2 slots.
``values[rows, cols/2]`` holds the slot values; slot ``j`` of a row has a 2-bit index (0..3) into
its group, and the indices are packed 4 per byte (slot ``j`` in byte ``j // 4``, bits
``2*(j % 4)``) into ``meta[rows, ceil(cols/8)]`` uint8. The two indices of a group are strictly
increasing. A group that keeps fewer than 2 elements fills its spare slot with an unused
position holding 0, so ``to_dense()`` is exact; ``nnz`` counts kept positions only.
"""

from __future__ import annotations

from typing import Any

import torch

from pruning_core.errors import InvalidMask, InvalidPattern, ShapeMismatch, UnsupportedOperation
from pruning_core.masks.pattern import NM
from pruning_core.masks.select import keep_nm
from pruning_core.sparse.base import (
    SparseFormat,
    SparseTensor,
    as_values,
    check_dense,
    check_shape,
    index_dtype,
    keep_of,
    quiet_sparse,
)

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def _pack(idx: torch.Tensor) -> torch.Tensor:
    """[rows, slots] values 0..3 -> [rows, ceil(slots/4)] uint8, 4 per byte, little-endian."""
    rows, slots = idx.shape
    n_bytes = -(-slots // 4)
    padded = torch.zeros(rows, n_bytes * 4, dtype=torch.uint8, device=idx.device)
    padded[:, :slots] = idx
    quads = padded.view(rows, n_bytes, 4) << _SHIFTS.to(idx.device)
    return quads[..., 0] | quads[..., 1] | quads[..., 2] | quads[..., 3]


def _unpack(meta: torch.Tensor, slots: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: [rows, bytes] uint8 -> [rows, slots] int64."""
    quads = (meta[..., None] >> _SHIFTS.to(meta.device)) & 3  # [rows, bytes, 4]
    return quads.reshape(meta.shape[0], meta.shape[1] * 4)[:, :slots].to(torch.int64)


def _check_cols(cols: int) -> None:
    if cols % 4:
        raise InvalidPattern(f"the 2:4 format needs a column count divisible by 4, got {cols}", name="2:4")


class SemiStructuredTensor(SparseTensor):
    """2:4 compressed matrix: ``values[rows, cols/2]`` and packed 2-bit ``meta[rows, ceil(cols/8)]``.

    Raises (constructor): cols not divisible by 4 (InvalidPattern); values/meta of the wrong
    shape (ShapeMismatch) or dtype, in-group indices not strictly increasing, non-zero padding
    bits, or ``nnz`` outside ``[0, rows*cols/2]`` (InvalidMask). ``nnz`` defaults to the number
    of non-zero values.
    """

    format = SparseFormat.SEMI_STRUCTURED

    def __init__(self, values: Any, meta: Any, shape: Any, *, nnz: int | None = None) -> None:
        rows, cols = check_shape(shape, "2:4")
        _check_cols(cols)
        values = as_values(values, "2:4", dim=2)
        meta = torch.as_tensor(meta)
        if tuple(values.shape) != (rows, cols // 2):
            raise ShapeMismatch([rows, cols // 2], list(values.shape), name="2:4 values")
        if meta.dtype != torch.uint8 or tuple(meta.shape) != (rows, -(-cols // 8)):
            raise ShapeMismatch(
                [rows, -(-cols // 8)],
                list(meta.shape),
                name="2:4 meta",
                reason=f"needs uint8 of this shape, got {meta.dtype}",
            )
        _check_meta(meta, cols)
        nnz = int(torch.count_nonzero(values)) if nnz is None else int(nnz)
        if not 0 <= nnz <= values.numel():
            raise InvalidMask(f"nnz={nnz} outside [0, {values.numel()}] stored slots", name="2:4")
        self._init(values, meta, (rows, cols), nnz)

    def _init(self, values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int], nnz: int) -> None:
        self._values, self._meta, self._shape, self._nnz = values, meta, shape, nnz
        self._torch: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: Any = None, **kwargs: Any) -> SemiStructuredTensor:
        """Compress ``dense`` [rows, cols]; the kept positions (mask, or non-zeros) must be 2:4.

        Raises:
            InvalidPattern: cols not divisible by 4, or a group of 4 keeping more than 2.
        """
        check_dense(dense, "2:4")
        rows, cols = dense.shape
        _check_cols(cols)
        keep = keep_of(dense, mask, "2:4")
        NM(2, 4).validate(keep, name="2:4")
        groups = keep.reshape(-1, 4)  # [G, 4]
        # Two slots per group: kept positions first, then the lowest unused ones (unique priorities).
        priority = groups.to(torch.float32) * 4 + torch.arange(
            3, -1, -1, dtype=torch.float32, device=dense.device
        )
        chosen = keep_nm(priority, 2, 4)  # exactly 2 per group
        idx = (torch.nonzero(chosen.reshape(-1), as_tuple=True)[0] % 4).view(-1, 2)  # ascending in group
        slot_keep = groups.gather(1, idx)
        vals = dense.reshape(-1, 4).gather(1, idx)
        vals = torch.where(slot_keep, vals, torch.zeros((), dtype=dense.dtype, device=dense.device))
        obj = cls.__new__(cls)
        obj._init(
            vals.reshape(rows, cols // 2),
            _pack(idx.reshape(rows, cols // 2).to(torch.uint8)),
            (rows, cols),
            int(torch.count_nonzero(keep)),
        )
        return obj

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def nnz(self) -> int:
        return self._nnz

    @property
    def values(self) -> torch.Tensor:
        """Slot values ``[rows, cols/2]``."""
        return self._values

    @property
    def meta(self) -> torch.Tensor:
        """Packed 2-bit in-group indices ``[rows, ceil(cols/8)]`` uint8."""
        return self._meta

    def indices(self) -> torch.Tensor:
        """Unpacked in-group index (0..3) of every slot, int64 ``[rows, cols/2]``."""
        return _unpack(self._meta, self._shape[1] // 2)

    def _arrays(self) -> tuple[torch.Tensor, ...]:
        return (self._values, self._meta)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self._shape
        dense = self._values.new_zeros(rows, cols // 4, 4)
        dense.scatter_(2, self.indices().view(rows, cols // 4, 2), self._values.view(rows, cols // 4, 2))
        return dense.view(rows, cols)

    def _csr(self) -> torch.Tensor:
        """The slots as a torch CSR matrix (cols/2 entries per row; built once)."""
        if self._torch is None:
            rows, cols = self._shape
            idx = index_dtype(rows * cols // 2 + 1, cols)
            base = torch.arange(0, cols, 4, device=self.device).repeat_interleave(2)  # group start per slot
            col = (self.indices() + base).to(idx).reshape(-1)
            crow = torch.arange(rows + 1, device=self.device) * (cols // 2)
            self._torch = quiet_sparse(
                torch.sparse_csr_tensor,
                crow.to(idx),
                col,
                self._values.reshape(-1),
                self._shape,
                check_invariants=False,
            )
        return self._torch

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse product over the stored slots (half the multiply-adds of a dense product)."""
        a = self._csr() if self.dtype == x.dtype else self._csr().to(x.dtype)
        return a @ x

    def matmul_decompressed(self, x: torch.Tensor) -> torch.Tensor:
        """``to_dense() @ x``: decompress, then a dense BLAS product. On CPUs without 2:4
        hardware this is often faster than :meth:`matmul`; it is NOT a sparse kernel."""
        return self.to_dense() @ x.to(self.dtype)

    def to_torch(self) -> torch.Tensor:
        """torch's ``SparseSemiStructuredTensor`` (CUDA only; fp16/bf16 and its shape rules)."""
        if self.device.type != "cuda":
            raise UnsupportedOperation(
                f"{type(self).__name__}.to_torch() on {self.device}: torch's semi-structured (2:4) "
                "tensor exists only on CUDA; on CPU use to_dense(), matmul() or "
                "CSRTensor.from_dense(self.to_dense())"
            )
        return torch.sparse.to_sparse_semi_structured(self.to_dense())


def _check_meta(meta: torch.Tensor, cols: int) -> None:
    """In-group indices strictly increase within each group; padding bits are zero."""
    rows, slots = meta.shape[0], cols // 2
    full = _unpack(meta, meta.shape[1] * 4)
    if bool((full[:, slots:] != 0).any()):
        raise InvalidMask("meta has non-zero padding bits after the last slot", name="2:4")
    pairs = full[:, :slots].reshape(rows, slots // 2, 2)
    bad = torch.nonzero(pairs[..., 0] >= pairs[..., 1])
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise InvalidMask(
            f"row {r}, group {g}: in-group indices must be strictly increasing, got "
            f"{int(pairs[r, g, 0])}, {int(pairs[r, g, 1])}",
            name="2:4",
        )


__all__ = ["SemiStructuredTensor"]
