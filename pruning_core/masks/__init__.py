"""Masks: sparsity patterns, scope, validated keep-masks and the vectorized generators.

``True`` means keep. Exactly ``floor(L * s)`` elements are pruned per comparison group and
equal scores keep the lower index.
"""

from __future__ import annotations

from pruning_core.masks.generate import (
    generate_block_mask,
    generate_column_mask,
    generate_global_masks,
    generate_mask,
    generate_nm_mask,
    generate_row_mask,
    generate_unstructured_mask,
)
from pruning_core.masks.mask import SparsityMask
from pruning_core.masks.pattern import NM, Block, Column, MaskScope, Row, SparsityPattern, Unstructured
from pruning_core.masks.select import (
    group_scores,
    keep_blocks,
    keep_columns,
    keep_nm,
    keep_rows,
    keep_topk,
)

__all__ = [
    "NM",
    "Block",
    "Column",
    "MaskScope",
    "Row",
    "SparsityMask",
    "SparsityPattern",
    "Unstructured",
    "generate_block_mask",
    "generate_column_mask",
    "generate_global_masks",
    "generate_mask",
    "generate_nm_mask",
    "generate_row_mask",
    "generate_unstructured_mask",
    "group_scores",
    "keep_blocks",
    "keep_columns",
    "keep_nm",
    "keep_rows",
    "keep_topk",
]
