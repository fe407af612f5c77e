"""
The documentation says what the code does: docs/extensions.md's example runs as written, and
the dev PKI's location reads the same in the README and every --help.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from twisted.trial import unittest

from hbonex.cli import main as cli
from hbonex.tls import pki

ROOT = Path(__file__).resolve().parent.parent


def words(text: str) -> str:
    """Markdown or --help text as plain words: no backticks, single spaces."""
    return " ".join(text.replace("`", "").split())


class ExtensionExampleTests(unittest.TestCase):
    """
    docs/extensions.md's shout filter, written out as the page says (mypkg/shout.py and the
    dropin), used by `hbonex config check` in a real process.
    """

    def setUp(self) -> None:
        text = (ROOT / "docs" / "extensions.md").read_text()
        files = dict(re.findall(r"^`([\w/]+\.py)`[^\n]*:\n\n```python\n(.*?)^```", text,
                                re.MULTILINE | re.DOTALL))
        files = {name: source for name, source in files.items() if "shout" in name}
        self.assertEqual(sorted(files), ["mypkg/shout.py", "twisted/plugins/mypkg_shout.py"])
        self.dir = Path(self.mktemp()).absolute()
        for name, source in files.items():
            (self.dir / name).parent.mkdir(parents=True, exist_ok=True)
            (self.dir / name).write_text(source)
        [snippet] = re.findall(r"^```yaml\n(filters:\n.*?)^```", text, re.MULTILINE | re.DOTALL)
        self.filters = yaml.safe_load(snippet)["filters"]

    def bootstrap(self, shout: dict[str, Any]) -> dict[str, Any]:
        endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                "port_value": 1}}}}
        return {"static_resources": {
            "listeners": [{
                "name": "shout",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [shout, *self.filters[1:]]}],
            }],
            "clusters": [{"name": "backend", "load_assignment": {
                "cluster_name": "backend", "endpoints": [{"lb_endpoints": [endpoint]}]}}],
        }}

    def check(self, variants: dict[str, dict[str, Any]]) -> dict[str, tuple[int, str]]:
        """`hbonex config check` on each variant of the shout entry, concurrently."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.dir), str(ROOT)])}
        procs = {}
        for name, shout in variants.items():
            path = self.dir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(self.bootstrap(shout)))
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "hbonex", "config", "check", str(path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                cwd=self.dir,
            )
        results = {}
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=60)
            results[name] = (proc.returncode, out)
        return results

    def test_as_documented_and_the_error_cases(self) -> None:
        shout = self.filters[0]
        self.assertEqual(shout["name"], "mypkg.filters.network.shout")
        typed = shout["typed_config"]
        self.assertEqual(typed["@type"], "type.googleapis.com/xds.type.v3.TypedStruct")
        results = self.check({
            "documented": shout,
            "no_stat_prefix": {**shout, "typed_config": {**typed, "value": {}}},
            "no_type": {**shout, "typed_config": {"stat_prefix": "shout"}},
            "by_name": {"name": shout["name"]},
            "bare": {**shout, "typed_config": {"@type": typed["type_url"],
                                              **typed["value"]}},
        })
        code, out = results["documented"]
        self.assertEqual(code, 0, out)
        self.assertIn("      mypkg.filters.network.shout\n", out)
        code, out = results["no_stat_prefix"]
        self.assertEqual(code, 2, out)
        self.assertIn("filters[0].typed_config.value: missing required field 'stat_prefix'", out)
        code, out = results["no_type"]
        self.assertEqual(code, 2, out)
        self.assertIn("filters[0].typed_config: typed_config needs an '@type'", out)
        # Found by name (else "unknown network filter"), with an empty config.
        code, out = results["by_name"]
        self.assertEqual(code, 2, out)
        self.assertIn("filters[0].typed_config: missing required field 'stat_prefix'", out)
        # Without a compiled proto the config must be a TypedStruct, and the error says so.
        code, out = results["bare"]
        self.assertEqual(code, 2, out)
        self.assertIn("typed_config.@type: network filter type 'type.googleapis.com/mypkg.Shout' "
                      "has no compiled Envoy message; put its config in a TypedStruct", out)


class DevPKILocationTests(unittest.TestCase):
    """One sentence about where the dev PKI is kept, the same everywhere, and true."""

    def test_readme(self) -> None:
        readme = words((ROOT / "README.md").read_text())
        self.assertIn(f"dev PKI kept in {pki.DEV_PKI_LOCATION}", readme)

    def test_demo_help(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["demo", "--help"]), 0)
        self.assertIn(f"where the dev PKI is kept: {pki.DEV_PKI_LOCATION}", words(out.getvalue()))

    def test_true(self) -> None:
        home = Path("/home/u")
        self.patch(Path, "home", classmethod(lambda cls: home))
        for environ, state in (
            ({"HBONEX_STATE_DIR": "/a", "XDG_STATE_HOME": "/x"}, Path("/a")),
            ({"XDG_STATE_HOME": "/x"}, Path("/x/hbonex")),
            ({}, home / ".local" / "state" / "hbonex"),
        ):
            self.patch(os, "environ", environ)
            self.assertEqual(pki.default_state_dir(), state)
        state = Path(self.mktemp())
        self.assertEqual(pki.ensure_dev_pki(state), state / "dev-pki")
