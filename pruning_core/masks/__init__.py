"""Masks: sparsity patterns and scopes, the validated :class:`SparsitySpec`, keep-masks and the
vectorized selection kernels.

``True`` means keep. Exactly ``floor(L * s)`` elements are pruned per comparison group and
equal scores keep the lower index. :func:`select_mask` (scores + spec -> mask) is what the
pruning methods call; the ``generate_*`` functions are its loose-argument forms.
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
    select_mask,
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
from pruning_core.masks.spec import SparsitySpec, parse_pattern, parse_scope
from pruning_core.masks.streamed import GlobalSelection, plan_global_selection

__all__ = [
    "NM",
    "Block",
    "Column",
    "GlobalSelection",
    "MaskScope",
    "Row",
    "SparsityMask",
    "SparsityPattern",
    "SparsitySpec",
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
    "parse_pattern",
    "parse_scope",
    "plan_global_selection",
    "select_mask",
]
