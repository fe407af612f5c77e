"""
Tests for hbonex.h2.connection (H2Stream, H2TunnelConnection) driven through an
H2TunnelServer and an H2TunnelClient connected in memory, with a fake upstream cluster.
"""

from __future__ import annotations

from typing import Any

import attrs
import h2.settings
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from hbonex.errors import UpstreamError
from hbonex.h2.connection import (
    CLOSE_GRACE,
    STREAM_HIGH_WATER,
    STREAM_LOW_WATER,
    ConnectionClosed,
    ConnectionState,
    H2Stream,
    H2TunnelConnection,
    StreamReset,
)
from hbonex.h2.settings import H2Settings, KiB, MiB
from hbonex.http.routing import ConnectRouter, Route, RouteConfig, VirtualHost
from hbonex.interfaces import IHalfCloseableTransport
from hbonex.network.listener import ConnectionInfo
from hbonex.tunnel.client import H2TunnelClient
from hbonex.tunnel.server import H2TunnelServer, TunnelLog
from hbonex.upstream.cluster import SocketAddress
from tests.fakes import FakeProducer, HalfCloseProtocol, HalfCloseTransport, RecordingProtocol

SETTINGS = H2Settings()
INFO = ConnectionInfo(
    listenerName="hbone",
    remoteAddress="10.0.0.2:40000",
    localAddress="10.0.0.1:15008",
    peerIdentity="spiffe://cluster.local/ns/default/sa/client",
)


@attrs.define
class PendingUpstream:
    """One upstream connection the server asked the fake cluster for."""

    protocol: Any
    request: Any
    deferred: defer.Deferred[Any] = attrs.field(init=False)
    cancelled: bool = False

    def __attrs_post_init__(self) -> None:
        self.deferred = defer.Deferred(self._cancel)

    def _cancel(self, d: defer.Deferred[Any]) -> None:
        self.cancelled = True

    def connect(self) -> HalfCloseTransport:
        transport = HalfCloseTransport()
        self.protocol.makeConnection(transport)
        self.deferred.callback(SocketAddress("127.0.0.1", 8080))
        return transport


class FakeCluster:
    """``connect_stream`` hands out Deferreds the test fires (PendingUpstream.connect)."""

    name = "fake"

    def __init__(self) -> None:
        self.pending: list[PendingUpstream] = []

    def connect_stream(self, protocol: Any, request: Any) -> defer.Deferred[Any]:
        pending = PendingUpstream(protocol, request)
        self.pending.append(pending)
        return pending.deferred


@attrs.define
class Tunnel:
    stream: H2Stream  # client side
    protocol: Any  # attached to the client stream
    server_stream: H2Stream
    upstream: HalfCloseTransport  # the server's connection to the target
    upstream_protocol: Any  # the relay end on that connection


def result_of(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has no result"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class H2Pair:
    """
    An H2TunnelServer and an H2TunnelClient over two StringTransports; ``pump()`` shuttles
    bytes until both are quiet and records every frame in ``to_server`` / ``to_client``.
    """

    def __init__(
        self,
        router: Any = None,
        server_settings: H2Settings = SETTINGS,
        client_settings: H2Settings = SETTINGS,
    ) -> None:
        self.clock = Clock()
        self.cluster = FakeCluster()
        self.tunnels = TunnelLog()
        self.server = H2TunnelServer(
            server_settings, self.clock, router or ConnectRouter(self.cluster), INFO,
            self.tunnels,
        )
        self.client = H2TunnelClient(client_settings, self.clock)
        #: Response headers by stream id, as the client received them.
        self.responses: dict[int, dict[bytes, bytes]] = {}
        record = self.client.response_received

        def response_received(event: Any) -> None:
            self.responses[event.stream_id] = dict(event.headers)
            record(event)

        self.client.response_received = response_received  # type: ignore[method-assign]
        self.server_transport = HalfCloseTransport()
        self.client_transport = HalfCloseTransport()
        self.to_server: list[Frame] = []
        self.to_client: list[Frame] = []
        self._server_frames = FrameBuffer(server=True)
        self._client_frames = FrameBuffer(server=False)
        for buffer in (self._server_frames, self._client_frames):
            buffer.max_frame_size = 2**24 - 1
        self.server.makeConnection(self.server_transport)
        self.client.makeConnection(self.client_transport)
        self.client.handshakeCompleted()  # the TLS handshake, in real life
        self.pump()

    def pump(self) -> None:
        for _ in range(10000):
            to_server = self.client_transport.value()
            to_client = self.server_transport.value()
            if not to_server and not to_client:
                return
            self.client_transport.clear()
            self.server_transport.clear()
            if to_server:
                self._server_frames.add_data(to_server)
                self.to_server.extend(self._server_frames)
                self.server.dataReceived(to_server)
            if to_client:
                self._client_frames.add_data(to_client)
                self.to_client.extend(self._client_frames)
                self.client.dataReceived(to_client)
        raise AssertionError("the connections never went quiet")

    def request_tunnel(self, authority: str = "127.0.0.1:8080") -> defer.Deferred[Any]:
        d = self.client.open_tunnel(authority, [("x-test", "1")])
        self.pump()
        return d

    def open_tunnel(self, protocol: Any = None, authority: str = "127.0.0.1:8080") -> Tunnel:
        d = self.request_tunnel(authority)
        pending = self.cluster.pending.pop(0)
        upstream = pending.connect()
        self.pump()
        stream, headers = result_of(d)
        assert headers[b":status"] == b"200", headers
        protocol = protocol if protocol is not None else HalfCloseProtocol()
        stream.attach(protocol)
        return Tunnel(stream, protocol, self.server.streams[stream.stream_id], upstream,
                      pending.protocol)

    def send_raw_request(self, headers: list[tuple[bytes, bytes]], end: bool = False) -> int:
        """Send request headers the client's h2 would refuse to send; return the stream id."""
        conn = self.client.conn
        sid = conn.get_next_available_stream_id()
        config = conn.config
        saved = config.validate_outbound_headers, config.normalize_outbound_headers
        config.validate_outbound_headers = config.normalize_outbound_headers = False
        try:
            conn.send_headers(sid, headers, end_stream=end)
        finally:
            config.validate_outbound_headers, config.normalize_outbound_headers = saved
        self.client._flush()
        self.pump()
        return sid


def frames(recorded: list[Frame], kind: type, stream_id: int | None = None) -> list[Any]:
    return [
        f for f in recorded
        if isinstance(f, kind) and (stream_id is None or f.stream_id == stream_id)
    ]


def reason_of(protocol: Any) -> Failure:
    assert protocol.lost_reason is not None, "connectionLost was not called"
    return protocol.lost_reason  # type: ignore[no-any-return]


class SettingsTests(unittest.TestCase):
    def test_settings_advertised(self) -> None:
        pair = H2Pair()
        codes = h2.settings.SettingCodes
        for conn in (pair.client, pair.server):
            remote = conn.conn.remote_settings
            self.assertEqual(remote[codes.INITIAL_WINDOW_SIZE], 4 * MiB)
            self.assertEqual(remote[codes.MAX_FRAME_SIZE], 1 * MiB)
            self.assertEqual(remote[codes.MAX_CONCURRENT_STREAMS], 200)
            self.assertEqual(remote[codes.MAX_HEADER_LIST_SIZE], 60 * KiB)
            self.assertEqual(remote[codes.ENABLE_PUSH], 0)
            # The connection window was raised from 64 KiB to 16 MiB with a WINDOW_UPDATE.
            self.assertEqual(conn.conn.outbound_flow_control_window, 16 * MiB)
        self.assertEqual(pair.client.conn.remote_settings[codes.ENABLE_CONNECT_PROTOCOL], 1)
        self.assertEqual(pair.client.peer_max_concurrent_streams, 200)
        self.assertEqual(pair.client.capacity, 200)
        for recorded in (pair.to_client, pair.to_server):
            updates = frames(recorded, WindowUpdateFrame, 0)
            self.assertEqual([f.window_increment for f in updates], [16 * MiB - 65535])
            self.assertTrue(frames(recorded, SettingsFrame))

    def test_client_sends_nothing_before_handshake(self) -> None:
        client = H2TunnelClient(SETTINGS, Clock())
        transport = HalfCloseTransport()
        client.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(client.ready.called)
        client.handshakeCompleted()
        self.assertTrue(transport.value().startswith(b"PRI * HTTP/2.0"))

    def test_ready_after_server_settings(self) -> None:
        pair = H2Pair()
        self.assertIs(result_of(pair.client.ready), pair.client)

    def test_connection_is_the_transports_push_producer(self) -> None:
        pair = H2Pair()
        self.assertIs(pair.client_transport.producer, pair.client)
        self.assertIs(pair.server_transport.producer, pair.server)
        self.assertTrue(pair.client_transport.streaming)


class StreamInterfaceTests(unittest.TestCase):
    def test_stream_is_a_transport(self) -> None:
        tunnel = H2Pair().open_tunnel()
        for stream in (tunnel.stream, tunnel.server_stream):
            self.assertTrue(verifyObject(IHalfCloseableTransport, stream))
            self.assertTrue(verifyObject(ITransport, stream))
            self.assertTrue(verifyObject(IConsumer, stream))
            self.assertTrue(verifyObject(IPushProducer, stream))

    def test_addresses_are_the_connections(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        self.assertEqual(tunnel.stream.getPeer(), pair.client_transport.getPeer())
        self.assertEqual(tunnel.stream.getHost(), pair.client_transport.getHost())

    def test_one_producer_at_a_time(self) -> None:
        tunnel = H2Pair().open_tunnel()
        tunnel.stream.registerProducer(FakeProducer(), True)
        self.assertRaises(RuntimeError, tunnel.stream.registerProducer, FakeProducer(), True)
        tunnel.stream.unregisterProducer()
        self.assertRaises(ValueError, tunnel.stream.registerProducer, FakeProducer(), False)


class DataTests(unittest.TestCase):
    def test_bytes_flow_both_ways(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.write(b"ping ")
        tunnel.stream.writeSequence([b"from ", b"client"])
        pair.pump()
        self.assertEqual(tunnel.upstream.value(), b"ping from client")
        tunnel.upstream_protocol.dataReceived(b"pong")
        pair.pump()
        self.assertEqual(tunnel.protocol.data, b"pong")
        self.assertEqual((tunnel.stream.bytes_sent, tunnel.stream.bytes_received), (16, 4))

    def test_large_write_is_split_into_max_frame_size_frames(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        payload = bytes(range(256)) * (10 * 1024)  # 2.5 MiB
        tunnel.stream.write(payload)
        pair.pump()
        self.assertEqual(tunnel.upstream.value(), payload)
        sizes = [len(f.data) for f in frames(pair.to_server, DataFrame, tunnel.stream.stream_id)]
        self.assertEqual(max(sizes), 1 * MiB)
        self.assertEqual(sum(sizes), len(payload))

    def test_many_tunnels_on_one_connection(self) -> None:
        pair = H2Pair()
        tunnels = [pair.open_tunnel() for _ in range(5)]
        for i, tunnel in enumerate(tunnels):
            tunnel.stream.write(b"%d" % i)
        pair.pump()
        self.assertEqual([t.upstream.value() for t in tunnels], [b"0", b"1", b"2", b"3", b"4"])
        self.assertEqual(len(pair.client.streams), 5)
        self.assertEqual(pair.client.capacity, 195)


class ReceiveFlowControlTests(unittest.TestCase):
    def test_paused_stream_buffers_without_acknowledging(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        sid = tunnel.stream.stream_id
        window = pair.server.conn.local_flow_control_window(sid)
        self.assertEqual(window, 4 * MiB)
        tunnel.stream.pauseProducing()
        seen = len(pair.to_server)
        payload = bytes(range(256)) * (16 * 1024)  # the whole 4 MiB window
        tunnel.upstream_protocol.dataReceived(payload)
        pair.pump()
        self.assertEqual(tunnel.protocol.received, [])
        self.assertEqual(tunnel.stream.bytes_received, len(payload))
        # Nothing acknowledged: no WINDOW_UPDATE, the sender's window shrank.
        self.assertEqual(frames(pair.to_server[seen:], WindowUpdateFrame), [])
        self.assertEqual(pair.server.conn.local_flow_control_window(sid), window - len(payload))

        tunnel.stream.resumeProducing()
        self.assertEqual(tunnel.protocol.data, payload)
        pair.pump()
        # Delivered data is acknowledged (h2 batches WINDOW_UPDATEs by half windows).
        updates = frames(pair.to_server[seen:], WindowUpdateFrame, sid)
        reopened = pair.server.conn.local_flow_control_window(sid)
        self.assertEqual(reopened, sum(f.window_increment for f in updates))
        self.assertGreaterEqual(reopened, window // 2)

    def test_sender_stops_at_the_window(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.pauseProducing()
        payload = b"x" * (4 * MiB + 1000)
        tunnel.upstream_protocol.dataReceived(payload)
        pair.pump()
        self.assertEqual(tunnel.server_stream.bytes_sent, 4 * MiB)
        self.assertEqual(tunnel.stream.bytes_received, 4 * MiB)
        tunnel.stream.resumeProducing()
        pair.pump()
        self.assertEqual(tunnel.protocol.data, payload)

    def test_data_while_paused_is_delivered_in_order(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.upstream_protocol.dataReceived(b"1")
        pair.pump()
        tunnel.stream.pauseProducing()
        for chunk in (b"2", b"3", b"4"):
            tunnel.upstream_protocol.dataReceived(chunk)
            pair.pump()
        self.assertEqual(tunnel.protocol.received, [b"1"])
        tunnel.stream.resumeProducing()
        tunnel.upstream_protocol.dataReceived(b"5")
        pair.pump()
        self.assertEqual(tunnel.protocol.received, [b"1", b"2", b"3", b"4", b"5"])

    def test_eof_waits_for_buffered_data(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.pauseProducing()
        tunnel.upstream_protocol.dataReceived(b"last")
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        self.assertFalse(tunnel.protocol.read_lost)
        tunnel.stream.resumeProducing()
        self.assertEqual(tunnel.protocol.data, b"last")
        self.assertTrue(tunnel.protocol.read_lost)


class SendFlowControlTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pair = H2Pair()
        self.tunnel = self.pair.open_tunnel()
        self.sid = self.tunnel.stream.stream_id
        self.producer = FakeProducer()
        self.tunnel.stream.registerProducer(self.producer, True)
        # The target is slow: the relay pauses the server's stream, which stops acknowledging.
        self.assertIs(self.tunnel.upstream.producer.transport, self.tunnel.server_stream)
        self.tunnel.upstream.producer.pauseProducing()

    def open_window(self, increment: int) -> None:
        self.pair.server.conn.increment_flow_control_window(increment, stream_id=self.sid)
        self.pair.server._flush()
        self.pair.pump()

    def test_write_beyond_window_queues_and_pauses_past_high_water(self) -> None:
        stream = self.tunnel.stream
        window = self.pair.client.conn.local_flow_control_window(self.sid)
        stream.write(b"a" * window)
        stream.write(b"b" * STREAM_HIGH_WATER)
        self.assertEqual(self.producer.state, "producing")  # at, not past, the mark
        stream.write(b"c")
        self.assertEqual(self.producer.state, "paused")
        self.assertEqual(stream.bytes_sent, window)
        self.pair.pump()
        self.assertEqual(self.pair.client.conn.local_flow_control_window(self.sid), 0)
        self.assertEqual(self.producer.state, "paused")

        # Drained to just above the low-water mark: still paused.
        self.open_window(STREAM_HIGH_WATER + 1 - STREAM_LOW_WATER - 1)
        self.assertEqual(self.producer.state, "paused")
        # At the low-water mark: resumed.
        self.open_window(1)
        self.assertEqual((self.producer.state, self.producer.pauses, self.producer.resumes),
                         ("producing", 1, 1))

    def test_window_update_from_consumer_resumes_and_delivers_in_order(self) -> None:
        stream = self.tunnel.stream
        payload = bytes(range(256)) * ((4 * MiB + STREAM_HIGH_WATER + 4096) // 256)
        stream.write(payload)
        self.assertEqual(self.producer.state, "paused")
        self.pair.pump()
        self.assertEqual(self.tunnel.upstream.value(), b"")
        self.tunnel.upstream.producer.resumeProducing()  # the target reads again
        self.pair.pump()
        self.assertEqual(self.producer.state, "producing")
        self.assertEqual(self.tunnel.upstream.value(), payload)
        self.assertEqual(stream.bytes_sent, len(payload))

    def test_end_stream_waits_for_queued_data(self) -> None:
        stream = self.tunnel.stream
        window = self.pair.client.conn.local_flow_control_window(self.sid)
        stream.write(b"q" * (window + 10))
        stream.loseWriteConnection()
        stream.write(b"after EOF is dropped")
        self.pair.pump()
        self.assertFalse(self.tunnel.upstream.write_closed)
        self.tunnel.upstream.producer.resumeProducing()
        self.pair.pump()
        self.assertEqual(self.tunnel.upstream.value(), b"q" * (window + 10))
        self.assertTrue(self.tunnel.upstream.write_closed)
        ends = [f for f in frames(self.pair.to_server, DataFrame, self.sid)
                if "END_STREAM" in f.flags]
        self.assertEqual(len(ends), 1)


class FanInTests(unittest.TestCase):
    def test_connection_pause_pauses_every_stream_producer(self) -> None:
        pair = H2Pair()
        tunnels = [pair.open_tunnel() for _ in range(3)]
        producers = [FakeProducer() for _ in tunnels]
        for tunnel, producer in zip(tunnels, producers, strict=True):
            tunnel.stream.registerProducer(producer, True)
        pair.client.pauseProducing()  # the TLS transport's buffer is full
        self.assertEqual([p.state for p in producers], ["paused"] * 3)
        # A producer registered while the socket is full is paused at once.
        late = pair.open_tunnel()
        late_producer = FakeProducer()
        late.stream.registerProducer(late_producer, True)
        self.assertEqual(late_producer.state, "paused")
        pair.client.resumeProducing()
        self.assertEqual([p.state for p in producers + [late_producer]], ["producing"] * 4)

    def test_resume_keeps_streams_above_high_water_paused(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.upstream.producer.pauseProducing()
        producer = FakeProducer()
        tunnel.stream.registerProducer(producer, True)
        tunnel.stream.write(b"z" * (4 * MiB + STREAM_HIGH_WATER + 1))
        other = pair.open_tunnel()
        other_producer = FakeProducer()
        other.stream.registerProducer(other_producer, True)
        pair.client.pauseProducing()
        pair.client.resumeProducing()
        self.assertEqual(producer.state, "paused")
        self.assertEqual(other_producer.state, "producing")

    def test_stop_producing_leaves_the_reason_to_connection_lost(self) -> None:
        """
        A transport calls stopProducing just before connectionLost: the streams are told the
        real reason then, not a made-up one now.
        """
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        pair.client.stopProducing()
        self.assertIsNone(tunnel.protocol.lost_reason)
        pair.client.connectionLost(Failure(ierror.ConnectionLost("socket reset")))
        reason = reason_of(tunnel.protocol)
        self.assertTrue(reason.check(ConnectionClosed))
        self.assertIn("socket reset", reason.getErrorMessage())


class HalfCloseTests(unittest.TestCase):
    def test_half_close_both_ways(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        sid = tunnel.stream.stream_id
        tunnel.stream.write(b"request")
        tunnel.stream.loseWriteConnection()
        pair.pump()
        last = frames(pair.to_server, DataFrame, sid)[-1]
        self.assertIn("END_STREAM", last.flags)
        self.assertEqual(tunnel.upstream.value(), b"request")
        self.assertTrue(tunnel.upstream.write_closed)  # the relay forwarded the EOF
        self.assertFalse(tunnel.protocol.read_lost)
        self.assertIsNone(tunnel.protocol.lost_reason)

        tunnel.upstream_protocol.dataReceived(b"response")
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        self.assertEqual(tunnel.protocol.data, b"response")
        self.assertTrue(tunnel.protocol.read_lost)
        self.assertTrue(reason_of(tunnel.protocol).check(ierror.ConnectionDone))
        self.assertNotIsInstance(reason_of(tunnel.protocol).value, StreamReset)
        self.assertTrue(tunnel.stream.disconnected)
        self.assertEqual(pair.client.streams, {})
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(frames(pair.to_server + pair.to_client, RstStreamFrame, sid), [])
        # The server's relay closes the target connection; when it is gone the tunnel is done.
        self.assertTrue(tunnel.upstream.disconnecting)
        self.assertFalse(tunnel.upstream.aborted)
        self.assertEqual(pair.tunnels.active, 1)
        tunnel.upstream_protocol.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual((pair.tunnels.active, pair.tunnels.opened), (0, 1))

    def test_peer_eof_first(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        self.assertTrue(tunnel.protocol.read_lost)
        self.assertIsNone(tunnel.protocol.lost_reason)
        tunnel.stream.write(b"still open this way")
        pair.pump()
        self.assertEqual(tunnel.upstream.value(), b"still open this way")
        tunnel.stream.loseConnection()
        pair.pump()
        self.assertTrue(reason_of(tunnel.protocol).check(ierror.ConnectionDone))

    def test_protocol_that_cannot_half_close_loses_the_connection_at_eof(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel(protocol=RecordingProtocol())
        tunnel.upstream_protocol.dataReceived(b"bye")
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        self.assertEqual(tunnel.protocol.data, b"bye")
        self.assertTrue(reason_of(tunnel.protocol).check(ierror.ConnectionDone))
        self.assertTrue(tunnel.stream.disconnecting)
        self.assertTrue(tunnel.upstream.write_closed)


class ResetTests(unittest.TestCase):
    def end_then_reset(self, code: int) -> Tunnel:
        """The server sends data, END_STREAM, then RST_STREAM(code) while the client's
        protocol is paused."""
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.pauseProducing()
        tunnel.server_stream.write(b"tail")
        tunnel.server_stream.loseWriteConnection()
        tunnel.server_stream.reset(code)
        pair.pump()
        self.assertEqual(frames(pair.to_client, RstStreamFrame, tunnel.stream.stream_id)[0]
                         .error_code, code)
        self.assertEqual(tunnel.protocol.received, [])
        return tunnel

    def test_clean_reset_after_end_stream(self) -> None:
        for code in (ErrorCodes.NO_ERROR, ErrorCodes.CANCEL):
            tunnel = self.end_then_reset(code)
            self.assertIsNone(tunnel.protocol.lost_reason)  # buffered data comes first
            tunnel.stream.resumeProducing()
            self.assertEqual(tunnel.protocol.data, b"tail")
            self.assertTrue(tunnel.protocol.read_lost)
            reason = reason_of(tunnel.protocol)
            self.assertTrue(reason.check(ierror.ConnectionDone), reason)

    def test_internal_error_after_end_stream_is_an_error(self) -> None:
        tunnel = self.end_then_reset(ErrorCodes.INTERNAL_ERROR)
        reason = reason_of(tunnel.protocol)
        self.assertIsInstance(reason.value, StreamReset)
        self.assertTrue(reason.check(ierror.ConnectionLost))
        self.assertEqual((reason.value.code, reason.value.by_peer),
                         (ErrorCodes.INTERNAL_ERROR, True))
        self.assertEqual(tunnel.protocol.received, [])  # buffered data dropped
        self.assertFalse(tunnel.protocol.read_lost)

    def test_reset_before_end_stream_is_an_error(self) -> None:
        for code in (ErrorCodes.NO_ERROR, ErrorCodes.CANCEL):
            pair = H2Pair()
            tunnel = pair.open_tunnel()
            tunnel.server_stream.reset(code)
            pair.pump()
            reason = reason_of(tunnel.protocol)
            self.assertTrue(reason.check(StreamReset), reason)
            self.assertEqual(reason.value.code, code)

    def test_dropped_data_gives_the_connection_window_back(self) -> None:
        # A client whose connection window is no larger than one stream's window.
        small = H2Settings(initial_connection_window_size=4 * MiB)
        pair = H2Pair(client_settings=small)
        tunnel = pair.open_tunnel()
        tunnel.stream.pauseProducing()
        tunnel.upstream_protocol.dataReceived(b"d" * (4 * MiB))
        pair.pump()
        self.assertEqual(pair.server.conn.outbound_flow_control_window, 0)  # all buffered
        tunnel.server_stream.reset(ErrorCodes.INTERNAL_ERROR)
        pair.pump()
        self.assertTrue(reason_of(tunnel.protocol).check(StreamReset))
        self.assertEqual(tunnel.protocol.received, [])
        # The dropped bytes were acknowledged: the connection is not starved.
        self.assertGreaterEqual(pair.server.conn.outbound_flow_control_window, 2 * MiB)
        other = pair.open_tunnel()
        other.upstream_protocol.dataReceived(b"more")
        pair.pump()
        self.assertEqual(other.protocol.data, b"more")

    def test_abort_resets_and_aborts_upstream(self) -> None:
        """
        abortConnection is what a relay calls when the TCP side failed: CONNECT_ERROR
        (RFC 9113 §8.5), and the server resets its upstream TCP connection.
        """
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.abortConnection()
        reason = reason_of(tunnel.protocol)
        self.assertEqual(
            (reason.value.code, reason.value.by_peer), (ErrorCodes.CONNECT_ERROR, False)
        )
        pair.pump()
        rst = frames(pair.to_server, RstStreamFrame, tunnel.stream.stream_id)
        self.assertEqual([f.error_code for f in rst], [ErrorCodes.CONNECT_ERROR])
        self.assertTrue(tunnel.upstream.aborted)
        self.assertEqual(pair.server.streams, {})

    def test_writes_after_reset_are_dropped(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.server_stream.reset(ErrorCodes.CANCEL)
        pair.pump()
        tunnel.stream.write(b"nobody listens")
        pair.pump()
        self.assertEqual(frames(pair.to_server, DataFrame, tunnel.stream.stream_id), [])

    def test_producer_is_stopped_when_the_stream_ends(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        producer = FakeProducer()
        tunnel.stream.registerProducer(producer, True)
        tunnel.server_stream.reset(ErrorCodes.CANCEL)
        pair.pump()
        self.assertEqual(producer.state, "stopped")
        late = FakeProducer()
        tunnel.stream.unregisterProducer()
        tunnel.stream.registerProducer(late, True)
        self.assertEqual(late.state, "stopped")

    def test_connection_lost_ends_every_stream(self) -> None:
        pair = H2Pair()
        tunnels = [pair.open_tunnel() for _ in range(2)]
        pair.client.connectionLost(Failure(ierror.ConnectionLost("socket reset")))
        for tunnel in tunnels:
            reason = reason_of(tunnel.protocol)
            self.assertTrue(reason.check(ierror.ConnectionLost))
        self.assertEqual(pair.client.streams, {})
        self.assertEqual(pair.client.capacity, 0)


class GoawayTests(unittest.TestCase):
    def test_graceful_goaway_keeps_streams_and_refuses_new_ones(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        pair.server.send_goaway()
        pair.pump()
        goaways = frames(pair.to_client, GoAwayFrame)
        self.assertEqual([(f.error_code, f.last_stream_id) for f in goaways],
                         [(ErrorCodes.NO_ERROR, tunnel.stream.stream_id)])
        self.assertTrue(pair.client.goaway_received)
        self.assertEqual(pair.client.capacity, 0)
        refused = self.failureResultOf(pair.client.open_tunnel("127.0.0.1:1", []), UpstreamError)
        self.assertTrue(refused.value.retryable)
        # The existing tunnel still works, both ways.
        tunnel.stream.write(b"after goaway")
        tunnel.upstream_protocol.dataReceived(b"reply after goaway")
        pair.pump()
        self.assertEqual(tunnel.upstream.value(), b"after goaway")
        self.assertEqual(tunnel.protocol.data, b"reply after goaway")
        self.assertFalse(pair.server_transport.disconnecting)
        self.assertFalse(pair.client_transport.disconnecting)
        # Once it is done, both ends close the drained connection.
        tunnel.stream.loseWriteConnection()
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        self.assertTrue(reason_of(tunnel.protocol).check(ierror.ConnectionDone))
        self.assertTrue(pair.server_transport.disconnecting)
        self.assertTrue(pair.client_transport.disconnecting)

    def test_request_the_server_never_processed_is_retryable(self) -> None:
        pair = H2Pair()
        d = pair.client.open_tunnel("127.0.0.1:8080", [])  # not yet delivered
        pair.server.send_goaway()
        pair.pump()
        failure = self.failureResultOf(d, UpstreamError)
        self.assertTrue(failure.value.retryable)
        self.assertEqual(pair.cluster.pending, [])
        self.assertEqual(pair.client.streams, {})

    def test_server_refuses_streams_after_its_goaway(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        pair.server.send_goaway()
        sid = pair.send_raw_request([(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:5")])
        rst = frames(pair.to_client, RstStreamFrame, sid)
        self.assertEqual([f.error_code for f in rst], [ErrorCodes.REFUSED_STREAM])
        self.assertEqual(pair.cluster.pending, [])
        self.assertIsNone(tunnel.protocol.lost_reason)

    def test_max_requests_per_connection(self) -> None:
        pair = H2Pair()
        pair.server.max_requests = 2
        pair.open_tunnel()
        self.assertFalse(pair.client.goaway_received)
        pair.open_tunnel()
        self.assertTrue(pair.client.goaway_received)
        self.assertEqual(pair.client.capacity, 0)


class QuietConnectionTests(unittest.TestCase):
    def test_received_frames_are_never_repr_ed(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.upstream_protocol.dataReceived(b"x" * 100000)  # DATA frame now in flight

        def no_repr(*args: Any, **kwargs: Any) -> str:
            raise AssertionError("repr() of a received frame")

        self.patch(Frame, "__repr__", no_repr)
        self.patch(DataFrame, "_body_repr", no_repr)
        self.assertRaises(AssertionError, repr, DataFrame(1, b"data"))  # the patch bites
        pair.pump()
        self.assertEqual(tunnel.protocol.data, b"x" * 100000)
        tunnel.stream.write(b"and the other way")
        pair.pump()
        self.assertEqual(tunnel.upstream.value(), b"and the other way")


class RequestTests(unittest.TestCase):
    def test_malformed_connect_is_reset_and_others_keep_working(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        connect = [(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:80")]
        malformed = [
            connect + [(b":path", b"/")],  # :path without :protocol
            connect + [(b":scheme", b"https"), (b":path", b"/")],
            [(b":method", b"CONNECT")],  # no :authority
            connect + [(b"X-Upper", b"1")],
            connect + [(b"connection", b"close")],
            connect + [(b":bogus", b"1")],
            [(b":method", b"CONNECT"), (b"x-a", b"1"), (b":authority", b"127.0.0.1:80")],
        ]
        for headers in malformed:
            sid = pair.send_raw_request(headers)
            rst = frames(pair.to_client, RstStreamFrame, sid)
            self.assertEqual([f.error_code for f in rst], [ErrorCodes.PROTOCOL_ERROR], headers)
            self.assertEqual(frames(pair.to_client, HeadersFrame, sid), [])
        self.assertEqual(frames(pair.to_client, GoAwayFrame), [])
        self.assertEqual(pair.cluster.pending, [])
        tunnel.stream.write(b"still fine")
        tunnel.upstream_protocol.dataReceived(b"yes")
        pair.pump()
        self.assertEqual(tunnel.upstream.value(), b"still fine")
        self.assertEqual(tunnel.protocol.data, b"yes")
        second = pair.open_tunnel()
        second.stream.write(b"new")
        pair.pump()
        self.assertEqual(second.upstream.value(), b"new")

    def test_non_connect_is_405(self) -> None:
        pair = H2Pair()
        d = pair.client.open_tunnel("127.0.0.1:80", [], post_path="/")
        pair.pump()
        failure = self.failureResultOf(d, UpstreamError)
        self.assertEqual(failure.value.status, 405)
        self.assertEqual(pair.cluster.pending, [])
        self.assertEqual(pair.tunnels.refused, 1)

    def test_raw_non_connect_is_405(self) -> None:
        pair = H2Pair()
        sid = pair.send_raw_request(
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a:1"),
             (b":path", b"/")], end=True,
        )
        self.assertEqual(pair.responses[sid][b":status"], b"405")
        self.assertEqual(pair.cluster.pending, [])

    def test_direct_response(self) -> None:
        routes = (
            Route(path="/healthz", direct_status=200, direct_body=b"ok\n"),
            Route(connect_matcher=True, direct_status=418),
        )
        pair = H2Pair(router=RouteConfig("local", (VirtualHost("v", ("*",), routes),)))
        sid = pair.send_raw_request(
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"),
             (b":path", b"/healthz")], end=True,
        )
        self.assertEqual(pair.responses[sid][b":status"], b"200")
        self.assertEqual(pair.responses[sid][b"content-length"], b"3")
        body = frames(pair.to_client, DataFrame, sid)
        self.assertEqual([(f.data, "END_STREAM" in f.flags) for f in body], [(b"ok\n", True)])
        failure = self.failureResultOf(pair.request_tunnel("a:1"), UpstreamError)
        self.assertEqual(failure.value.status, 418)
        self.assertEqual(pair.cluster.pending, [])
        self.assertEqual(pair.server.streams, {})

    def test_bad_authority_is_400(self) -> None:
        pair = H2Pair()
        for authority in ("no-port", "host:\xb2"):
            failure = self.failureResultOf(pair.request_tunnel(authority), UpstreamError)
            self.assertEqual(failure.value.status, 400)
        self.assertEqual(pair.cluster.pending, [])

    def test_200_only_after_upstream_connected(self) -> None:
        pair = H2Pair()
        d = pair.request_tunnel("127.0.0.1:8080")
        self.assertNoResult(d)
        self.assertEqual(frames(pair.to_client, HeadersFrame), [])
        [pending] = pair.cluster.pending
        self.assertEqual(pending.request.original_destination, "127.0.0.1:8080")
        self.assertEqual(pending.request.downstream_remote, INFO.remoteAddress)
        self.assertEqual(pending.request.peer_identity, INFO.peerIdentity)
        upstream = pending.connect()
        pair.pump()
        stream, headers = self.successResultOf(d)
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(len(frames(pair.to_client, HeadersFrame, stream.stream_id)), 1)
        self.assertEqual(pair.tunnels.opened, 1)
        self.assertEqual(pair.tunnels.active, 1)
        stream.attach(HalfCloseProtocol())
        stream.write(b"hi")
        pair.pump()
        self.assertEqual(upstream.value(), b"hi")

    def test_upstream_failure_is_503(self) -> None:
        pair = H2Pair()
        d = pair.request_tunnel()
        pair.cluster.pending[0].deferred.errback(ierror.ConnectionRefusedError())
        pair.pump()
        failure = self.failureResultOf(d, UpstreamError)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.client.streams, {})
        self.assertEqual((pair.tunnels.refused, pair.tunnels.opened), (1, 0))

    def test_upstream_error_status_is_kept(self) -> None:
        pair = H2Pair()
        d = pair.request_tunnel("10.9.9.9:22")
        pair.cluster.pending[0].deferred.errback(UpstreamError(403, "outside allowed targets"))
        pair.pump()
        failure = self.failureResultOf(d, UpstreamError)
        self.assertEqual(failure.value.status, 403)
        self.assertFalse(failure.value.retryable)

    def test_early_data_on_refused_tunnels_does_not_starve_the_connection(self) -> None:
        pair = H2Pair()
        conn = pair.client.conn
        for _ in range(4):  # 4 x 4 MiB: the whole 16 MiB connection window
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:9")])
            for _ in range(4):
                conn.send_data(sid, b"e" * MiB)  # before the response: buffered by the server
            pair.client._flush()
            pair.pump()
            pair.cluster.pending.pop(0).deferred.errback(ierror.ConnectionRefusedError())
            pair.pump()
            self.assertEqual(pair.responses[sid][b":status"], b"503")
        self.assertEqual(pair.server.streams, {})
        self.assertGreater(conn.outbound_flow_control_window, 0)
        tunnel = pair.open_tunnel()
        tunnel.stream.write(b"still flows")
        pair.pump()
        self.assertEqual(tunnel.upstream.value(), b"still flows")

    def test_client_giving_up_cancels_the_upstream_connect(self) -> None:
        pair = H2Pair()
        d = pair.request_tunnel()
        [pending] = pair.cluster.pending
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertFalse(pending.cancelled)
        pair.pump()
        self.assertEqual(
            [f.error_code for f in frames(pair.to_server, RstStreamFrame)], [ErrorCodes.CANCEL]
        )
        self.assertTrue(pending.cancelled)
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.tunnels.refused, 0)  # giving up is not a refusal


class KeepaliveTests(unittest.TestCase):
    def pings(self, recorded: list[Frame], ack: bool) -> list[PingFrame]:
        return [f for f in frames(recorded, PingFrame) if ("ACK" in f.flags) == ack]

    def test_ping_sent_after_interval_and_acknowledged(self) -> None:
        pair = H2Pair()
        pair.clock.advance(SETTINGS.keepalive_interval - 0.1)
        pair.pump()
        self.assertEqual(self.pings(pair.to_server, ack=False), [])
        pair.clock.advance(0.1)
        pair.pump()
        self.assertEqual(len(self.pings(pair.to_server, ack=False)), 1)
        self.assertEqual(len(self.pings(pair.to_client, ack=True)), 1)
        pair.clock.advance(SETTINGS.keepalive_timeout + 1)
        pair.pump()
        self.assertFalse(pair.client_transport.aborted)
        self.assertFalse(pair.server_transport.aborted)

    def test_unanswered_ping_aborts(self) -> None:
        pair = H2Pair()
        pair.clock.advance(SETTINGS.keepalive_interval)
        self.assertIn(b"hbonex", pair.client_transport.value())  # the PING, not delivered
        pair.clock.advance(SETTINGS.keepalive_timeout - 0.1)
        self.assertFalse(pair.client_transport.aborted)
        pair.clock.advance(0.1)
        self.assertTrue(pair.client_transport.aborted)
        self.assertTrue(pair.server_transport.aborted)

    def test_keepalive_disabled(self) -> None:
        quiet = H2Settings(keepalive_interval=0)
        pair = H2Pair(server_settings=quiet, client_settings=quiet)
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_connection_lost_cancels_keepalive(self) -> None:
        pair = H2Pair()
        pair.clock.advance(SETTINGS.keepalive_interval)
        pair.client.connectionLost(Failure(ierror.ConnectionDone()))
        pair.server.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(pair.clock.getDelayedCalls(), [])


class BaseConnectionTests(unittest.TestCase):
    def test_base_connection_refuses_requests(self) -> None:
        # H2TunnelConnection on its own (no server subclass) answers requests REFUSED_STREAM.
        clock = Clock()
        base = H2TunnelConnection(SETTINGS, clock)
        client = H2TunnelClient(SETTINGS, clock)
        base_t, client_t = HalfCloseTransport(), HalfCloseTransport()
        base.makeConnection(base_t)
        client.makeConnection(client_t)
        client.handshakeCompleted()
        d = client.open_tunnel("127.0.0.1:1", [])
        for _ in range(10):
            a, b = client_t.value(), base_t.value()
            client_t.clear()
            base_t.clear()
            if a:
                base.dataReceived(a)
            if b:
                client.dataReceived(b)
        failure = self.failureResultOf(d, UpstreamError)
        self.assertTrue(failure.value.retryable)  # REFUSED_STREAM may be retried


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame as bytes, whatever hyperframe would refuse to build."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(
        4, "big"
    ) + payload


#: WINDOW_UPDATE with a zero increment on stream 0: a connection error (RFC 9113 §6.9).
ZERO_WINDOW_UPDATE = raw_frame(0x8, 0, 0, b"\x00\x00\x00\x00")


class LifecycleTests(unittest.TestCase):
    """
    One lifecycle per connection (OPEN -> DRAINING -> CLOSED) that the send paths, the
    keepalive and the pool all ask.
    """

    def protocol_error_from_server(self, pair: H2Pair) -> None:
        pair.client.dataReceived(ZERO_WINDOW_UPDATE)
        pair.pump()

    def test_protocol_error_closes_and_fails_every_stream(self) -> None:
        pair = H2Pair()
        tunnels = [pair.open_tunnel() for _ in range(2)]
        seen: list[Any] = []
        pair.client.on_capacity = seen.append
        self.protocol_error_from_server(pair)
        self.assertIs(pair.client.state, ConnectionState.CLOSED)
        self.assertEqual(pair.client.capacity, 0)
        self.assertIn(pair.client, seen)  # the pool hears of it at once
        for tunnel in tunnels:
            reason = reason_of(tunnel.protocol)
            self.assertTrue(reason.check(ConnectionClosed), reason)
            self.assertIn("protocol error", reason.getErrorMessage())
        self.assertEqual(pair.client.streams, {})
        goaways = frames(pair.to_server, GoAwayFrame)
        self.assertEqual([g.error_code for g in goaways], [ErrorCodes.PROTOCOL_ERROR])
        # The transport is closed for real: no producer left registered (a TLS transport
        # would otherwise never send close_notify).
        self.assertEqual(pair.client_transport.calls[-2:], ["unregisterProducer",
                                                            "loseConnection"])
        self.assertIsNone(pair.client_transport.producer)

    def test_no_ping_after_a_protocol_error(self) -> None:
        settings = H2Settings(keepalive_interval=1, keepalive_timeout=1)
        pair = H2Pair(server_settings=settings, client_settings=settings)
        pair.server.dataReceived(ZERO_WINDOW_UPDATE)
        self.assertIs(pair.server.state, ConnectionState.CLOSED)
        pair.server_transport.clear()
        pair.clock.advance(5)  # raised "SEND_PING in state CLOSED" in a timed call
        self.assertEqual(pair.server_transport.value(), b"")
        # What is left is the close grace timer only; it aborts a peer that never closes.
        pair.clock.advance(CLOSE_GRACE)
        self.assertTrue(pair.server_transport.aborted)
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_peer_closing_in_time_is_not_aborted(self) -> None:
        pair = H2Pair()
        pair.client.close()
        pair.client.connectionLost(Failure(ierror.ConnectionDone()))
        pair.clock.advance(CLOSE_GRACE * 2)
        self.assertFalse(pair.client_transport.aborted)

    def test_error_goaway_from_peer_closes(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        pair.server.send_goaway(ErrorCodes.INTERNAL_ERROR)
        pair.pump()
        self.assertIs(pair.client.state, ConnectionState.CLOSED)
        reason = reason_of(tunnel.protocol)
        self.assertTrue(reason.check(ConnectionClosed))
        self.assertIn("GOAWAY from peer: INTERNAL_ERROR", reason.getErrorMessage())
        self.assertIn("loseConnection", pair.client_transport.calls)
        pair.clock.advance(60)  # keepalive stays quiet on a closed connection
        self.assertNotIn(b"hbonex", pair.client_transport.value())

    def test_graceful_goaway_drains(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        pair.server.send_goaway()
        pair.pump()
        self.assertIs(pair.client.state, ConnectionState.DRAINING)
        self.assertIs(pair.server.state, ConnectionState.DRAINING)
        self.assertEqual(pair.client.capacity, 0)
        tunnel.stream.loseConnection()
        tunnel.upstream_protocol.transport.loseConnection()
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        self.assertIs(pair.client.state, ConnectionState.CLOSED)
        self.assertIs(pair.server.state, ConnectionState.CLOSED)

    def test_connection_lost_mid_stream_is_never_clean(self) -> None:
        """
        A TLS close_notify (ConnectionDone) under a stream that never saw END_STREAM still
        fails the stream: a truncated transfer must not look like a clean end.
        """
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.upstream_protocol.dataReceived(b"x" * 5000)
        pair.pump()
        pair.client.connectionLost(Failure(ierror.ConnectionDone("close_notify")))
        reason = reason_of(tunnel.protocol)
        self.assertTrue(reason.check(ConnectionClosed), reason)
        self.assertFalse(reason.check(ierror.ConnectionDone))
        self.assertEqual(tunnel.protocol.data, b"x" * 5000)
        # And on the server side the target is reset, not FIN-closed.
        pair.server.connectionLost(Failure(ierror.ConnectionDone("close_notify")))
        self.assertTrue(tunnel.upstream.aborted)
        self.assertFalse(tunnel.upstream.write_closed)

    def test_late_upstream_connect_after_a_connection_error(self) -> None:
        pair = H2Pair()
        pair.request_tunnel()
        [pending] = pair.cluster.pending
        pair.server.dataReceived(ZERO_WINDOW_UPDATE)
        self.assertTrue(pending.cancelled)  # the connect is given up at once
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.tunnels.opened, 0)

    def test_delivery_stops_once_the_protocol_aborted(self) -> None:
        class AbortOnFirst(HalfCloseProtocol):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.abortConnection()  # type: ignore[union-attr]

            def readConnectionLost(self) -> None:
                raise AssertionError("readConnectionLost after connectionLost")

        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.pauseProducing()
        tunnel.upstream_protocol.dataReceived(b"one")
        pair.pump()
        tunnel.upstream_protocol.dataReceived(b"two")
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        protocol = AbortOnFirst()
        tunnel.stream.protocol = protocol
        protocol.makeConnection(tunnel.stream)
        tunnel.stream.resumeProducing()
        self.assertEqual(protocol.received, [b"one"])
        self.assertTrue(reason_of(protocol).check(StreamReset))


class StreamLimitTests(unittest.TestCase):
    def test_stream_over_the_limit_is_refused_alone(self) -> None:
        """
        RFC 9113 §5.1.2: REFUSED_STREAM for that stream; the connection and its tunnels
        live on, and HPACK stays in step (later requests still decode).
        """
        pair = H2Pair(server_settings=H2Settings(max_concurrent_streams=2))
        tunnels = [pair.open_tunnel() for _ in range(2)]
        headers = [(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:8080"),
                   (b"x-indexed", b"kept in the dynamic table")]
        # The client's own h2 would not send beyond the limit: pretend it saw no limit.
        pair.client.conn.remote_settings.acknowledge()
        pair.client.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 10
        pair.client.conn.remote_settings.acknowledge()
        sid = pair.send_raw_request(headers)
        rst = frames(pair.to_client, RstStreamFrame, sid)
        self.assertEqual([f.error_code for f in rst], [ErrorCodes.REFUSED_STREAM])
        self.assertEqual(frames(pair.to_client, GoAwayFrame), [])
        self.assertIs(pair.server.state, ConnectionState.OPEN)
        for i, tunnel in enumerate(tunnels):
            tunnel.stream.write(b"still here %d" % i)
            pair.pump()
            self.assertEqual(tunnel.upstream.value(), b"still here %d" % i)
        # A stream freed, the same (now indexed) headers decode and are served.
        tunnels[0].stream.abortConnection()
        pair.pump()
        sid = pair.send_raw_request(headers)
        self.assertEqual(frames(pair.to_client, RstStreamFrame, sid), [])
        self.assertEqual(len(pair.cluster.pending), 1)

    def test_refused_connect_gets_rst_no_error(self) -> None:
        """
        A 403 ends our side; the client's side is closed with RST_STREAM(NO_ERROR), so refused
        CONNECTs stop counting against MAX_CONCURRENT_STREAMS.
        """
        pair = H2Pair(server_settings=H2Settings(max_concurrent_streams=2))
        sids = [pair.send_raw_request([(b":method", b"GET"), (b":scheme", b"https"),
                                       (b":authority", b"a:1"), (b":path", b"/")])
                for _ in range(2)]
        for sid in sids:
            [headers] = frames(pair.to_client, HeadersFrame, sid)
            self.assertIn("END_STREAM", headers.flags)
            rst = frames(pair.to_client, RstStreamFrame, sid)
            self.assertEqual([f.error_code for f in rst], [ErrorCodes.NO_ERROR])
        tunnel = pair.open_tunnel()
        tunnel.stream.write(b"ok")
        pair.pump()
        self.assertEqual(tunnel.upstream.value(), b"ok")

    def test_end_stream_then_cancel_before_upstream_connects(self) -> None:
        pair = H2Pair()
        sid = pair.send_raw_request(
            [(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:8080")]
        )
        [pending] = pair.cluster.pending
        pair.client.conn.send_data(sid, b"early", end_stream=True)
        pair.client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        pair.client._flush()
        pair.pump()
        self.assertTrue(pending.cancelled)
        self.assertEqual(pair.server.streams, {})


class SameBatchResetTests(unittest.TestCase):
    def test_write_racing_a_clean_reset_in_the_same_batch(self) -> None:
        """
        DATA(END_STREAM) and RST_STREAM(NO_ERROR) arrive together; the protocol answers the
        DATA at once, which h2 refuses (the stream is already reset).  The stream still ends
        as the peer said, cleanly, not with a local STREAM_CLOSED error.
        """

        class Answering(HalfCloseProtocol):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.write(b"answer")  # type: ignore[union-attr]

        pair = H2Pair()
        tunnel = pair.open_tunnel(protocol=Answering())
        sid = tunnel.stream.stream_id
        pair.server.conn.send_data(sid, b"last words", end_stream=True)
        pair.server.conn.reset_stream(sid, ErrorCodes.NO_ERROR)
        pair.server._flush()
        pair.pump()
        self.assertEqual(tunnel.protocol.data, b"last words")
        self.assertTrue(tunnel.protocol.read_lost)
        reason = reason_of(tunnel.protocol)
        self.assertTrue(reason.check(ierror.ConnectionDone), reason)
        self.assertEqual(frames(pair.to_server, RstStreamFrame, sid), [])

    def test_queued_data_is_dropped_by_a_clean_cancel(self) -> None:
        """
        Decision: RST_STREAM(CANCEL) after the peer's END_STREAM is a clean close (as
        NO_ERROR, like production stacks send it); what we still had queued for the peer is
        dropped, since the peer said it takes no more.
        """
        pair = H2Pair(server_settings=H2Settings(initial_stream_window_size=65535))
        tunnel = pair.open_tunnel()
        sid = tunnel.stream.stream_id
        tunnel.stream.write(b"z" * 200_000)  # beyond the server's 64 KiB stream window
        self.assertGreater(tunnel.stream._outbound_size, 0)
        pair.server.conn.end_stream(sid)
        pair.server.conn.reset_stream(sid, ErrorCodes.CANCEL)
        pair.server._flush()
        pair.pump()
        self.assertEqual(tunnel.stream._outbound_size, 0)
        reason = reason_of(tunnel.protocol)
        self.assertTrue(reason.check(ierror.ConnectionDone), reason)


class StatsTests(unittest.TestCase):
    def test_floods_and_resets_are_counted_under_envoys_names(self) -> None:
        from hbonex.observability.stats import STATS

        before = STATS.snapshot()
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.reset(ErrorCodes.CANCEL)
        pair.pump()
        sid = pair.send_raw_request([(b":method", b"CONNECT"),
                                     (b":authority", b"127.0.0.1:8080")])
        pair.client_transport.clear()
        pair.server.dataReceived(raw_frame(0x0, 0, sid, b"") * 3)  # empty DATA frames
        after = STATS.snapshot()

        def grown(name: str) -> int:
            return after.get(name, 0) - before.get(name, 0)

        self.assertEqual(grown("http2.inbound_empty_frames_flood"), 1)
        self.assertGreaterEqual(grown("http2.tx_reset"), 1)
        self.assertGreaterEqual(grown("http2.rx_reset"), 1)


class CompleteStreamTests(unittest.TestCase):
    def test_connection_closing_after_both_ends_does_not_lose_buffered_data(self) -> None:
        """
        The peer sent everything and END_STREAM, we ended too, our protocol is paused with
        data still buffered, and then the connection closes (a drained server): the stream
        still delivers every byte and ends cleanly.
        """
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.loseWriteConnection()
        tunnel.stream.pauseProducing()
        tunnel.upstream_protocol.dataReceived(b"tail of the download")
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        self.assertEqual(tunnel.protocol.received, [])
        pair.client.connectionLost(Failure(ierror.ConnectionDone("close_notify")))
        self.assertIsNone(tunnel.protocol.lost_reason)
        tunnel.stream.resumeProducing()
        self.assertEqual(tunnel.protocol.data, b"tail of the download")
        self.assertTrue(tunnel.protocol.read_lost)
        self.assertTrue(reason_of(tunnel.protocol).check(ierror.ConnectionDone))

    def test_a_stream_still_sending_is_failed(self) -> None:
        pair = H2Pair()
        tunnel = pair.open_tunnel()
        tunnel.stream.pauseProducing()
        tunnel.upstream_protocol.dataReceived(b"x")
        tunnel.upstream_protocol.readConnectionLost()
        pair.pump()
        pair.client.connectionLost(Failure(ierror.ConnectionDone("close_notify")))
        self.assertTrue(reason_of(tunnel.protocol).check(ConnectionClosed))
