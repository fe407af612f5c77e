"""
docs/waypoint-filters.md's YAML examples load as written, in a connection manager.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.config import load_config
from tests.test_e2e_hcm import CONFIG, HCM_TYPE

DOC = Path(__file__).resolve().parent.parent / "docs" / "waypoint-filters.md"


def sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = re.split(r"^## (\S+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


class ExamplesTests(unittest.TestCase):
    def load(self, http_filters: str, routes: str = "") -> object:
        text = CONFIG.format(backend=1, hcm_type=HCM_TYPE, hcm_extra="",
                             http_filters=indent(http_filters, 10),
                             extra_routes=indent(routes, 14))
        return load_config(text, Clock())

    def test_each_section_has_an_example_that_loads(self) -> None:
        found = {name: body for name, body in sections().items()
                 if name.startswith("envoy.filters.http.")}
        self.assertLessEqual({"envoy.filters.http.ext_authz", "envoy.filters.http.fault",
                              "envoy.filters.http.local_ratelimit"}, set(found))
        for name, body in found.items():
            # A section's first example is the filter's own.
            filters = re.findall(r"^```yaml\n(http_filters:\n.*?)^```", body, re.M | re.S)[0]
            # The examples' own services are the test config's one cluster.
            filters = re.sub(r"cluster: \w+", "cluster: backend", filters)
            self.assertIn(f"- name: {name}\n", filters)
            routes = re.findall(r"^```yaml\nroutes:\n(.*?)^```", body, re.M | re.S)
            loaded = self.load(filters, routes[0] if routes else "")
            hcm = loaded.listeners[0].chains[0].filters[0].parsed  # type: ignore[attr-defined]
            self.assertEqual([f.name for f in hcm.http_filters], [name])
            self.assertEqual(loaded.warnings, [], name)  # type: ignore[attr-defined]
