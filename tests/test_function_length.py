"""No function over 40 lines of code outside the tests (pruning_core, flows, benchmarks, scripts).

A function's lines of code are the lines from its ``def`` to its last line, less its own
docstring, blank lines and comment-only lines (a nested function's lines count for both).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("pruning_core", "flows", "pruning_pipeline", "benchmarks", "scripts")
LIMIT = 40


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of code of a function: its span less its docstring, blank and comment-only lines."""
    first = node.body[0]
    doc = (first.lineno, first.end_lineno) if (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    ) else (0, -1)
    span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
    return sum(1 for i in span if not doc[0] <= i <= doc[1]
               and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


def long_functions(root: Path, folders: tuple[str, ...], limit: int = LIMIT) -> dict[str, int]:
    """``"<file>::<function>" -> lines of code`` for every function over ``limit``."""
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            text = path.read_text()
            lines = text.splitlines()
            for node in ast.walk(ast.parse(text, filename=str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = code_lines(node, lines)
                    if n > limit:
                        found[f"{path.relative_to(root).as_posix()}::{node.name}"] = n
    return found


def test_no_function_over_40_lines_of_code():
    over = long_functions(REPO, ROOTS)
    assert not over, "functions over 40 lines of code:\n" + "\n".join(f"  {n:3d}  {k}" for k, n in sorted(over.items()))


def test_the_count_skips_docstrings_comments_and_blank_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(40))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.py").write_text(
        f'def ok():\n    """Doc\n\n    more doc.\n    """\n    # a comment\n\n{body[: body.rindex(chr(10))]}\n'
        f"def too_long():\n{body}\n    return x0\n")
    assert long_functions(tmp_path, ("m",)) == {"m/a.py::too_long": 42}  # def + 40 + return
