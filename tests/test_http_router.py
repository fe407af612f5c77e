"""
The router HTTP filter with pooled upstream HTTP/1.1 connections (hbonex.filters.http.router,
client1, pool1), in memory: the filter chain on one side, upstream connections over
StringTransports on the other.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from hbonex.errors import UpstreamError
from hbonex.filters.http.router import HttpRoute, RouterFilter
from hbonex.http.filter_manager import FilterManager
from hbonex.http.headers import Headers
from hbonex.network.internal import InternalEndpointAddress
from hbonex.upstream.http1_client import Http1ClientCodec
from hbonex.upstream.http1_pool import Http1Pool
from tests.fakes import HalfCloseTransport
from tests.test_http_filter_manager import Sink


class Upstream:
    """The pool's connector: each connection is a codec over a HalfCloseTransport."""

    def __init__(self, clock: Clock, fail: Exception | None = None,
                 hold: bool = False) -> None:
        self.clock = clock
        self.fail = fail
        self.hold = hold
        self.codecs: list[Http1ClientCodec] = []
        self.held: list[tuple[Http1ClientCodec, defer.Deferred[Any]]] = []

    def __call__(self, codec: Http1ClientCodec) -> defer.Deferred[Any]:
        if self.fail is not None:
            return defer.fail(self.fail)
        if self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append((codec, d))
            return d
        return defer.succeed(self._connect(codec))

    def _connect(self, codec: Http1ClientCodec) -> None:
        codec.makeConnection(HalfCloseTransport())
        self.codecs.append(codec)

    def release(self) -> None:
        for codec, d in self.held:
            self._connect(codec)
            d.callback(None)
        self.held = []

    def sent(self, index: int = -1) -> bytes:
        transport = self.codecs[index].transport
        return transport.value()  # type: ignore[union-attr,no-any-return]


BACKEND = HttpRoute(cluster="backend")


class Setup:
    def __init__(self, route: HttpRoute | None = BACKEND, **pool: Any) -> None:
        self.clock = Clock()
        self.upstream = Upstream(self.clock)
        self.pool = Http1Pool(self.clock, self.upstream, **pool)
        self.route = route

    def request(self, headers: Headers | None = None,
                end: bool = True) -> tuple[FilterManager, Sink]:
        sink = Sink()
        router = RouterFilter(self.clock, lambda cluster: self.pool)
        manager = FilterManager([router], sink, route_resolver=lambda h, c: self.route)
        manager.decodeHeaders(headers or Headers.of(method="GET", path="/x", authority="svc",
                                                     scheme="http"), end)
        return manager, sink


def respond(codec: Http1ClientCodec, data: bytes) -> None:
    codec.dataReceived(data)


class RouterTests(unittest.TestCase):
    def test_get_and_connection_reuse(self) -> None:
        s = Setup()
        manager, sink = s.request()
        self.assertEqual(s.upstream.sent(), b"GET /x HTTP/1.1\r\nhost: svc\r\n\r\n")
        respond(s.upstream.codecs[0], b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                      b"Connection: keep-alive\r\n\r\nhello")
        self.assertEqual(sink.events[0][:2], ("headers", b"200"))
        self.assertEqual(sink.body, b"hello")
        self.assertTrue(manager.complete)
        self.assertEqual(len(s.pool.idle), 1)
        _, sink2 = s.request()
        self.assertEqual(len(s.upstream.codecs), 1)  # the same connection again
        respond(s.upstream.codecs[0], b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(sink2.events, [("headers", b"204", True)])

    def test_upstream_response_details_and_internal_upstream_host(self) -> None:
        """
        As Envoy: an upstream's response is %RESPONSE_CODE_DETAILS% via_upstream, and an
        internal listener endpoint's %UPSTREAM_HOST% is envoy://LISTENER/ENDPOINT_ID.
        """
        s = Setup()
        peer = InternalEndpointAddress("connect_originate", "10.0.0.7:8080")

        class Internal(HalfCloseTransport):
            def getPeer(self) -> Any:
                return peer

        def connect(codec: Http1ClientCodec) -> defer.Deferred[Any]:
            codec.makeConnection(Internal())
            s.upstream.codecs.append(codec)
            return defer.succeed(None)

        s.pool = Http1Pool(s.clock, connect)
        manager, sink = s.request()
        respond(s.upstream.codecs[0], b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(sink.body, b"ok")
        self.assertEqual(manager.stream_info.response_code_details, "via_upstream")
        self.assertEqual(manager.stream_info.upstream_host,
                         "envoy://connect_originate/10.0.0.7:8080")

    def test_body_sent_before_the_connection_is_up_is_kept_in_order(self) -> None:
        s = Setup()
        s.upstream.hold = True
        manager, sink = s.request(Headers.of(method="POST", path="/up", authority="svc",
                                             scheme="http"), end=False)
        manager.decodeData(b"one ", False)
        manager.decodeData(b"two", True)
        s.upstream.release()
        self.assertEqual(
            s.upstream.sent(),
            b"POST /up HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
            b"4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n",
        )

    def test_chunked_response_with_trailers(self) -> None:
        s = Setup()
        _, sink = s.request()
        respond(s.upstream.codecs[0], b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n")
        self.assertEqual(sink.body, b"abc")
        self.assertEqual(sink.events[-1], ("trailers", [(b"x-sum", b"9")]))

    def test_rewrites(self) -> None:
        s = Setup(HttpRoute(cluster="b", prefix_rewrite=(b"/x", b"/api/x"),
                            host_rewrite=b"internal"))
        s.request()
        self.assertEqual(s.upstream.sent(), b"GET /api/x HTTP/1.1\r\nhost: internal\r\n\r\n")


class LocalReplyTests(unittest.TestCase):
    def test_no_route_is_404_nr(self) -> None:
        s = Setup(route=None)
        manager, sink = s.request()
        self.assertEqual(sink.events[0][:2], ("headers", b"404"))
        self.assertEqual(manager.stream_info.flags_text(), "NR")

    def test_direct_response_200(self) -> None:
        s = Setup(HttpRoute(direct_status=200, direct_body=b"fine"))
        _, sink = s.request()
        self.assertEqual((sink.events[0][1], sink.body), (b"200", b"fine"))

    def test_connect_failure_is_503_uf(self) -> None:
        s = Setup()
        s.upstream.fail = UpstreamError(503, "connect to 10.0.0.1:80 failed: refused")
        manager, sink = s.request()
        self.assertEqual(sink.events[0][:2], ("headers", b"503"))
        self.assertEqual(manager.stream_info.flags_text(), "UF")
        self.assertIn("refused", manager.stream_info.response_code_details)

    def test_circuit_breaker_is_503_uo(self) -> None:
        s = Setup(max_connections=1, max_pending=0)
        s.request()
        manager, sink = s.request()
        self.assertEqual(sink.events[0][:2], ("headers", b"503"))
        self.assertEqual(manager.stream_info.flags_text(), "UO")

    def test_timeout_is_504_ut_and_the_upstream_is_dropped(self) -> None:
        s = Setup(HttpRoute(cluster="b", timeout=2))
        manager, sink = s.request()
        s.clock.advance(1.9)
        self.assertEqual(sink.events, [])
        s.clock.advance(0.1)
        self.assertEqual(sink.events[0][:2], ("headers", b"504"))
        self.assertEqual(manager.stream_info.flags_text(), "UT")
        self.assertTrue(s.upstream.codecs[0].transport.aborted)  # type: ignore[union-attr]

    def test_reset_before_the_response_is_503_uc(self) -> None:
        s = Setup()
        manager, sink = s.request()
        s.upstream.codecs[0].connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertEqual(sink.events[0][:2], ("headers", b"503"))
        self.assertEqual(manager.stream_info.flags_text(), "UC")

    def test_truncated_response_resets_downstream(self) -> None:
        s = Setup()
        manager, sink = s.request()
        codec = s.upstream.codecs[0]
        respond(codec, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        codec.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertTrue(sink.was_reset)
        self.assertFalse(any(e[0] == "data" and e[2] for e in sink.events))

    def test_close_delimited_response_ends_at_fin(self) -> None:
        s = Setup()
        manager, sink = s.request()
        codec = s.upstream.codecs[0]
        respond(codec, b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        codec.readConnectionLost()
        self.assertEqual(sink.body, b"until the end")
        self.assertTrue(manager.complete)
        self.assertFalse(sink.was_reset)

    def test_malformed_response_is_503(self) -> None:
        s = Setup()
        manager, sink = s.request()
        respond(s.upstream.codecs[0], b"HTTP/1.1 2OO OK\r\n\r\n")
        self.assertEqual(sink.events[0][:2], ("headers", b"503"))


class H2UpstreamTests(unittest.TestCase):
    """The router sending requests upstream as HTTP/2 streams (hbonex.upstream.http2_pool)."""

    def setUp(self) -> None:
        from hbonex.h2.settings import H2Settings
        from hbonex.tunnel.client import H2TunnelClient
        from tests.test_http_codec2 import Server

        self.clock = Clock()
        self.server = Server(self.clock)
        self.client = H2TunnelClient(H2Settings(), self.clock)
        self.server_t, self.client_t = HalfCloseTransport(), HalfCloseTransport()
        self.server.makeConnection(self.server_t)
        self.client.makeConnection(self.client_t)
        self.client.handshakeCompleted()
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            a, b = self.client_t.value(), self.server_t.value()
            if not a and not b:
                return
            self.client_t.clear()
            self.server_t.clear()
            if a:
                self.server.dataReceived(a)
            if b:
                self.client.dataReceived(b)
        raise AssertionError("never quiet")

    def request(self, body: bytes) -> tuple[FilterManager, Sink]:
        from hbonex.upstream.http2_pool import H2Exchange

        class Pool:
            def acquire(inner: Any) -> defer.Deferred[Any]:
                return defer.succeed(H2Exchange(self.client))

        sink = Sink()
        router = RouterFilter(self.clock, lambda cluster: Pool())
        manager = FilterManager([router], sink,
                                route_resolver=lambda h, c: HttpRoute(cluster="h2"))
        manager.decodeHeaders(Headers.of(method="POST", path="/echo", authority="svc",
                                         scheme="http", connection="keep-alive"), False)
        manager.decodeData(body, True)
        self.pump()
        return manager, sink

    def test_request_and_response_with_trailers_over_a_stream(self) -> None:
        body = bytes(range(256)) * 400  # beyond the default 64 KiB windows
        manager, sink = self.request(body)
        self.assertEqual(sink.events[0][:2], ("headers", b"200"))
        self.assertEqual(sink.body, body)
        self.assertEqual(sink.events[-1], ("trailers", [(b"x-length", str(len(body)).encode())]))
        self.assertTrue(manager.complete)
        self.assertEqual(self.client.streams, {})
        self.assertEqual(self.server.streams, {})

    def test_many_requests_share_one_connection(self) -> None:
        results = [self.request(b"request %d" % i) for i in range(20)]
        for i, (_, sink) in enumerate(results):
            self.assertEqual(sink.body, b"request %d" % i)
        self.assertEqual(len(self.server.managers), 20)


class BackpressureTests(unittest.TestCase):
    def test_producers_back_to_back(self) -> None:
        """
        A full upstream pauses reading the request from the client; a full client pauses
        reading the response from the upstream; the request's end unwires the first.
        """
        s = Setup()
        manager, sink = s.request(Headers.of(method="POST", path="/up", authority="svc",
                                             scheme="http"), end=False)
        upstream = s.upstream.codecs[0].transport
        assert upstream is not None
        self.assertIs(upstream.producer, sink.request_source)  # type: ignore[attr-defined]
        upstream.producer.pauseProducing()  # type: ignore[attr-defined]
        self.assertEqual(sink.request_source.state, "paused")
        manager.decodeData(b"last", True)
        self.assertIsNone(upstream.producer)  # type: ignore[attr-defined]
        self.assertEqual(sink.request_source.state, "producing")
        # The response side: the client is full, the upstream connection stops being read.
        respond(s.upstream.codecs[0], b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        sink.producer.pauseProducing()
        self.assertEqual(upstream.producerState, "paused")  # type: ignore[attr-defined]
        sink.producer.resumeProducing()
        self.assertEqual(upstream.producerState, "producing")  # type: ignore[attr-defined]
        respond(s.upstream.codecs[0], b"67890")
        self.assertEqual(sink.body, b"1234567890")
        self.assertIsNone(sink.producer)  # unregistered at the response's end


class RetryTests(unittest.TestCase):
    def setup(self, **policy: Any) -> Setup:
        from hbonex.http.retry_policy import RetryPolicy

        fields = {"retry_on": frozenset({"5xx"}), "num_retries": 2, **policy}
        return Setup(HttpRoute(cluster="b", retry_policy=RetryPolicy(**fields)))

    def post(self, s: Setup, body: bytes) -> tuple[FilterManager, Sink]:
        manager, sink = s.request(Headers.of(method="POST", path="/up", authority="svc",
                                             scheme="http"), end=False)
        manager.decodeData(body, True)
        return manager, sink

    def test_a_5xx_is_retried_with_the_body_replayed(self) -> None:
        s = self.setup()
        manager, sink = self.post(s, b"payload")
        first = s.upstream.sent(0)
        respond(s.upstream.codecs[0], b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.events, [])  # nothing of the failed attempt went downstream
        s.clock.advance(0.25)  # the longest first back-off
        self.assertEqual(len(s.upstream.codecs), 2)
        self.assertEqual(s.upstream.sent(1), first)  # the same request, body included
        respond(s.upstream.codecs[1], b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual((sink.events[0][:2], sink.body), (("headers", b"200"), b"ok"))
        self.assertEqual(manager.stream_info.flags_text(), "-")  # no flags
        self.assertTrue(manager.complete)

    def test_retries_run_out_the_last_answer_stands_urx(self) -> None:
        s = self.setup(num_retries=1)
        manager, sink = self.post(s, b"x")
        respond(s.upstream.codecs[0], b"HTTP/1.1 502 Bad\r\nContent-Length: 0\r\n\r\n")
        s.clock.advance(0.25)
        respond(s.upstream.codecs[1], b"HTTP/1.1 503 Still\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.events[0][:2], ("headers", b"503"))
        self.assertEqual(manager.stream_info.flags_text(), "URX")
        self.assertEqual(len(s.upstream.codecs), 2)

    def test_a_body_past_the_buffer_limit_is_not_retried(self) -> None:
        s = self.setup(buffer_limit=4)
        _, sink = self.post(s, b"too long")
        respond(s.upstream.codecs[0], b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.events[0][:2], ("headers", b"503"))
        self.assertEqual(len(s.upstream.codecs), 1)

    def test_connect_failure_then_success(self) -> None:
        s = self.setup(retry_on=frozenset({"connect-failure"}))
        s.upstream.fail = UpstreamError(503, "connect to 10.0.0.1:80 failed: refused")
        manager, sink = s.request()
        self.assertEqual(sink.events, [])
        s.upstream.fail = None
        s.clock.advance(0.25)
        respond(s.upstream.codecs[0], b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(sink.events, [("headers", b"204", True)])

    def test_a_status_not_in_retry_on_is_not_retried(self) -> None:
        s = self.setup(retry_on=frozenset({"gateway-error"}))
        _, sink = s.request()
        respond(s.upstream.codecs[0], b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.events[0][:2], ("headers", b"500"))

    def test_per_try_timeout_starts_another_attempt(self) -> None:
        s = self.setup(retry_on=frozenset({"reset"}), per_try_timeout=1.0)
        _, sink = s.request()
        s.clock.advance(1.0)
        self.assertTrue(s.upstream.codecs[0].transport.aborted)  # type: ignore[union-attr]
        s.clock.advance(0.25)
        respond(s.upstream.codecs[1], b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.events[0][:2], ("headers", b"200"))
