"""Sparse formats for pruned 2-D weights: CSR, COO, block-sparse and 2:4 compressed.

Each converts from and to dense exactly, multiplies a dense ``[cols]``/``[cols, k]`` input with
a sparse kernel, reports its real stored bytes, and converts to torch's sparse layouts.
``export_sparse`` / ``load_sparse_export`` write a pruned model's weights to disk in CSR, 2:4 or
compressed-tensors' ``sparse-24-bitmask`` layout and read them back exactly.
"""

from __future__ import annotations

from pruning_core.sparse.base import SparseFormat, SparseTensor
from pruning_core.sparse.block import BlockSparseTensor
from pruning_core.sparse.convert import sparsify
from pruning_core.sparse.csr import COOTensor, CSRTensor
from pruning_core.sparse.export import (
    ExportFormat,
    SparseExport,
    export_sparse,
    load_sparse_export,
    read_export_info,
)
from pruning_core.sparse.semi import SemiStructuredTensor

__all__ = [
    "BlockSparseTensor",
    "COOTensor",
    "CSRTensor",
    "ExportFormat",
    "SemiStructuredTensor",
    "SparseExport",
    "SparseFormat",
    "SparseTensor",
    "export_sparse",
    "load_sparse_export",
    "read_export_info",
    "sparsify",
]
