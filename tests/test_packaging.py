"""
What a regular (non-editable) install ships: every package under hbonex/ is listed in
pyproject.toml, or ``pip install .`` leaves it out (as once happened to hbonex.http).
"""

from __future__ import annotations

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
