"""
HTTP/1.1 upgrades in memory: the downstream codec (the request head, raw payload, the 101,
the switch), the upstream codec (raw request, the 101, take_over), and the router with the
connection manager's own filter (403 upgrade_failed, the relay, counters, one record).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hbonex.filters.http.router import HttpRoute, RouterFilter
from hbonex.http.connection_manager import StandardHeaders
from hbonex.http.filter_manager import FilterManager, IResponseSink
from hbonex.http.headers import Headers
from hbonex.observability.stats import Counter
from hbonex.tunnel.server import TunnelLog
from hbonex.upstream.http1_client import Http1ClientCodec
from tests.fakes import HalfCloseTransport
from tests.test_http_codec1 import Conn
from tests.test_http_filter_manager import Sink
from tests.test_http_router import Setup

UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: keep-alive, Upgrade\r\n"
           b"Upgrade: websocket\r\n")
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


class Recorder(Protocol):
    """Records what a switched connection hands over."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason


def request_headers(*extra: tuple[bytes, bytes]) -> Headers:
    headers = Headers.of(method="GET", path="/chat", authority="ws.test", scheme="http")
    for name, value in ((b"upgrade", b"websocket"), (b"connection", b"upgrade"), *extra):
        headers.add(name, value)
    return headers


def switching(headers: Headers | None = None) -> Headers:
    return headers or Headers([(b":status", b"101"), (b"upgrade", b"websocket"),
                               (b"connection", b"upgrade")])


class DownstreamCodecTests(unittest.TestCase):
    def test_request_head_kept_and_payload_unparsed(self) -> None:
        """Upgrade and Connection go on; what follows the head is payload, framing and all."""
        conn = Conn(auto=None)
        conn.send(UPGRADE + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nRAW")
        [handler] = conn.handlers
        assert handler.headers is not None
        self.assertEqual(handler.headers.get(b"upgrade"), b"websocket")
        self.assertEqual(handler.headers.get(b"connection"), b"upgrade")
        self.assertEqual(handler.headers.get(b"transfer-encoding"), b"chunked")
        self.assertIsNone(handler.headers.get(b"keep-alive"))
        self.assertEqual(handler.body, b"3\r\nabc\r\n0\r\n\r\nRAW")
        self.assertFalse(handler.ended)
        conn.send(b"more")
        self.assertEqual(handler.body, b"3\r\nabc\r\n0\r\n\r\nRAWmore")

    def test_101_then_the_connection_belongs_to_the_switched_protocol(self) -> None:
        conn = Conn(auto=None)
        conn.send(UPGRADE + b"\r\n")
        [handler] = conn.handlers
        handler.sink.sendHeaders(switching(Headers([(b":status", b"101"),
                                                    (b"upgrade", b"websocket"),
                                                    (b"connection", b"upgrade"),
                                                    (b"x-extra", b"1")])), False)
        out = conn.transport.value()
        self.assertEqual(out, b"HTTP/1.1 101 Switching Protocols\r\nx-extra: 1\r\n"
                              b"upgrade: websocket\r\nconnection: upgrade\r\n\r\n")
        conn.transport.clear()
        proto = Recorder()
        self.assertTrue(handler.sink.switchProtocols(proto))
        self.assertIs(proto.transport, conn.transport)
        conn.send(b"frames")
        self.assertEqual(proto.data, b"frames")
        self.assertEqual(handler.body, b"")  # nothing more for the request's handler
        conn.codec.readConnectionLost()
        self.assertTrue(proto.eof)
        self.assertFalse(conn.closed)  # the relay decides when to close, not the codec
        conn.codec.connectionLost(Failure(ierror.ConnectionDone()))
        assert proto.reason is not None
        self.assertTrue(proto.reason.check(ierror.ConnectionDone))
        self.assertFalse(handler.was_reset)

    def test_client_eof_before_the_101_reaches_the_relay(self) -> None:
        conn = Conn(auto=None)
        conn.send(UPGRADE + b"\r\nbye")
        [handler] = conn.handlers
        conn.codec.readConnectionLost()
        self.assertFalse(conn.closed)
        self.assertFalse(handler.was_reset)
        handler.sink.sendHeaders(switching(), False)
        proto = Recorder()
        self.assertTrue(handler.sink.switchProtocols(proto))
        self.assertTrue(proto.eof)
        self.assertEqual(handler.body, b"bye")

    def test_other_answer_is_an_ordinary_response_then_close(self) -> None:
        conn = Conn(auto=None)
        conn.send(UPGRADE + b"\r\n")
        [handler] = conn.handlers
        handler.respond(b"no", status=403)
        out = conn.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 403 Forbidden\r\n"), out)
        self.assertIn(b"connection: close", out)
        self.assertNotIn(b"upgrade", out.lower())
        self.assertTrue(conn.closed)

    def test_h2c_is_an_ordinary_request(self) -> None:
        conn = Conn(auto=None)
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        [handler] = conn.handlers
        assert handler.headers is not None
        self.assertTrue(handler.ended)
        for name in (b"upgrade", b"connection", b"http2-settings"):
            self.assertIsNone(handler.headers.get(name))


class Owner(Recorder):
    pass


class UpstreamCodecTests(unittest.TestCase):
    def setUp(self) -> None:
        self.idle: list[Http1ClientCodec] = []
        self.closed: list[Http1ClientCodec] = []
        self.codec = Http1ClientCodec(on_idle=self.idle.append, on_closed=self.closed.append)
        self.transport = HalfCloseTransport()
        self.codec.makeConnection(self.transport)
        self.response = Sink()
        self.got: list[tuple[Headers, bool]] = []
        self.response.decodeHeaders = lambda h, e: self.got.append((h, e))  # type: ignore
        self.response.onUpstreamReset = lambda why: self.fail(why)  # type: ignore

    def start(self) -> None:
        self.codec.start_request(request_headers((b"content-length", b"3")), False,
                                 self.response)

    def test_request_raw_and_the_101_taken_over(self) -> None:
        self.start()
        self.codec.send_data(b"abc", False)
        self.codec.send_data(b"frames", True)  # an upgrade's request never ends here
        self.assertEqual(self.transport.value(),
                         b"GET /chat HTTP/1.1\r\nhost: ws.test\r\nupgrade: websocket\r\n"
                         b"connection: upgrade\r\ncontent-length: 3\r\n\r\nabcframes")
        self.assertFalse(self.transport.write_closed)
        self.codec.dataReceived(SWITCHED + b"hello")
        [(headers, end)] = self.got
        self.assertFalse(end)
        self.assertEqual(headers.get(b":status"), b"101")
        self.assertEqual(headers.get(b"upgrade"), b"websocket")
        self.assertEqual(headers.get(b"connection"), b"upgrade")
        self.assertEqual(self.transport.producerState, "paused")  # one read held at most
        self.codec.dataReceived(b" world")
        owner = Owner()
        self.codec.take_over(owner)
        self.assertEqual(owner.data, b"hello world")
        self.assertEqual(self.transport.producerState, "producing")
        self.codec.dataReceived(b"!")
        self.codec.readConnectionLost()
        self.assertEqual((owner.data, owner.eof), (b"hello world!", True))
        self.codec.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertIsNotNone(owner.reason)
        self.assertEqual((self.idle, self.closed), ([], [self.codec]))

    def test_other_answer_is_not_reused(self) -> None:
        self.start()
        data: list[bytes] = []
        self.response.decodeData = lambda d, e: data.append(d)  # type: ignore
        self.codec.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n"
                                b"Connection: keep-alive\r\n\r\nno")
        self.assertEqual(self.got[0][0].get(b":status"), b"403")
        self.assertIsNone(self.got[0][0].get(b"upgrade"))
        self.assertEqual(data, [b"no"])
        self.assertEqual(self.idle, [])


@implementer(IResponseSink)
class SwitchingSink(Sink):
    """A sink whose downstream is a HalfCloseTransport once switched."""

    def __init__(self) -> None:
        super().__init__()
        self.downstream = HalfCloseTransport()
        self.protocol: Any = None

    def switchProtocols(self, protocol: Any) -> bool:
        self.events.append(("switched",))
        self.protocol = protocol
        protocol.makeConnection(self.downstream)
        return True


class RouterUpgradeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.counters = TunnelLog()
        self.refused = Counter("refused")
        self.records: list[FilterManager] = []

    def request(self, setup: Setup, sink: Sink, end: bool = False) -> FilterManager:
        router = RouterFilter(setup.clock, lambda cluster: setup.pool, self.counters)
        manager = FilterManager([StandardHeaders(None, upgrade_refused=self.refused), router],
                                sink, route_resolver=lambda h, c: setup.route)
        manager.on_destroy = self.records.append
        manager.decodeHeaders(request_headers(), end)
        return manager

    def test_sink_provides_its_interface(self) -> None:
        self.assertTrue(verifyObject(IResponseSink, SwitchingSink()))

    def test_refused_upgrade_is_403_upgrade_failed(self) -> None:
        s = Setup(HttpRoute(cluster="backend", upgrade_rejected=True))
        sink = SwitchingSink()
        manager = self.request(s, sink)
        self.assertEqual(sink.events[0][:2], ("headers", b"403"))
        self.assertEqual(manager.stream_info.response_code_details, "upgrade_failed")
        self.assertEqual(self.refused.value, 1)
        self.assertEqual(s.upstream.codecs, [])  # nothing went upstream
        self.assertEqual(len(self.records), 1)

    def test_101_relays_both_ways_with_half_close_and_one_record(self) -> None:
        s = Setup(HttpRoute(cluster="backend", idle_timeout=60.0))
        s.upstream.hold = True
        sink = SwitchingSink()
        manager = self.request(s, sink)
        manager.decodeData(b"early", False)
        self.assertEqual(sink.request_source.state, "paused")  # until connected
        s.upstream.release()
        [codec] = s.upstream.codecs
        self.assertEqual(sink.request_source.state, "producing")
        sent = s.upstream.sent()
        self.assertIn(b"upgrade: websocket\r\nconnection: upgrade\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\nearly"), sent)
        codec.dataReceived(SWITCHED + b"hello")
        self.assertEqual(sink.events[0][:2], ("headers", b"101"))
        self.assertEqual(sink.events[1], ("switched",))
        self.assertEqual(sink.downstream.value(), b"hello")
        self.assertEqual((self.counters.opened, self.counters.active), (1, 1))
        upstream = codec.transport
        assert isinstance(upstream, HalfCloseTransport)
        upstream.clear()
        sink.protocol.dataReceived(b"ping")
        self.assertEqual(upstream.value(), b"ping")
        # The client's EOF becomes the upstream's; the upstream answers on, then ends too.
        sink.protocol.readConnectionLost()
        self.assertTrue(upstream.write_closed)
        codec.dataReceived(b" after")
        self.assertEqual(sink.downstream.value(), b"hello after")
        codec.readConnectionLost()
        self.assertTrue(sink.downstream.write_closed)
        self.assertEqual(self.records, [])  # the request lasts as long as the relay
        codec.connectionLost(Failure(ierror.ConnectionDone()))
        sink.protocol.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(self.records, [manager])
        info = manager.stream_info
        self.assertEqual((info.response_code, info.bytes_received, info.bytes_sent),
                         (101, len(b"earlyping"), len(b"hello after")))
        self.assertEqual(info.flags_text(), "-")
        self.assertEqual((self.counters.opened, self.counters.active), (1, 0))
        self.assertEqual(s.pool.idle, [])

    def test_relay_idle_timeout(self) -> None:
        s = Setup(HttpRoute(cluster="backend", idle_timeout=30.0))
        sink = SwitchingSink()
        manager = self.request(s, sink)
        [codec] = s.upstream.codecs
        codec.dataReceived(SWITCHED)
        s.clock.advance(31)
        self.assertTrue(sink.downstream.aborted)
        upstream = codec.transport
        assert isinstance(upstream, HalfCloseTransport)
        self.assertTrue(upstream.aborted)
        codec.connectionLost(Failure(ierror.ConnectionLost()))
        sink.protocol.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertEqual(self.records, [manager])
        self.assertEqual(manager.stream_info.flags_text(), "SI")

    def test_no_answer_within_the_idle_timeout_is_408(self) -> None:
        s = Setup(HttpRoute(cluster="backend", timeout=1.0, idle_timeout=20.0))
        sink = SwitchingSink()
        manager = self.request(s, sink)
        s.clock.advance(5)  # the route timeout does not apply to an upgrade
        self.assertEqual(sink.events, [])
        s.clock.advance(16)
        self.assertEqual(sink.events[0][:2], ("headers", b"408"))
        self.assertEqual(manager.stream_info.flags_text(), "SI")
        self.assertTrue(s.upstream.codecs[0].transport.aborted)  # type: ignore[union-attr]

    def test_a_response_other_than_101_is_relayed_and_the_connection_dropped(self) -> None:
        s = Setup(HttpRoute(cluster="backend"))
        sink = SwitchingSink()
        manager = self.request(s, sink)
        [codec] = s.upstream.codecs
        codec.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope")
        self.assertEqual(sink.events[0][:2], ("headers", b"404"))
        self.assertEqual(sink.body, b"nope")
        self.assertNotIn(("switched",), sink.events)
        self.assertTrue(manager.complete)
        self.assertTrue(codec.transport.aborted)  # type: ignore[union-attr]
        self.assertEqual(s.pool.idle, [])
