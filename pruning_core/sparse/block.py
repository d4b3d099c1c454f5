"""Block-sparse matrices: dense ``bh x bw`` tiles at (block row, block column) coordinates.

Stage: formats. Shapes that do not divide by the block are zero-padded to whole blocks for
storage, but the ORIGINAL shape is kept, so ``to_dense()`` and ``shape`` are exact.
``matmul`` runs torch's BSR kernel on the padded matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pruning_core.errors import InvalidMask, InvalidPattern, ShapeMismatch
from pruning_core.masks.mask import SparsityMask
from pruning_core.masks.pattern import Block
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

# Gathered inputs and block products of one bmm chunk stay below this many bytes.
_BMM_CHUNK_BYTES = 64 << 20


def _block_size(block_size: Any, mask: Any) -> tuple[int, int]:
    """``block_size`` as (h, w) > 0, defaulting to the Block pattern of a SparsityMask."""
    if block_size is None and isinstance(mask, SparsityMask) and isinstance(mask.pattern, Block):
        return mask.pattern.height, mask.pattern.width
    if block_size is None:
        raise InvalidPattern("block_size=(height, width) is required for the block-sparse format")
    h, w = block_size
    Block(h, w).check()  # negative, non-integer or zero sizes -> InvalidPattern
    return h, w


class BlockSparseTensor(SparseTensor):
    """``blocks[nb, bh, bw]`` stored at ``block_rows[nb]``, ``block_cols[nb]``; original ``shape``.

    The constructor sorts blocks into block-row-major order and rejects: non-3-D blocks or a
    zero block size (InvalidPattern), index arrays of the wrong length, block coordinates outside
    the padded grid ``ceil(rows/bh) x ceil(cols/bw)`` or duplicated (InvalidMask), and an
    ``nnz`` outside ``[0, nb*bh*bw]``. ``nnz`` defaults to the count of non-zero block values.
    """

    format = SparseFormat.BLOCK

    def __init__(
        self, blocks: Any, block_rows: Any, block_cols: Any, shape: Any, *, nnz: int | None = None
    ) -> None:
        rows, cols = check_shape(shape, "Block")
        blocks = as_values(blocks, "Block", dim=3)
        nb, bh, bw = blocks.shape
        Block(bh, bw).check()
        grid = (-(-rows // bh), -(-cols // bw))
        br = as_index(block_rows, "block_rows", "Block").to(torch.int64)
        bc = as_index(block_cols, "block_cols", "Block").to(torch.int64)
        if not br.numel() == bc.numel() == nb:
            raise InvalidMask(
                f"{nb} blocks but {br.numel()} block rows and {bc.numel()} block cols", name="Block"
            )
        check_range(br, grid[0], "block_rows", "Block")
        check_range(bc, grid[1], "block_cols", "Block")
        order = torch.argsort(br * grid[1] + bc, stable=True)
        br, bc, blocks = br[order], bc[order], blocks[order]
        dup = torch.nonzero((br[1:] == br[:-1]) & (bc[1:] == bc[:-1]))
        if dup.numel():
            i = int(dup[0, 0])
            raise InvalidMask(f"duplicate block ({int(br[i])}, {int(bc[i])})", name="Block")
        nnz = int(torch.count_nonzero(blocks)) if nnz is None else int(nnz)
        if not 0 <= nnz <= blocks.numel():
            raise InvalidMask(f"nnz={nnz} outside [0, {blocks.numel()}] stored elements", name="Block")
        idx = index_dtype(*grid, nb + 1)
        self._init(blocks, br.to(idx), bc.to(idx), (rows, cols), nnz)

    def _init(
        self, blocks: torch.Tensor, br: torch.Tensor, bc: torch.Tensor, shape: tuple[int, int], nnz: int
    ) -> None:
        self._blocks, self._br, self._bc, self._shape, self._nnz = blocks, br, bc, shape, nnz
        bh, bw = blocks.shape[1:]
        self._grid = (-(-shape[0] // bh), -(-shape[1] // bw))
        self._torch: torch.Tensor | None = None

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        mask: Any = None,
        *,
        block_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> BlockSparseTensor:
        """Store every ``block_size`` tile of ``dense`` that holds a non-zero (or a kept position).

        ``block_size`` defaults to the pattern of a Block ``SparsityMask``. Inside a stored tile,
        positions the mask prunes are stored as 0.
        """
        check_dense(dense, "Block")
        bh, bw = _block_size(block_size, mask)
        keep = keep_of(dense, mask, "Block")
        values = torch.where(keep, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))
        grid = (-(-dense.shape[0] // bh), -(-dense.shape[1] // bw))
        pad = (0, grid[1] * bw - dense.shape[1], 0, grid[0] * bh - dense.shape[0])
        tiles = F.pad(values, pad).reshape(grid[0], bh, grid[1], bw).transpose(1, 2)  # [gr, gc, bh, bw]
        stored = F.pad(keep, pad).reshape(grid[0], bh, grid[1], bw).any(dim=3).any(dim=1)  # [gr, gc]
        br, bc = torch.nonzero(stored, as_tuple=True)  # block-row-major
        obj = cls.__new__(cls)
        idx = index_dtype(*grid, br.numel() + 1)
        obj._init(
            tiles[br, bc].contiguous(),
            br.to(idx),
            bc.to(idx),
            (dense.shape[0], dense.shape[1]),
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
        """The stored blocks ``[nb, bh, bw]``."""
        return self._blocks

    @property
    def block_size(self) -> tuple[int, int]:
        return self._blocks.shape[1], self._blocks.shape[2]

    @property
    def num_blocks(self) -> int:
        return self._blocks.shape[0]

    @property
    def block_rows(self) -> torch.Tensor:
        return self._br

    @property
    def block_cols(self) -> torch.Tensor:
        return self._bc

    def _arrays(self) -> tuple[torch.Tensor, ...]:
        return (self._blocks, self._br, self._bc)

    def _padded(self) -> torch.Tensor:
        bh, bw = self.block_size
        tiles = self._blocks.new_zeros(self._grid[0], self._grid[1], bh, bw)
        tiles[self._br.to(torch.int64), self._bc.to(torch.int64)] = self._blocks
        return tiles.transpose(1, 2).reshape(self._grid[0] * bh, self._grid[1] * bw)

    def to_dense(self) -> torch.Tensor:
        return self._padded()[: self._shape[0], : self._shape[1]].contiguous()

    def _padded_bsr(self) -> torch.Tensor:
        """torch BSR of the padded matrix (built once; shares the blocks)."""
        if self._torch is None:
            bh, bw = self.block_size
            counts = torch.bincount(self._br.to(torch.int64), minlength=self._grid[0])
            crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(self._bc.dtype)
            size = (self._grid[0] * bh, self._grid[1] * bw)
            self._torch = quiet_sparse(
                torch.sparse_bsr_tensor, crow, self._bc, self._blocks, size, check_invariants=False
            )
        return self._torch

    def to_torch(self) -> torch.Tensor:
        """A ``torch.sparse_bsr`` tensor; needs a shape divisible by the block (else ShapeMismatch)."""
        bh, bw = self.block_size
        if self._shape[0] % bh or self._shape[1] % bw:
            raise ShapeMismatch(
                f"multiples of the {bh}x{bw} block",
                list(self._shape),
                name="Block",
                reason="torch's BSR layout cannot represent a padded shape; use to_dense() or pad first",
            )
        return self._padded_bsr()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        bh, bw = self.block_size
        xp = F.pad(x, (0, 0, 0, self._grid[1] * bw - x.shape[0]))  # zero rows for the padded columns
        if bh == bw:  # torch's BSR kernel (MKL on CPU) supports square blocks only
            a = self._padded_bsr() if self.dtype == x.dtype else self._padded_bsr().to(x.dtype)
            return (a @ xp)[: self._shape[0]]
        return self._matmul_bmm(xp)[: self._shape[0]]

    def _matmul_bmm(self, xp: torch.Tensor) -> torch.Tensor:
        """Batched block products scattered into block rows: out[br] += blocks @ x[bc]."""
        bh, bw = self.block_size
        k = xp.shape[1]
        xb = xp.view(self._grid[1], bw, k)  # [gc, bw, k]
        out = xp.new_zeros(self._grid[0], bh, k)  # [gr, bh, k]
        blocks = self._blocks.to(xp.dtype)
        chunk = max(1, _BMM_CHUNK_BYTES // max(1, (bw + bh) * k * xp.element_size()))
        for start in range(0, self.num_blocks, chunk):  # bounded memory: chunks of blocks, not one per block
            sl = slice(start, start + chunk)
            prod = torch.bmm(blocks[sl], xb[self._bc[sl].to(torch.int64)])  # [c, bh, k]
            out.index_add_(0, self._br[sl].to(torch.int64), prod)
        return out.view(-1, k)


__all__ = ["BlockSparseTensor"]
