"""
``twistd --reactor uvloop`` (twisted/plugins/hbonex_reactors.py, hbonex/uvloopreactor.py): found
by twistd, installs Twisted's asyncio reactor on the loop uvloop makes, and says what to install
when uvloop is absent. Each case runs in a fresh interpreter: a reactor can be installed once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.application.reactors import getReactorTypes
from twisted.trial import unittest

from hbonex import uvloopreactor

ROOT = Path(__file__).resolve().parent.parent

# A stand-in uvloop whose loop is a plain asyncio loop of a class of its own, so the test
# shows the reactor wraps exactly the loop uvloop.new_event_loop() returned.
FAKE_UVLOOP = """
import asyncio
class Loop(asyncio.SelectorEventLoop):
    pass
def new_event_loop():
    return Loop()
"""

PROBE = """
import asyncio, sys
from twisted.application.reactors import installReactor
installReactor("uvloop")
from twisted.internet import reactor
print(type(reactor).__name__, type(reactor._asyncioEventloop).__name__,
      asyncio.get_event_loop_policy().get_event_loop() is reactor._asyncioEventloop)
"""


def probe(tmp: Path, extra_path: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*extra_path, str(ROOT)]))
    return subprocess.run([sys.executable, "-c", prelude + PROBE], capture_output=True,
                          text=True, env=env, cwd=tmp, timeout=60)


class UvloopReactorTests(unittest.TestCase):
    def test_plugin_is_listed(self) -> None:
        found = {r.shortName: r for r in getReactorTypes()}
        self.assertIn("uvloop", found)
        self.assertEqual(found["uvloop"].moduleName, "hbonex.uvloopreactor")

    def test_installs_asyncio_reactor_on_uvloop_loop(self) -> None:
        tmp = Path(self.mktemp()).resolve()  # the child runs elsewhere
        (tmp / "fake").mkdir(parents=True)
        (tmp / "fake" / "uvloop.py").write_text(FAKE_UVLOOP)
        done = probe(tmp, [str(tmp / "fake")])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split(), ["AsyncioSelectorReactor", "Loop", "True"])

    def test_without_uvloop_says_what_to_install(self) -> None:
        tmp = Path(self.mktemp()).resolve()  # the child runs elsewhere
        tmp.mkdir()
        # sys.modules[name] = None makes "import uvloop" fail even where it is installed.
        done = probe(tmp, [], prelude="import sys; sys.modules['uvloop'] = None\n")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(uvloopreactor.INSTALL_HINT, done.stderr)
        self.assertIn("pip install -e '.[uvloop]'", uvloopreactor.INSTALL_HINT)
