"""The test tree's own rules. Test folders have no ``__init__.py`` (pytest's default import mode names
a module by its file name), so two test modules with the same file name anywhere under tests/ stop
the collection of the whole suite: each name must be unique."""

from __future__ import annotations

import collections
from pathlib import Path

TESTS = Path(__file__).parent


def test_every_test_module_name_is_unique() -> None:
    names = collections.defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        if "__pycache__" not in path.parts:
            names[path.name].append(str(path.relative_to(TESTS)))
    shared = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not shared, f"module names used twice under tests/ (rename one): {shared}"
