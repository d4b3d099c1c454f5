"""The public surface: every name issue 3 lists imports from the top level; the boundary holds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pruning_core

ISSUE_3_NAMES = """
PruningError NumericalInstability CalibrationRequired ShapeMismatch InvalidMask InvalidPattern
MissingActivationStats InvalidSparsity NoParameters ConfigError
Importance ImportanceScores ImportanceStats MagnitudeImportance WandaImportance SparseGPTImportance
TaylorImportance ActivationStats CalibrationContext collect_activation_stats sparsegpt_prune
SparseGPTPruner SparsityPattern MaskScope SparsityMask generate_unstructured_mask generate_nm_mask
generate_block_mask generate_row_mask generate_column_mask Pruner MagnitudePruner WandaPruner
prune_module PruningResult CSRTensor COOTensor BlockSparseTensor SemiStructuredTensor SparseTensor
SparseFormat sparsify LotteryTicketConfig LotteryTicketPruner RewindStrategy WinningTicket
DependencyGraph GraphNode GraphEdge NodeType DependencyType PruningPlan propagate_channel_pruning
DepthPruner BlockImportanceScores DepthPruningResult WidthPruner ChannelImportance WidthPruningResult
""".split()

BAD_INPUT_ERRORS = ["NumericalInstability", "CalibrationRequired", "ShapeMismatch", "InvalidMask",
                    "InvalidPattern", "MissingActivationStats", "InvalidSparsity", "NoParameters", "ConfigError"]


@pytest.mark.parametrize("name", ISSUE_3_NAMES)
def test_issue_names_importable_from_top_level(name):
    assert name in pruning_core.__all__
    assert getattr(pruning_core, name) is not None


@pytest.mark.parametrize("name", BAD_INPUT_ERRORS)
def test_bad_input_errors_are_value_errors(name):
    cls = getattr(pruning_core, name)
    assert issubclass(cls, pruning_core.PruningError)
    assert issubclass(cls, ValueError)


def test_all_is_exact():
    assert sorted(pruning_core.__all__) == sorted(set(pruning_core.__all__))
    for name in pruning_core.__all__:
        assert hasattr(pruning_core, name), name


def test_core_imports_no_orchestration_packages():
    """pruning_core stays a plain library: no prefect, mlflow, dask or distributed, not even lazily."""
    forbidden = {"prefect", "prefect_dask", "mlflow", "dask", "distributed"}
    root = Path(pruning_core.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []
