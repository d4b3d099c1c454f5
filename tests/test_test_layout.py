"""The test tree has no package __init__ files, so pytest imports every test
module under its bare file name: two test files with one name break collection."""

from collections import Counter
from pathlib import Path


def test_test_module_names_are_unique():
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []
