"""
What a regular (non-editable) install ships: every package under hbonex/ is listed in
pyproject.toml, or ``pip install .`` leaves it out (as once happened to hbonex.http). And the
modules' import graph has no circles.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent


def listed_packages() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    # Python 3.10 has no tomllib: the one key this needs, read with a pattern.
    match = re.search(r"^packages\s*=\s*\[(.*?)\]", text, re.M | re.S)
    assert match is not None, "no [tool.setuptools] packages list in pyproject.toml"
    return set(re.findall(r'"([^"]+)"', match.group(1)))


def module_imports() -> dict[str, set[str]]:
    """Each hbonex module -> the hbonex modules it imports at import time (module level)."""
    paths = {}
    for path in (ROOT / "hbonex").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hbonex"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in paths else str(node.module))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("hbonex."))
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of the graph (as a path that ends where it starts), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


class PackagingTests(unittest.TestCase):
    def test_every_package_is_shipped(self) -> None:
        found = {
            ".".join(init.parent.relative_to(ROOT).parts)
            for init in (ROOT / "hbonex").rglob("__init__.py")
            if "__pycache__" not in init.parts
        }
        self.assertIn("hbonex.http", found)
        self.assertEqual(sorted(found - listed_packages()), [])
        # The plugin dropins ship too (a namespace directory, listed by name).
        self.assertIn("twisted.plugins", listed_packages())

    def test_no_import_circles(self) -> None:
        graph = module_imports()
        self.assertIn("hbonex.tunnel.server",
                      graph["hbonex.filters.network.http_connection_manager"])
        self.assertEqual(find_cycle(graph), [])
        # The check itself finds a circle when there is one.
        graph["hbonex.errors"] = {"hbonex.bootstrap"}
        self.assertEqual(find_cycle(graph)[0], find_cycle(graph)[-1])
