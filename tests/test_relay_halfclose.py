"""
Relay half-close with a transport that cannot half-close: the tunnel stays open until both
directions are done (or the idle timeout), never cut while the other direction has bytes.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hbonex.network.relay import Relay
from tests.fakes import HalfCloseTransport


class NoHalfCloseTransport(StringTransport):
    """Has no loseWriteConnection (like Twisted's own TLS transport)."""

    def unregisterProducer(self) -> None:
        self.producer = None


class CannotHalfCloseTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.done: list[Relay] = []
        self.relay = Relay(self.clock, idle_timeout=60, on_done=self.done.append)
        self.ta = HalfCloseTransport()
        self.tb = NoHalfCloseTransport()
        self.relay.a.makeConnection(self.ta)
        self.relay.b.makeConnection(self.tb)
        self.relay.start()

    def test_eof_towards_it_keeps_the_other_direction_open(self) -> None:
        self.relay.a.dataReceived(b"request")
        self.relay.a.readConnectionLost()
        # b cannot be told EOF: it stays open and its reply still flows back.
        self.assertFalse(self.tb.disconnecting)
        self.relay.b.dataReceived(b"reply")
        self.assertEqual((self.tb.value(), self.ta.value()), (b"request", b"reply"))
        # Its own EOF then ends both directions.
        self.relay.b.readConnectionLost()
        self.assertTrue(self.ta.write_closed)
        self.assertTrue(self.tb.disconnecting)

    def test_idle_timeout_ends_it(self) -> None:
        self.relay.a.readConnectionLost()
        self.clock.advance(61)
        self.assertTrue(self.ta.aborted)
        self.assertEqual(self.relay.close_reason, "idle timeout (60s)")
