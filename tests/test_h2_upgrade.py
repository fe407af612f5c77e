"""
HTTP/2 extended CONNECT upgrades (RFC 8441, websocket over HTTP/2) in memory: the ``h2``
library as the client, an HTTP/2 server connection serving requests through codec2 into the
connection manager's own filter, a recording filter and the router; upstream HTTP/1.1
connections over StringTransports.  What Envoy does: the request in HTTP/1.1 form through the
filters and upstream, the 101 as a 200, then the stream and the upstream connection spliced.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from hbonex.filters.http.router import HttpRoute, RouterFilter
from hbonex.h2.connection import H2TunnelConnection
from hbonex.h2.settings import H2Settings
from hbonex.http.codec1 import Http1ServerCodec
from hbonex.http.codec2 import serve_request
from hbonex.http.connection_manager import StandardHeaders
from hbonex.http.filter_manager import FilterHeadersStatus, FilterManager
from hbonex.http.headers import Headers
from hbonex.http.upgrade import h1_response_to_h2, h2_request_to_h1, h2_upgrade_protocol
from hbonex.interfaces import IStreamDecoderFilter
from hbonex.observability.stats import Counter
from hbonex.tunnel.client import H2TunnelClient
from hbonex.tunnel.server import TunnelLog, _is_tunnel
from hbonex.upstream.http2_pool import H2Exchange
from tests.fakes import HalfCloseTransport
from tests.test_http_router import Setup
from tests.test_upgrade import SWITCHED, UPGRADE

STREAM_WINDOW = 65535


@implementer(IStreamDecoderFilter)
class Seen:
    """Records the request headers the configured filters see."""

    def __init__(self) -> None:
        self.headers: Headers | None = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        pass

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        self.headers = headers.copy()
        return FilterHeadersStatus.Continue

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        return None

    def decodeTrailers(self, trailers: Headers) -> Any:
        return None

    def onDestroy(self) -> None:
        pass


class Server(H2TunnelConnection):
    """An HTTP/2 server connection whose requests go through the HCM's filters and router."""

    def __init__(self, setup: Setup) -> None:
        super().__init__(H2Settings(initial_stream_window_size=STREAM_WINDOW), setup.clock)
        self.setup = setup
        self.counters = TunnelLog()
        self.refused = Counter("refused")
        self.seen = Seen()
        self.managers: list[FilterManager] = []
        self.records: list[FilterManager] = []

    def request_received(self, event: h2.events.RequestReceived) -> None:
        serve_request(self, event.stream_id, event.headers,
                      event.stream_ended is not None, self._new)

    def _new(self, sink: Any) -> FilterManager:
        s = self.setup
        router = RouterFilter(s.clock, lambda cluster: s.pool, self.counters)
        manager = FilterManager([StandardHeaders(None, upgrade_refused=self.refused),
                                 self.seen, router], sink,
                                route_resolver=lambda h, c: s.route)
        manager.on_destroy = self.records.append
        self.managers.append(manager)
        return manager


class H2Upstream:
    """
    An upstream HTTP/2 server (the plain ``h2`` library, extended CONNECT enabled) behind
    the router's HTTP/2 client connection (H2TunnelClient, H2Exchange per request).
    """

    def __init__(self, clock: Clock) -> None:
        self.client = H2TunnelClient(H2Settings(), clock)
        self.client_t = HalfCloseTransport()
        self.client.makeConnection(self.client_t)
        self.client.handshakeCompleted()
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        self.server.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
        self.server.initiate_connection()
        self.events: list[Any] = []

    def acquire(self) -> defer.Deferred[H2Exchange]:
        return defer.succeed(H2Exchange(self.client))

    def pump(self) -> bool:
        moved = False
        out = self.server.data_to_send()
        if out:
            moved = True
            self.client.dataReceived(out)
        back = self.client_t.value()
        self.client_t.clear()
        if back:
            moved = True
            for event in self.server.receive_data(back):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.server.acknowledge_received_data(event.flow_controlled_length,
                                                          event.stream_id)
        return moved

    def request(self) -> tuple[int, dict[bytes, bytes]]:
        [event] = [e for e in self.events if isinstance(e, h2.events.RequestReceived)]
        return event.stream_id, dict(event.headers)

    def received(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.events
                        if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, h2.events.StreamEnded) and e.stream_id == sid
                   for e in self.events)


class Pair:
    def __init__(self, route: HttpRoute, h2_upstream: bool = False) -> None:
        self.setup = Setup(route)
        self.up: H2Upstream | None = None
        if h2_upstream:
            self.up = H2Upstream(self.setup.clock)
            self.setup.pool = self.up  # type: ignore[assignment]
        self.server = Server(self.setup)
        self.server_transport = HalfCloseTransport()
        self.server.makeConnection(self.server_transport)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.client.initiate_connection()
        self.events: list[Any] = []
        #: Acknowledge received DATA (reopen the server's window) as it arrives.
        self.reading = True
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            out = self.client.data_to_send()
            if out:
                self.server.dataReceived(out)
            back = self.server_transport.value()
            self.server_transport.clear()
            if back:
                for event in self.client.receive_data(back):
                    self.events.append(event)
                    if isinstance(event, h2.events.DataReceived) and self.reading:
                        self.client.acknowledge_received_data(event.flow_controlled_length,
                                                              event.stream_id)
            moved = self.up.pump() if self.up is not None else False
            if not out and not back and not moved:
                return
        raise AssertionError("never quiet")

    def connect(self, protocol: bytes = b"websocket", path: bytes = b"/chat",
                data: bytes = b"", end: bool = False) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [
            (b":method", b"CONNECT"), (b":protocol", protocol), (b":scheme", b"http"),
            (b":authority", b"ws.test"), (b":path", path),
            (b"sec-websocket-version", b"13")], end_stream=end and not data)
        if data:
            self.client.send_data(sid, data, end_stream=end)
        self.pump()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.client.send_data(sid, data, end_stream=end)
        self.pump()

    def of(self, sid: int, kind: type) -> list[Any]:
        return [e for e in self.events
                if isinstance(e, kind) and getattr(e, "stream_id", None) == sid]

    def status(self, sid: int) -> dict[bytes, bytes]:
        [response] = self.of(sid, h2.events.ResponseReceived)
        return dict(response.headers)

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(sid, h2.events.DataReceived))

    def ended(self, sid: int) -> bool:
        return bool(self.of(sid, h2.events.StreamEnded))

    def resets(self, sid: int) -> list[int]:
        return [e.error_code for e in self.of(sid, h2.events.StreamReset)]

    @property
    def upstream(self) -> Any:
        [codec] = self.setup.upstream.codecs
        return codec


class TransformTests(unittest.TestCase):
    def test_which_requests_are_upgrades(self) -> None:
        """Envoy's isH2UpgradeRequest: CONNECT with a :protocol other than bytestream."""
        def items(method: bytes, protocol: bytes | None) -> list[tuple[bytes, bytes]]:
            result = [(b":method", method), (b":authority", b"a:1")]
            if protocol is not None:
                result.append((b":protocol", protocol))
            return result + [(b"x", b"y")]

        self.assertEqual(h2_upgrade_protocol(items(b"CONNECT", b"websocket")), b"websocket")
        self.assertEqual(h2_upgrade_protocol(items(b"CONNECT", b"foo/2")), b"foo/2")
        for method, protocol in ((b"CONNECT", b"bytestream"), (b"CONNECT", None),
                                 (b"CONNECT", b""), (b"GET", b"websocket")):
            self.assertIsNone(h2_upgrade_protocol(items(method, protocol)), (method, protocol))

    def test_request_h2_to_h1(self) -> None:
        headers = Headers([(b":method", b"CONNECT"), (b":protocol", b"websocket"),
                           (b":scheme", b"https"), (b":authority", b"ws.test"),
                           (b":path", b"/chat?x=1"), (b"origin", b"o")])
        self.assertEqual(h2_request_to_h1(headers).items(), [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"ws.test"),
            (b":path", b"/chat?x=1"), (b"origin", b"o"), (b"upgrade", b"websocket"),
            (b"connection", b"upgrade")])

    def test_response_h1_to_h2(self) -> None:
        original = Headers([(b":status", b"101"), (b"upgrade", b"websocket"),
                            (b"connection", b"upgrade"), (b"content-length", b"0"),
                            (b"sec-websocket-accept", b"k")])
        self.assertEqual(h1_response_to_h2(original).items(),
                         [(b":status", b"200"), (b"sec-websocket-accept", b"k")])
        self.assertEqual(original.get(b":status"), b"101")  # a copy: the filters' stays
        other = Headers([(b":status", b"404"), (b"content-length", b"4")])
        self.assertEqual(h1_response_to_h2(other).items(), other.items())

    def test_only_bytestream_and_plain_connect_are_tunnels(self) -> None:
        base = [(b":method", b"CONNECT"), (b":authority", b"a:1")]
        self.assertTrue(_is_tunnel(base, None, None))
        self.assertTrue(_is_tunnel(base + [(b":protocol", b"bytestream")], None, None))
        self.assertFalse(_is_tunnel(base + [(b":protocol", b"websocket")], None, None))
        self.assertFalse(_is_tunnel(base + [(b":protocol", b"anything")], None, None))


class ExtendedConnectTests(unittest.TestCase):
    def test_headers_in_http1_form_through_filters_and_upstream(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"))
        pair.connect(data=b"early")
        seen = pair.server.seen.headers
        assert seen is not None
        self.assertEqual((seen.get(b":method"), seen.get(b":path"), seen.get(b":authority")),
                         (b"GET", b"/chat", b"ws.test"))
        self.assertEqual((seen.get(b"upgrade"), seen.get(b"connection")),
                         (b"websocket", b"upgrade"))
        self.assertIsNone(seen.get(b":protocol"))
        sent = pair.setup.upstream.sent()
        self.assertTrue(sent.startswith(b"GET /chat HTTP/1.1\r\nhost: ws.test\r\n"), sent)
        self.assertIn(b"\r\nsec-websocket-version: 13\r\n", sent)
        self.assertIn(b"\r\nupgrade: websocket\r\nconnection: upgrade\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\nearly"), sent)

    def test_101_is_200_then_bytes_both_ways_with_half_close_and_one_record(self) -> None:
        pair = Pair(HttpRoute(cluster="backend", idle_timeout=60.0))
        sid = pair.connect(data=b"early")
        codec = pair.upstream
        codec.dataReceived(SWITCHED + b"hello")
        pair.pump()
        headers = pair.status(sid)
        self.assertEqual(headers[b":status"], b"200")
        for name in (b"upgrade", b"connection", b"content-length"):
            self.assertNotIn(name, headers)
        self.assertIn(b"x-envoy-upstream-service-time", headers)
        self.assertEqual(pair.body(sid), b"hello")
        self.assertEqual((pair.server.counters.opened, pair.server.counters.active), (1, 1))
        upstream = codec.transport
        upstream.clear()
        pair.send(sid, b"ping")
        self.assertEqual(upstream.value(), b"ping")
        # The client's END_STREAM is the upstream's EOF; the upstream answers on, then ends.
        pair.send(sid, b"", end=True)
        self.assertTrue(upstream.write_closed)
        codec.dataReceived(b" after")
        pair.pump()
        self.assertEqual(pair.body(sid), b"hello after")
        self.assertFalse(pair.ended(sid))
        codec.readConnectionLost()
        pair.pump()
        self.assertTrue(pair.ended(sid))
        self.assertEqual(pair.resets(sid), [])
        self.assertEqual(pair.server.records, [])  # the request lasts as long as the relay
        codec.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(len(pair.server.records), 1)
        info = pair.server.records[0].stream_info
        self.assertEqual((info.response_code, info.bytes_received, info.bytes_sent),
                         (101, len(b"earlyping"), len(b"hello after")))
        self.assertEqual(info.flags_text(), "-")
        self.assertEqual((pair.server.counters.opened, pair.server.counters.active), (1, 0))
        self.assertEqual(pair.server.streams, {})

    def test_end_stream_before_the_101_reaches_the_upstream_after_it(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"))
        sid = pair.connect(data=b"all", end=True)
        codec = pair.upstream
        self.assertFalse(codec.transport.write_closed)  # the request never ends upstream
        codec.dataReceived(SWITCHED)
        pair.pump()
        self.assertEqual(pair.status(sid)[b":status"], b"200")
        self.assertTrue(codec.transport.write_closed)
        codec.dataReceived(b"reply")
        codec.readConnectionLost()
        pair.pump()
        self.assertEqual((pair.body(sid), pair.ended(sid)), (b"reply", True))

    def test_headers_only_end_stream_is_carried_too(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"))
        sid = pair.connect(end=True)
        pair.upstream.dataReceived(SWITCHED)
        pair.pump()
        self.assertEqual(pair.status(sid)[b":status"], b"200")
        self.assertTrue(pair.upstream.transport.write_closed)

    def test_refused_upgrade_is_403_upgrade_failed_then_no_error_reset(self) -> None:
        pair = Pair(HttpRoute(cluster="backend", upgrade_rejected=True))
        sid = pair.connect(protocol=b"unknown-proto")
        self.assertEqual(pair.status(sid)[b":status"], b"403")
        self.assertTrue(pair.ended(sid))
        self.assertEqual(pair.resets(sid), [ErrorCodes.NO_ERROR])
        self.assertEqual(pair.server.refused.value, 1)
        self.assertEqual(pair.setup.upstream.codecs, [])
        [record] = pair.server.records
        self.assertEqual(record.stream_info.response_code_details, "upgrade_failed")
        self.assertEqual(pair.server.streams, {})

    def test_other_answer_is_an_ordinary_response(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"))
        sid = pair.connect()
        codec = pair.upstream
        codec.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope")
        pair.pump()
        self.assertEqual(pair.status(sid)[b":status"], b"404")
        self.assertEqual((pair.body(sid), pair.ended(sid)), (b"nope", True))
        self.assertEqual(pair.resets(sid), [ErrorCodes.NO_ERROR])
        self.assertTrue(codec.transport.aborted)  # never reused
        self.assertEqual(pair.server.records[0].stream_info.response_code, 404)
        self.assertEqual(pair.server.counters.opened, 0)

    def test_client_reset_aborts_the_upstream(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"))
        sid = pair.connect()
        codec = pair.upstream
        codec.dataReceived(SWITCHED)
        pair.pump()
        pair.client.reset_stream(sid, ErrorCodes.CANCEL)
        pair.pump()
        self.assertTrue(codec.transport.aborted)
        codec.connectionLost(Failure(ierror.ConnectionLost()))
        [record] = pair.server.records
        self.assertEqual(record.stream_info.flags_text(), "DC")

    def test_upstream_reset_is_connect_error(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"))
        sid = pair.connect()
        codec = pair.upstream
        codec.dataReceived(SWITCHED + b"partial")
        pair.pump()
        codec.connectionLost(Failure(ierror.ConnectionLost("reset by peer")))
        pair.pump()
        self.assertEqual(pair.body(sid), b"partial")
        self.assertFalse(pair.ended(sid))  # a truncation is never a clean end
        self.assertEqual(pair.resets(sid), [ErrorCodes.CONNECT_ERROR])
        [record] = pair.server.records
        self.assertEqual(record.stream_info.flags_text(), "UC")

    def test_idle_timeout_resets_with_cancel(self) -> None:
        pair = Pair(HttpRoute(cluster="backend", idle_timeout=30.0))
        sid = pair.connect()
        codec = pair.upstream
        codec.dataReceived(SWITCHED)
        pair.pump()
        pair.setup.clock.advance(31)
        pair.pump()
        self.assertEqual(pair.resets(sid), [ErrorCodes.CANCEL])
        self.assertTrue(codec.transport.aborted)
        codec.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertEqual(pair.server.records[0].stream_info.flags_text(), "SI")

    def test_slow_client_pauses_the_upstream(self) -> None:
        """Producers back to back: a client that stops reading pauses the upstream socket."""
        pair = Pair(HttpRoute(cluster="backend"))
        sid = pair.connect()
        codec = pair.upstream
        codec.dataReceived(SWITCHED)
        pair.pump()
        pair.reading = False
        upstream = codec.transport
        self.assertEqual(upstream.producerState, "producing")
        codec.dataReceived(b"x" * (512 * 1024))
        pair.pump()
        self.assertEqual(upstream.producerState, "paused")
        self.assertEqual(len(pair.body(sid)), STREAM_WINDOW)  # what the window allowed
        pair.reading = True
        for event in pair.of(sid, h2.events.DataReceived):
            pair.client.acknowledge_received_data(event.flow_controlled_length, sid)
        pair.pump()
        self.assertEqual(len(pair.body(sid)), 512 * 1024)
        self.assertEqual(upstream.producerState, "producing")

    def test_upstream_that_cannot_take_more_pauses_the_stream(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"))
        sid = pair.connect()
        codec = pair.upstream
        codec.dataReceived(SWITCHED)
        pair.pump()
        [stream] = pair.server.streams.values()
        codec.transport.producer.pauseProducing()  # the upstream socket is full
        codec.transport.clear()
        pair.send(sid, b"\x01" * 1000)
        self.assertEqual(codec.transport.value(), b"")
        self.assertEqual(stream._inbound[0][0], b"\x01" * 1000)  # held, window not reopened
        codec.transport.producer.resumeProducing()
        self.assertEqual(codec.transport.value(), b"\x01" * 1000)
        self.assertIs(stream.protocol, codec._owner.peer)


class H2UpstreamTests(unittest.TestCase):
    """An upgrade to an HTTP/2 cluster goes as an extended CONNECT, as Envoy's codec sends it."""

    def test_h2_to_h2_websocket(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"), h2_upstream=True)
        up = pair.up
        assert up is not None
        sid = pair.connect(data=b"early")
        usid, headers = up.request()
        self.assertEqual((headers[b":method"], headers[b":protocol"], headers[b":path"],
                          headers[b":authority"], headers[b":scheme"]),
                         (b"CONNECT", b"websocket", b"/chat", b"ws.test", b"http"))
        for name in (b"upgrade", b"connection"):
            self.assertNotIn(name, headers)
        self.assertEqual(up.received(usid), b"early")
        up.server.send_headers(usid, [(b":status", b"200"), (b"x-up", b"1")])
        up.server.send_data(usid, b"hello")
        pair.pump()
        response = pair.status(sid)
        self.assertEqual((response[b":status"], response[b"x-up"]), (b"200", b"1"))
        self.assertNotIn(b"upgrade", response)
        self.assertEqual(pair.body(sid), b"hello")  # after the 200, never as a "body"
        pair.send(sid, b"ping", end=True)
        self.assertEqual(up.received(usid), b"earlyping")
        self.assertTrue(up.ended(usid))
        up.server.send_data(usid, b" bye", end_stream=True)
        pair.pump()
        self.assertEqual((pair.body(sid), pair.ended(sid)), (b"hello bye", True))
        [record] = pair.server.records
        info = record.stream_info
        self.assertEqual((info.response_code, info.bytes_received, info.bytes_sent),
                         (101, len(b"earlyping"), len(b"hello bye")))
        self.assertEqual(info.flags_text(), "-")
        self.assertEqual((pair.server.streams, up.client.streams), ({}, {}))

    def test_upstream_reset_reaches_the_client(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"), h2_upstream=True)
        up = pair.up
        assert up is not None
        sid = pair.connect()
        usid, _ = up.request()
        up.server.send_headers(usid, [(b":status", b"200")])
        pair.pump()
        up.server.reset_stream(usid, ErrorCodes.CONNECT_ERROR)
        pair.pump()
        self.assertEqual(pair.resets(sid), [ErrorCodes.CONNECT_ERROR])
        self.assertEqual(pair.server.records[0].stream_info.flags_text(), "UC")

    def test_refusal_is_an_ordinary_response(self) -> None:
        pair = Pair(HttpRoute(cluster="backend"), h2_upstream=True)
        up = pair.up
        assert up is not None
        sid = pair.connect()
        usid, _ = up.request()
        up.server.send_headers(usid, [(b":status", b"404")])
        up.server.send_data(usid, b"nope", end_stream=True)
        pair.pump()
        self.assertEqual(pair.status(sid)[b":status"], b"404")
        self.assertEqual((pair.body(sid), pair.ended(sid)), (b"nope", True))
        self.assertEqual(pair.server.counters.opened, 0)

    def test_h1_downstream_to_h2_upstream(self) -> None:
        """An HTTP/1.1 Upgrade towards an HTTP/2 cluster: 101 downstream, CONNECT upstream."""
        clock = Clock()
        up = H2Upstream(clock)
        counters = TunnelLog()
        route = HttpRoute(cluster="backend")
        managers: list[FilterManager] = []

        def new(sink: Any) -> FilterManager:
            router = RouterFilter(clock, lambda cluster: up, counters)
            manager = FilterManager([StandardHeaders(None), router], sink,
                                    route_resolver=lambda h, c: route)
            managers.append(manager)
            return manager

        codec = Http1ServerCodec(new, clock)
        downstream = HalfCloseTransport()
        codec.makeConnection(downstream)
        codec.dataReceived(UPGRADE + b"\r\nearly")
        while up.pump():
            pass
        usid, headers = up.request()
        self.assertEqual((headers[b":method"], headers[b":protocol"]), (b"CONNECT", b"websocket"))
        up.server.send_headers(usid, [(b":status", b"200")])
        up.server.send_data(usid, b"hello")
        while up.pump():
            pass
        out = downstream.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), out)
        self.assertIn(b"\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nhello", out)
        self.assertEqual(up.received(usid), b"early")
        self.assertEqual(counters.opened, 1)
        codec.dataReceived(b"frames")
        codec.readConnectionLost()
        while up.pump():
            pass
        self.assertEqual(up.received(usid), b"earlyframes")
        self.assertTrue(up.ended(usid))
        up.server.send_data(usid, b"!", end_stream=True)
        while up.pump():
            pass
        self.assertTrue(downstream.value().endswith(b"hello!"))
        self.assertTrue(downstream.write_closed)
