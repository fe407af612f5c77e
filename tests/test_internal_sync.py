"""
Internal connections deliver a write at once when nothing is queued (once both protocols are
connected), and otherwise as before: order kept, no dataReceived re-entered, two protocols
echoing each other never recursing deeper than one level or looping within one turn, EOF on a
later turn, the reader's pause and the writer's producer as for queued delivery.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import error as ierror
from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.network.internal import InternalListenerRegistry, InternalTransport
from hbonex.upstream.cluster import InternalAddress
from tests.fakes import FakeProducer, HalfCloseProtocol
from tests.test_internal import FakeListener


class Tracing(HalfCloseProtocol):
    """Records every delivery and how deeply dataReceived calls were nested (all instances)."""

    depth = [0]
    deepest = [0]

    def __init__(self, on_data: Callable[[Tracing, bytes], None] | None = None) -> None:
        super().__init__()
        self.on_data = on_data
        self.events: list[str] = []
        self.nested = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        if self.events and self.events[-1] == "in":
            self.nested = True
        self.events.append("in")
        Tracing.depth[0] += 1
        Tracing.deepest[0] = max(Tracing.deepest[0], Tracing.depth[0])
        try:
            super().dataReceived(data)
            if self.on_data is not None:
                self.on_data(self, data)
        finally:
            Tracing.depth[0] -= 1
            self.events.append("out")


class Turns:
    """
    A reactor's callLater as a real reactor runs it: a call made during a turn runs on the
    next one (task.Clock.advance(0) would run it in the same advance, forever for two echoes).
    """

    def __init__(self) -> None:
        self.calls: list[Callable[[], Any]] = []

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> None:
        self.calls.append(lambda: f(*args))

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for call in calls:
            call()


def connect(
    client_protocol: Any = None, server_protocol: Any = None, clock: Any = None,
) -> tuple[Any, InternalTransport, InternalTransport, Any, Any]:
    Tracing.depth[0] = Tracing.deepest[0] = 0
    clock = clock if clock is not None else Clock()
    registry = InternalListenerRegistry()
    registry.buffer_size = 10
    sp = server_protocol or Tracing()
    cp = client_protocol or Tracing()
    registry.register("waypoint", FakeListener(clock, sp))
    registry.connect(InternalAddress("waypoint", "ep"), cp)
    return clock, cp.transport, sp.transport, cp, sp


def echo(protocol: Tracing, data: bytes) -> None:
    protocol.transport.write(data)  # type: ignore[union-attr]


class SyncDeliveryTests(unittest.TestCase):
    def test_delivered_at_once_when_nothing_is_queued(self) -> None:
        clock, client, server, cp, sp = connect()
        client.write(b"hello")
        self.assertEqual(sp.received, [b"hello"])
        server.write(b"back")
        self.assertEqual(cp.received, [b"back"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bulk_writes_wait_a_turn_and_keep_order(self) -> None:
        # Past SYNC_MAX a write is queued (coalesced for the reader); a small write after it
        # queues behind it.
        from hbonex.network.internal import SYNC_MAX

        clock, client, server, cp, sp = connect()
        server.other.buffer_size = server.buffer_size = 10 * SYNC_MAX  # no pause here
        big = b"x" * (SYNC_MAX + 1)
        client.write(big)
        client.write(b"small")
        self.assertEqual(sp.received, [])
        clock.advance(0)
        self.assertEqual(sp.received, [big + b"small"])
        client.write(b"y" * SYNC_MAX)
        self.assertEqual(sp.received[-1], b"y" * SYNC_MAX)

    def test_writes_before_both_ends_are_connected_wait_a_turn(self) -> None:
        # The listener's protocol greets in connectionMade, before the connecting side's
        # protocol is connected: the greeting must not arrive before its connectionMade.
        class Greeter(Tracing):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.transport.write(b"greeting")  # type: ignore[union-attr]

        clock, client, server, cp, sp = connect(server_protocol=Greeter())
        self.assertEqual(cp.events, ["made"])
        clock.advance(0)
        self.assertEqual(cp.events, ["made", "in", "out"])
        self.assertEqual(cp.data, b"greeting")

    def test_write_from_inside_data_received_keeps_order_without_nesting(self) -> None:
        # The server's protocol, handed b"1", makes the client write b"2" to it; the caller
        # then writes b"3": the server sees 1, then 2 and 3 on the next turn, never nested.
        def more(protocol: Tracing, data: bytes) -> None:
            if data == b"1":
                client.write(b"2")

        clock, client, server, cp, sp = connect(server_protocol=Tracing(more))
        client.write(b"1")
        self.assertEqual(sp.received, [b"1"])
        client.write(b"3")
        self.assertEqual(sp.received, [b"1"])
        clock.advance(0)
        self.assertEqual(sp.received, [b"1", b"23"])
        self.assertFalse(sp.nested)

    def test_two_echoes_recurse_one_level_and_yield_every_turn(self) -> None:
        turns = Turns()
        _, client, server, cp, sp = connect(Tracing(echo), Tracing(echo), turns)
        client.write(b"ping")
        # server got it, echoed to the client (at once), whose echo waits for the next turn.
        self.assertEqual((sp.received, cp.received), ([b"ping"], [b"ping"]))
        self.assertEqual(Tracing.deepest[0], 2)
        self.assertEqual(len(turns.calls), 1)
        for turn in range(2, 6):
            turns.turn()
            self.assertEqual((len(sp.received), len(cp.received)), (turn, turn))
            self.assertEqual(len(turns.calls), 1)
        self.assertEqual(Tracing.deepest[0], 2)
        self.assertFalse(sp.nested or cp.nested)
        self.assertEqual(sp.data, b"ping" * 5)

    def test_paused_reader_queues_and_pauses_the_writer(self) -> None:
        clock, client, server, cp, sp = connect()
        producer = FakeProducer()
        client.registerProducer(producer, True)
        server.pauseProducing()
        client.write(b"01234")
        client.write(b"56789-over")
        self.assertEqual(sp.received, [])
        self.assertEqual(producer.state, "paused")
        server.resumeProducing()
        self.assertEqual(sp.received, [])
        clock.advance(0)
        self.assertEqual(sp.received, [b"0123456789-over"])
        self.assertEqual(producer.state, "producing")
        # Nothing queued any more: back to delivery at once.
        client.write(b"!")
        self.assertEqual(sp.received, [b"0123456789-over", b"!"])

    def test_reader_pausing_inside_data_received_queues_what_follows(self) -> None:
        def pause(protocol: Tracing, data: bytes) -> None:
            server.pauseProducing()

        clock, client, server, cp, sp = connect(server_protocol=Tracing(pause))
        client.write(b"a")
        client.write(b"b")
        clock.advance(0)
        self.assertEqual(sp.received, [b"a"])
        server.resumeProducing()
        clock.advance(0)
        self.assertEqual(sp.received, [b"a", b"b"])

    def test_eof_follows_the_data_on_a_later_turn(self) -> None:
        clock, client, server, cp, sp = connect()
        client.write(b"data")
        client.loseWriteConnection()
        self.assertEqual(sp.data, b"data")
        self.assertFalse(sp.read_lost)
        clock.advance(0)
        self.assertTrue(sp.read_lost)
        server.write(b"answer")
        self.assertEqual(cp.data, b"answer")
        server.loseWriteConnection()
        self.assertTrue(sp.lost_reason.check(ierror.ConnectionDone))
        clock.advance(0)
        self.assertTrue(cp.lost_reason.check(ierror.ConnectionDone))

    def test_reader_aborting_inside_data_received(self) -> None:
        # The receiving side aborts while the writer is still in write(): both ends lost,
        # the writer's later writes dropped.
        def abort(protocol: Tracing, data: bytes) -> None:
            server.abortConnection()

        clock, client, server, cp, sp = connect(server_protocol=Tracing(abort))
        client.write(b"x")
        self.assertTrue(sp.lost_reason.check(ierror.ConnectionAborted))
        self.assertTrue(cp.lost_reason.check(ierror.ConnectionLost))
        client.write(b"y")
        clock.advance(0)
        self.assertEqual(sp.received, [b"x"])
