"""
``twistd --reactor hbonex-epoll`` (hbonex/epollreactor.py): Twisted's epoll reactor whose
doPoll calls ``_doReadOrWrite`` directly instead of through ``log.callWithLogger``.

The Twisted internals it relies on are pinned here (source digests, attributes, signature), so
a Twisted release that changes them fails these tests loudly; the behaviour tests run a real
DirectEPollReactor (not installed) over socketpairs.
"""

from __future__ import annotations

import hashlib
import inspect
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.application.reactors import getReactorTypes
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import _PollLikeMixin
from twisted.logger import globalLogPublisher
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial import unittest

from hbonex.epollreactor import DirectEPollReactor
from tests.support import e2e

ROOT = Path(__file__).resolve().parent.parent

# sha256 of inspect.getsource(...), identical in Twisted 23.10.0 and 26.10.0. If one changes,
# re-read the new code: DirectEPollReactor.doPoll is EPollReactor.doPoll minus callWithLogger,
# and relies on _doReadOrWrite catching, logging and disconnecting what doRead/doWrite raise.
PINNED = {
    "EPollReactor.doPoll": (EPollReactor.doPoll,
                            "09b62ae68ef01b4b"),
    "_PollLikeMixin._doReadOrWrite": (_PollLikeMixin._doReadOrWrite,
                                      "5ffee55b79492b00"),
    "callWithLogger": (log.callWithLogger, "802f8564bca3531f"),
}


def digest(func: Any) -> str:
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:16]


class Selectable:
    """A minimal IReadDescriptor/IWriteDescriptor over one end of a socketpair."""

    def __init__(self, sock: socket.socket, name: str, fail_read: bool = False,
                 fail_lost: bool = False) -> None:
        self.sock, self.name = sock, name
        self.fail_read, self.fail_lost = fail_read, fail_lost
        self.reads: list[bytes] = []
        self.systems: list[str] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self) -> None:
        self.systems.append(context.get(log.ILogContext, {}).get("system", "-"))
        if self.fail_read:
            raise ZeroDivisionError("doRead failed")
        self.reads.append(self.sock.recv(100))

    def doWrite(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        if self.fail_lost:
            raise ValueError("connectionLost failed")


class EPollReactorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = DirectEPollReactor()
        self.addCleanup(self.close_reactor)

    def close_reactor(self) -> None:
        # The socketpairs close first (later cleanups run first): drop, don't unregister.
        self.reactor._selectables.clear()
        self.reactor._poller.close()

    def pair(self, name: str, **kw: Any) -> tuple[Selectable, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        return Selectable(ours, name, **kw), theirs

    def test_plugin_is_listed(self) -> None:
        found = {r.shortName: r for r in getReactorTypes()}
        self.assertEqual(found["hbonex-epoll"].moduleName, "hbonex.epollreactor")

    def test_pinned_twisted_sources(self) -> None:
        for name, (func, expected) in PINNED.items():
            self.assertEqual(digest(func), expected,
                             f"Twisted changed {name}: re-check hbonex/epollreactor.py")

    def test_pinned_internals(self) -> None:
        self.assertIsInstance(self.reactor._selectables, dict)
        self.assertTrue(callable(self.reactor._poller.poll))
        self.assertEqual(list(inspect.signature(self.reactor._doReadOrWrite).parameters),
                         ["selectable", "fd", "event"])
        self.assertIs(DirectEPollReactor.doIteration, DirectEPollReactor.doPoll)

    def test_dispatches_without_log_context(self) -> None:
        """doRead runs without callWithLogger's context (the documented loss) and reads."""
        sel, peer = self.pair("Proto,1,127.0.0.1")
        self.reactor.addReader(sel)
        peer.send(b"hello")
        self.reactor.doPoll(1)
        self.assertEqual(sel.reads, [b"hello"])
        self.assertEqual(sel.systems, ["-"])

    def test_stock_epoll_sets_log_context(self) -> None:
        """What the stock reactor does with the same selectable, for contrast."""
        stock = EPollReactor()
        self.addCleanup(stock._poller.close)
        sel, peer = self.pair("Proto,1,127.0.0.1")
        stock.addReader(sel)
        self.addCleanup(stock.removeReader, sel)
        peer.send(b"x")
        stock.doPoll(1)
        self.assertEqual(sel.systems, ["Proto,1,127.0.0.1"])

    def test_doread_error_logged_and_disconnects_others_still_served(self) -> None:
        bad, bad_peer = self.pair("Bad", fail_read=True)
        good, good_peer = self.pair("Good")
        self.reactor.addReader(bad)
        self.reactor.addReader(good)
        bad_peer.send(b"a")
        good_peer.send(b"b")
        self.reactor.doPoll(1)
        self.assertTrue(self.flushLoggedErrors(ZeroDivisionError))  # twice under trial -j
        self.assertEqual(len(bad.lost), 1)
        self.assertTrue(bad.lost[0].check(ZeroDivisionError))
        self.assertNotIn(bad.fileno(), self.reactor._selectables)
        self.assertEqual(good.reads, [b"b"])
        self.assertEqual(good.lost, [])

    def test_connection_lost_error_logged_with_prefix_batch_goes_on(self) -> None:
        """What _doReadOrWrite lets through (connectionLost raising) is logged with the
        selectable's prefix, as callWithLogger did, and the rest of the batch is served."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        bad, bad_peer = self.pair("Bad,7,127.0.0.1", fail_read=True, fail_lost=True)
        good, good_peer = self.pair("Good")
        self.reactor.addReader(bad)
        self.reactor.addReader(good)
        bad_peer.send(b"a")
        good_peer.send(b"b")
        self.reactor.doPoll(1)
        # Flushed before asserting (a failed assertion must not leave them logged); under
        # trial -j each is observed twice, hence no exact count.
        read_errors = self.flushLoggedErrors(ZeroDivisionError)
        lost_errors = self.flushLoggedErrors(ValueError)
        self.assertTrue(read_errors)
        self.assertTrue(lost_errors)
        systems = [e.get("log_system") for e in events
                   if "log_failure" in e and e["log_failure"].check(ValueError)]
        self.assertEqual(systems, ["Bad,7,127.0.0.1"])
        self.assertEqual(good.reads, [b"b"])

    def test_keyboard_interrupt_propagates(self) -> None:
        sel, peer = self.pair("K")

        def interrupt(*args: Any) -> None:
            raise KeyboardInterrupt

        self.reactor.addReader(sel)
        self.reactor._doReadOrWrite = interrupt  # type: ignore[method-assign]
        peer.send(b"k")
        self.assertRaises(KeyboardInterrupt, self.reactor.doPoll, 1)

    def test_no_event_returns_after_timeout(self) -> None:
        sel, _ = self.pair("Idle")
        self.reactor.addReader(sel)
        self.reactor.doPoll(0)
        self.assertEqual(sel.reads, [])


class InstallTests(unittest.TestCase):
    def test_twistd_reactor_option_installs_it(self) -> None:
        """``--reactor hbonex-epoll`` as twistd parses it, in a fresh interpreter."""
        probe = ("from twisted.scripts.twistd import ServerOptions\n"
                 "ServerOptions().opt_reactor('hbonex-epoll')\n"
                 "from twisted.internet import reactor\n"
                 "print(type(reactor).__module__, type(reactor).__name__)\n")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split(), ["hbonex.epollreactor", "DirectEPollReactor"])


REACTOR_LINE = r"reactor class: (\S+)\."


class TwistdDefaultReactorTests(unittest.TestCase):
    """Plain ``twistd hbone-server`` runs on DirectEPollReactor (hbonex/cli/tap_common.py
    installs it while parsing the plugin's options); ``--reactor`` still wins; the workers of
    ``--workers N`` run on it too."""

    def setUp(self) -> None:
        from tests.support import make_pki

        self.pki = make_pki(self)

    @e2e
    async def test_plain_twistd_runs_on_it(self) -> None:
        from tests.support import start_twistd

        server = await start_twistd(self, "hbone-server",
                                    ["--listen", "127.0.0.1:0", *self.pki.args("server")])
        m = await server.wait_for(REACTOR_LINE)
        self.assertEqual(m.group(1), "hbonex.epollreactor.DirectEPollReactor")

    @e2e
    async def test_reactor_option_wins(self) -> None:
        from tests.support import start_twistd

        server = await start_twistd(self, "hbone-server",
                                    ["--listen", "127.0.0.1:0", *self.pki.args("server")],
                                    twistd_options=["--reactor=epoll"])
        m = await server.wait_for(REACTOR_LINE)
        self.assertEqual(m.group(1), "twisted.internet.epollreactor.EPollReactor")

    @e2e
    async def test_workers_run_on_it(self) -> None:
        from tests.support import start_twistd

        server = await start_twistd(self, "hbone-server",
                                    ["--listen", "127.0.0.1:0", "--workers", "2",
                                     *self.pki.args("server")])
        found = await server.wait_for_count(REACTOR_LINE, 3)  # supervisor + 2 workers
        self.assertEqual({m.group(1) for m in found},
                         {"hbonex.epollreactor.DirectEPollReactor"})

    @e2e
    async def test_workers_get_the_reactor_option(self) -> None:
        from tests.support import start_twistd

        server = await start_twistd(self, "hbone-server",
                                    ["--listen", "127.0.0.1:0", "--workers", "2",
                                     *self.pki.args("server")], twistd_options=["--reactor=epoll"])
        found = await server.wait_for_count(REACTOR_LINE, 3)  # supervisor + 2 workers
        self.assertEqual([m.group(1) for m in found],
                         ["twisted.internet.epollreactor.EPollReactor"] * 3)
