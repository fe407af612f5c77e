"""Tests for hbonex.network.internal: in-process (internal listener) connections."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.errors import UpstreamError
from hbonex.network.internal import (
    InternalEndpointAddress,
    InternalListenerRegistry,
    InternalTransport,
    internal_pair,
)
from hbonex.upstream.cluster import InternalAddress
from tests.fakes import FakeProducer, HalfCloseProtocol, RecordingProtocol


def connected_pair(
    buffer_size: int = 1024, client_protocol: Any = None, server_protocol: Any = None
) -> tuple[Clock, InternalTransport, InternalTransport, Any, Any]:
    """
    (clock, client transport, server transport, client protocol, server protocol), connected
    as InternalListenerRegistry.connect connects them.
    """
    clock = Clock()
    client, server = internal_pair(clock, "waypoint", "10.0.0.1:80", buffer_size)
    cp = client_protocol or HalfCloseProtocol()
    sp = server_protocol or HalfCloseProtocol()
    server.protocol, client.protocol = sp, cp
    sp.makeConnection(server)
    cp.makeConnection(client)
    return clock, client, server, cp, sp


class DeliveryTests(unittest.TestCase):
    def test_delivery_is_asynchronous(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        client.write(b"hello")
        self.assertEqual(sp.received, [])
        clock.advance(0)
        self.assertEqual(sp.data, b"hello")

    def test_order_preserved_both_ways(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        for chunk in (b"a", b"b", b"c"):
            client.write(chunk)
        client.writeSequence([b"d", b"e"])
        server.write(b"1")
        server.write(b"2")
        clock.advance(0)
        client.write(b"f")
        clock.advance(0)
        self.assertEqual(sp.data, b"abcdef")
        self.assertEqual(cp.data, b"12")
        # Queued writes are coalesced into one dataReceived per turn.
        self.assertEqual(sp.received, [b"abcde", b"f"])

    def test_empty_write_is_ignored(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        client.write(b"")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_addresses_name_the_listener(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        self.assertEqual(server.getHost().host, "envoy://waypoint/10.0.0.1:80")
        self.assertEqual(client.getPeer().host, "envoy://waypoint/10.0.0.1:80")
        self.assertEqual(str(server.getHost()), "envoy://waypoint/10.0.0.1:80")
        self.assertEqual(server.getHost().port, 0)
        self.assertEqual(client.getHost(), server.getPeer())
        self.assertEqual(client.getHost().host, "envoy://internal_client_address/")
        self.assertEqual(InternalEndpointAddress("l", "e"), InternalEndpointAddress("l", "e"))


class HalfCloseTests(unittest.TestCase):
    def test_read_connection_lost(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        client.write(b"request")
        client.loseWriteConnection()
        self.assertFalse(sp.read_lost)
        clock.advance(0)
        self.assertEqual(sp.data, b"request")
        self.assertTrue(sp.read_lost)
        self.assertIsNone(sp.lost_reason)
        # The server can still answer on its open write side.
        server.write(b"response")
        client.write(b"dropped: client's write side is closed")
        clock.advance(0)
        self.assertEqual(cp.data, b"response")
        self.assertEqual(sp.data, b"request")

    def test_both_sides_closed_is_connection_done(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        client.loseWriteConnection()
        clock.advance(0)
        server.write(b"bye")
        server.loseWriteConnection()
        self.assertTrue(sp.lost_reason.check(ierror.ConnectionDone))
        clock.advance(0)
        self.assertEqual(cp.data, b"bye")
        self.assertTrue(cp.read_lost)
        self.assertTrue(cp.lost_reason.check(ierror.ConnectionDone))
        self.assertTrue(client.lost and server.lost)

    def test_non_half_closeable_protocol_loses_connection_at_eof(self) -> None:
        clock, client, server, cp, sp = connected_pair(server_protocol=RecordingProtocol())
        client.write(b"x")
        client.loseWriteConnection()
        clock.advance(0)
        self.assertEqual(sp.data, b"x")
        self.assertTrue(sp.lost_reason.check(ierror.ConnectionDone))
        clock.advance(0)
        self.assertTrue(cp.read_lost)
        self.assertTrue(cp.lost_reason.check(ierror.ConnectionDone))

    def test_lose_connection_drops_later_input(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        server.loseConnection()
        self.assertTrue(server.disconnecting)
        client.write(b"ignored")
        clock.advance(0)
        self.assertEqual(sp.received, [])
        self.assertTrue(cp.read_lost)


class FlowControlTests(unittest.TestCase):
    def test_writer_paused_past_buffer_size_and_resumed_after_delivery(self) -> None:
        clock, client, server, cp, sp = connected_pair(buffer_size=10)
        producer = FakeProducer()
        client.registerProducer(producer, True)
        client.write(b"0123456789")  # exactly the buffer: fine
        self.assertEqual(producer.state, "producing")
        client.write(b"!")
        self.assertEqual(producer.state, "paused")
        clock.advance(0)
        self.assertEqual(sp.data, b"0123456789!")
        self.assertEqual((producer.state, producer.pauses, producer.resumes),
                         ("producing", 1, 1))

    def test_paused_reader_stops_delivery(self) -> None:
        clock, client, server, cp, sp = connected_pair(buffer_size=10)
        producer = FakeProducer()
        client.registerProducer(producer, True)
        server.pauseProducing()
        client.write(b"01234")
        clock.advance(0)
        self.assertEqual(sp.received, [])
        client.write(b"56789-over")
        self.assertEqual(producer.state, "paused")
        clock.advance(0)
        self.assertEqual(sp.received, [])
        self.assertEqual(producer.state, "paused")
        server.resumeProducing()
        self.assertEqual(sp.received, [])  # still one reactor turn away
        clock.advance(0)
        self.assertEqual(sp.data, b"0123456789-over")
        self.assertEqual(producer.state, "producing")

    def test_register_producer_on_full_buffer_pauses_at_once(self) -> None:
        clock, client, server, cp, sp = connected_pair(buffer_size=4)
        client.write(b"too much")
        producer = FakeProducer()
        client.registerProducer(producer, True)
        self.assertEqual(producer.state, "paused")
        self.assertRaises(RuntimeError, client.registerProducer, FakeProducer(), True)

    def test_eof_waits_for_paused_reader(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        server.pauseProducing()
        client.write(b"data")
        client.loseWriteConnection()
        clock.advance(0)
        self.assertFalse(sp.read_lost)
        server.resumeProducing()
        clock.advance(0)
        self.assertEqual(sp.data, b"data")
        self.assertTrue(sp.read_lost)


class AbortTests(unittest.TestCase):
    def test_abort_loses_both_sides_with_errors(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        producer = FakeProducer()
        server.registerProducer(producer, True)
        client.write(b"never delivered")
        client.abortConnection()
        self.assertTrue(cp.lost_reason.check(ierror.ConnectionAborted))
        self.assertTrue(sp.lost_reason.check(ierror.ConnectionLost))
        self.assertEqual(producer.state, "stopped")
        clock.advance(0)
        self.assertEqual(sp.received, [])
        self.assertTrue(client.lost and server.lost)

    def test_stop_producing_aborts(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        server.stopProducing()
        self.assertTrue(sp.lost_reason.check(ierror.ConnectionAborted))
        self.assertTrue(cp.lost_reason.check(ierror.ConnectionLost))

    def test_writes_after_loss_are_dropped(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        client.abortConnection()
        server.write(b"x")
        client.write(b"y")
        clock.advance(0)
        self.assertEqual((cp.received, sp.received), ([], []))

    def test_register_producer_after_loss_stops_it(self) -> None:
        clock, client, server, cp, sp = connected_pair()
        client.abortConnection()
        producer = FakeProducer()
        client.registerProducer(producer, True)
        self.assertEqual(producer.state, "stopped")


class OneProtocolFactory(Factory):
    """Builds ``protocol`` (None: refuses the connection, as a listener with no chain does)."""

    def __init__(self, protocol: Any) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol_instance


class FakeListener:
    def __init__(self, reactor: Any, protocol: Any) -> None:
        self.reactor = reactor
        self.factory = OneProtocolFactory(protocol)


class RegistryTests(unittest.TestCase):
    def test_unknown_listener_is_503(self) -> None:
        registry = InternalListenerRegistry()
        d = registry.connect(InternalAddress("nowhere"), RecordingProtocol())
        failure = self.failureResultOf(d, UpstreamError)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("nowhere", failure.value.reason)

    def test_connect_to_registered_listener(self) -> None:
        clock = Clock()
        registry = InternalListenerRegistry()
        server_protocol = HalfCloseProtocol()
        registry.register("waypoint", FakeListener(clock, server_protocol))
        self.assertEqual(registry.names(), ["waypoint"])
        client_protocol = HalfCloseProtocol()
        request = object()
        d = registry.connect(InternalAddress("waypoint", "ep1"), client_protocol, request)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(server_protocol.made and client_protocol.made)
        self.assertIs(server_protocol.transport.upstream_request, request)
        self.assertEqual(server_protocol.transport.getHost().host, "envoy://waypoint/ep1")
        client_protocol.transport.write(b"hi")
        clock.advance(0)
        self.assertEqual(server_protocol.data, b"hi")
        registry.unregister("waypoint")
        failure = self.failureResultOf(
            registry.connect(InternalAddress("waypoint"), RecordingProtocol()), UpstreamError
        )
        self.assertEqual(failure.value.status, 503)

    def test_listener_refusing_is_503(self) -> None:
        registry = InternalListenerRegistry()
        registry.register("closed", FakeListener(Clock(), None))
        failure = self.failureResultOf(
            registry.connect(InternalAddress("closed"), RecordingProtocol()), UpstreamError
        )
        self.assertEqual(failure.value.status, 503)
