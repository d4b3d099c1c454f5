"""No import cycle inside ``flows/`` or ``pruning_core/``: stage arrows point one way.

The module graph is built from the source with ``ast`` (nothing is imported). Every ``import``
statement counts, wherever it is (module level, inside a function, under ``TYPE_CHECKING``): a
lazy import that only dodges a cycle at import time is still a cycle in the design. An edge goes
to the module Python would load for the statement:

- ``import a.b.c`` -> ``a.b.c`` (the longest prefix that is one of our modules);
- ``from a.b import name`` -> ``a.b.name`` if that is a module (file or package), else ``a.b``
  (the module, or the package's ``__init__``, that defines ``name``); relative imports are
  resolved against the importing module's package first.

Implicit imports of parent packages' ``__init__`` are not edges (every submodule would then form
a cycle with a package that imports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "pruning_core")

# TEMPORARY: edges of cycles in pruning_core that other branches of the round-2 refactor remove
# (lazy or TYPE_CHECKING imports today). The lead deletes each entry once its cycle is gone; an
# entry whose edge no longer exists is simply unused.
ALLOWED_EDGES: set[tuple[str, str]] = {
    ("pruning_core.calibration.context", "pruning_core.calibration.gradients"),  # TYPE_CHECKING
    ("pruning_core.lottery.ticket", "pruning_core.lottery.store"),  # save()/load() import the store lazily
    ("pruning_core.lottery.controls", "pruning_core.lottery.pruner"),  # TYPE_CHECKING (RoundPlan)
    ("pruning_core.lm.models", "pruning_core.lm.smollm2"),  # _resolve_model_path imports it lazily
    ("pruning_core.lm.fingerprint", "pruning_core.lm.smollm2"),  # _memo_file imports default_cache_root lazily
}


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages`` under ``root``."""
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that one import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        found = set()
        for alias in node.names:
            parts = alias.name.split(".")
            prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
            found |= {next((p for p in prefixes if p in known), "")} - {""}
        return found
    if node.level:  # relative: strip the module's own name (not for a package) and level - 1 packages
        base = module.split(".")[: None if is_package else -1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in known:
            found.add(f"{source}.{alias.name}")
        elif source in known:
            found.add(source)
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """``module -> the modules it imports`` (within ``packages``), from the source alone."""
    known = module_names(root, packages)
    graph = {}
    for module, path in known.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _targets(node, module, path.name == "__init__.py", known)
        graph[module] = edges - {module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, as ``[a, b, ..., a]``,
    starting at the component's smallest name; sorted. Iterative Tarjan, deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return sorted(_cycle_in(graph, c) for c in components)


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's smallest module (breadth-first, sorted neighbours)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in strongly connected component {sorted(component)}")


def test_no_import_cycle_in_flows_or_pruning_core():
    graph = import_graph(REPO, PACKAGES)
    pruned = {m: {t for t in targets if (m, t) not in ALLOWED_EDGES} for m, targets in graph.items()}
    cycles = find_cycles(pruned)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_the_graph_sees_real_edges():
    graph = import_graph(REPO, PACKAGES)
    assert len(graph) > 100
    assert "flows.oneshot.tasks" in graph["flows.oneshot.flow"]  # from flows.oneshot import tasks as t
    assert "flows.config" in graph["flows.jobs"]  # from flows.config import JobBase
    assert "pruning_core.lottery" in graph["flows.lottery.models"]  # from pruning_core.lottery import <name>
    assert "pruning_core.lm.smollm2" in graph["pruning_core.lm.models"]  # an import inside a function


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize(("files", "expected"), [
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "import pkg.c\n",
      "pkg/c.py": "def f():\n    from .a import x\n"}, [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]),
    ({"pkg/__init__.py": "from pkg.a import x\n", "pkg/a.py": "from pkg import y\n"}, [["pkg", "pkg.a", "pkg"]]),
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/a.py": "from .. import b\n",
      "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.a import A\n"},
     [["pkg.b", "pkg.sub.a", "pkg.b"]]),
    ({"pkg/__init__.py": "", "pkg/a.py": "import os\nfrom pkg import b\n", "pkg/b.py": "import json\n"}, []),
])
def test_cycles_are_found_and_named(tmp_path, files, expected):
    _write(tmp_path, files)
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == expected
