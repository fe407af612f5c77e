"""
The process-wide downstream connection limit (Envoy's overload manager
``downstream_connections``): refused at accept, counted, existing connections untouched.
"""

from __future__ import annotations

from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from hbonex.network.listener import FilterChain, Listener
from hbonex.network.overload import DownstreamLimit


class Terminal:
    def __init__(self) -> None:
        self.protocol = Protocol()

    def onNewConnection(self, callbacks: object) -> bool:
        callbacks.takeOver(self.protocol)  # type: ignore[attr-defined]
        return False

    def onData(self, data: bytes, endStream: bool) -> bool:
        return True

    def onClose(self, reason: object) -> None:
        pass


def accept(listener: Listener, port: int) -> Protocol | None:
    protocol = listener.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    if protocol is not None:
        protocol.makeConnection(StringTransport())
    return protocol


class DownstreamLimitTests(unittest.TestCase):
    def test_refused_past_the_limit_and_admitted_again_after_a_close(self) -> None:
        limit = DownstreamLimit(2)
        a = Listener("a", Clock(), [FilterChain([Terminal])])
        b = Listener("b", Clock(), [FilterChain([Terminal])])
        a.downstream_limit = b.downstream_limit = limit  # one count for the process
        first, second = accept(a, 1), accept(b, 2)
        self.assertIsNotNone(first)
        self.assertIsNotNone(second)
        self.assertIsNone(accept(a, 3))
        self.assertIsNone(accept(b, 4))
        self.assertEqual((limit.active, limit.overflow), (2, 2))
        self.assertEqual((a.connections_refused, b.connections_refused), (1, 1))
        assert first is not None
        first.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(limit.active, 1)
        self.assertIsNotNone(accept(a, 5))
        self.assertEqual(limit.active, 2)

    def test_no_limit(self) -> None:
        limit = DownstreamLimit(0)
        listener = Listener("a", Clock(), [FilterChain([Terminal])])
        listener.downstream_limit = limit
        for port in range(50):
            self.assertIsNotNone(accept(listener, port))
        self.assertEqual((limit.active, limit.overflow), (50, 0))
