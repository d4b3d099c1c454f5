"""The public surface: the top level exports the stage entry points (pinned), every seed name is
importable from pruning_core.compat, and the boundaries hold."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import pruning_core
import pruning_core.compat as compat

# The stage entry points, pinned: adding or removing one is a deliberate API change.
TOP_LEVEL = sorted("""
ActivationStats CalibrationContext collect_activation_stats
SparsitySpec SparsityPattern SparsityMask MaskScope keep_topk
Method METHODS get_method
prune_module prune_sequential PruningResult
sparsegpt_prune
export_sparse sparsify
PruningError ConfigError
trace_decoder compute_scores candidate_plan build_candidate
build_dependency_graph apply_plan_
LotteryTicketPruner LotteryTicketConfig
""".split())

# Issue 3's list of the seed's public names (kept from the first version of this test).
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

def test_top_level_is_the_pinned_list_of_entry_points():
    assert sorted(pruning_core.__all__) == TOP_LEVEL
    for name in TOP_LEVEL:
        assert getattr(pruning_core, name) is not None, name


@pytest.mark.parametrize("name", compat.SEED_NAMES)
def test_every_seed_name_is_importable_from_compat(name):
    assert name in compat.__all__
    assert getattr(compat, name) is not None


@pytest.mark.parametrize("name", ISSUE_3_NAMES)
def test_issue_3_names_are_importable(name):
    """The seed's names from compat; our own additions (TaylorImportance, SemiStructuredTensor, ...)
    from compat, the top level or their stage package."""
    homes = [compat, pruning_core, *(importlib.import_module(f"pruning_core.{m}") for m in ("masks", "sparse"))]
    assert any(getattr(m, name, None) is not None for m in homes), name


def test_seed_names_are_listed_in_the_compat_page():
    page = compat.__doc__ or ""
    missing = [name for name in compat.SEED_NAMES if name not in page]
    assert missing == []


@pytest.mark.parametrize("name", BAD_INPUT_ERRORS)
def test_bad_input_errors_are_value_errors(name):
    cls = getattr(compat, name) if hasattr(compat, name) else getattr(pruning_core, name)
    assert issubclass(cls, pruning_core.PruningError)
    assert issubclass(cls, ValueError)


def test_all_is_exact():
    for module in (pruning_core, compat):
        assert sorted(module.__all__) == sorted(set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), name


@pytest.mark.parametrize(("module", "name"), [("pruning_core.pruning", "WandaPruner"),
                                             ("pruning_core.minitron", "DepthPruner")])
def test_seed_classes_live_in_compat_only(module, name):
    assert not hasattr(importlib.import_module(module), name)
    assert hasattr(compat, name)


def test_seed_history_lives_in_the_compat_page_only():
    """"The seed did X" paragraphs live in pruning_core/compat; elsewhere at most a pointer."""
    root = Path(pruning_core.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "compat":
            continue
        text = path.read_text().lower()
        mentions = text.count("the seed") + text.count("seed's") + text.count("aprender")
        if mentions > 1 or (mentions == 1 and "pruning_core.compat" not in text):
            offenders.append(f"{path.relative_to(root)}: {mentions}")
    assert offenders == []


def test_library_does_not_import_compat():
    """compat sits above every stage: no library module imports it (except the TRANSITIONAL
    lazy re-exports of pruning/ and minitron/, which import it inside a function)."""
    root = Path(pruning_core.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "compat":
            continue
        tree = ast.parse(path.read_text(), str(path))
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in top_level:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("pruning_core.compat")]
    assert offenders == []


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
