"""``sparsify``: a dense tensor plus a keep-mask -> a sparse tensor in the chosen format."""

from __future__ import annotations

from typing import Any

import torch

from pruning_core.errors import ConfigError
from pruning_core.sparse.base import SparseFormat, SparseTensor
from pruning_core.sparse.block import BlockSparseTensor
from pruning_core.sparse.csr import COOTensor, CSRTensor
from pruning_core.sparse.semi import SemiStructuredTensor

FORMATS: dict[SparseFormat, type[SparseTensor]] = {
    SparseFormat.CSR: CSRTensor,
    SparseFormat.COO: COOTensor,
    SparseFormat.BLOCK: BlockSparseTensor,
    SparseFormat.SEMI_STRUCTURED: SemiStructuredTensor,
}


def sparsify(
    tensor: torch.Tensor, mask: Any, format: SparseFormat | str = SparseFormat.CSR, **kwargs: Any
) -> SparseTensor:
    """Store ``tensor`` [rows, cols] at the positions ``mask`` keeps, in ``format``.

    With a mask, nnz is by mask: kept positions are stored even if their value is 0 and
    ``to_dense()`` equals ``tensor * mask``. With ``mask=None``, the non-zeros are stored.

    Args:
        tensor: 2-D dense matrix.
        mask: a :class:`~pruning_core.masks.SparsityMask`, a bool/0-1 tensor, or None.
        format: a :class:`SparseFormat` or its value (``"csr"``, ``"coo"``, ``"block"``,
            ``"semi_structured"``).
        **kwargs: format options, e.g. ``block_size=(16, 16)`` for BLOCK (defaults to the
            mask's Block pattern).
    """
    try:
        fmt = SparseFormat(format)
    except ValueError:
        allowed = ", ".join(f.value for f in SparseFormat)
        raise ConfigError("format", f"must be one of {allowed}; got {format!r}") from None
    return FORMATS[fmt].from_dense(tensor, mask, **kwargs)


__all__ = ["FORMATS", "sparsify"]
