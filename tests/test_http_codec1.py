"""
The downstream HTTP/1.1 codec (hbonex.http.codec1) over an in-memory transport: framing,
keep-alive and pipelining, 100-continue, and the request-smuggling cases that must be 400.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.http.codec1 import Http1Limits, Http1ServerCodec
from hbonex.http.headers import Headers
from tests.fakes import HalfCloseTransport


class Handler:
    """Records decode calls; ``respond`` answers through the sink."""

    def __init__(self, sink: Any, auto: bytes | None) -> None:
        self.sink = sink
        self.auto = auto
        self.headers: Headers | None = None
        self.body = b""
        self.trailers: Headers | None = None
        self.ended = False
        self.was_reset = False

    def decodeHeaders(self, headers: Headers, endStream: bool) -> None:
        self.headers = headers
        self._maybe_end(endStream)

    def decodeData(self, data: bytes, endStream: bool) -> None:
        self.body += data
        self._maybe_end(endStream)

    def decodeTrailers(self, trailers: Headers) -> None:
        self.trailers = trailers
        self._maybe_end(True)

    def _maybe_end(self, end: bool) -> None:
        if end:
            self.ended = True
            if self.auto is not None:
                self.respond(self.auto)

    def respond(self, body: bytes, status: int = 200) -> None:
        self.sink.sendHeaders(Headers([(b":status", str(status).encode()),
                                       (b"content-length", str(len(body)).encode())]),
                              not body)
        if body:
            self.sink.sendData(body, True)

    def reset(self) -> None:
        # As the FilterManager does: the sink hears of it too.
        self.was_reset = True
        self.sink.reset()


class Conn:
    def __init__(self, auto: bytes | None = b"ok", **limits: Any) -> None:
        self.clock = Clock()
        self.handlers: list[Handler] = []
        self.codec = Http1ServerCodec(self._new, self.clock, Http1Limits(**limits))
        self.transport = HalfCloseTransport()
        self.codec.makeConnection(self.transport)
        self.auto = auto

    def _new(self, sink: Any) -> Handler:
        handler = Handler(sink, self.auto)
        self.handlers.append(handler)
        return handler

    def send(self, data: bytes) -> bytes:
        self.codec.dataReceived(data)
        self.clock.advance(0)
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.aborted


GET = b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n"


class RequestTests(unittest.TestCase):
    def test_get_becomes_http2_style_headers(self) -> None:
        c = Conn()
        out = c.send(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Test: 1\r\n\r\n")
        [h] = c.handlers
        assert h.headers is not None
        self.assertEqual(h.headers.items(), [
            (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example.com"),
            (b":path", b"/a?b=1"), (b"x-test", b"1"),
        ])
        self.assertTrue(h.ended)
        self.assertEqual(out, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.assertFalse(c.closed)

    def test_absolute_form(self) -> None:
        c = Conn()
        c.send(b"GET http://other.example:8080/p HTTP/1.1\r\nHost: ignored\r\n\r\n")
        headers = c.handlers[0].headers
        assert headers is not None
        self.assertEqual((headers.get(b":authority"), headers.get(b":path")),
                         (b"other.example:8080", b"/p"))

    def test_content_length_body_in_pieces(self) -> None:
        c = Conn(auto=None)
        c.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
        h = c.handlers[0]
        self.assertEqual((h.body, h.ended), (b"hello", False))
        c.send(b"world")
        self.assertEqual((h.body, h.ended), (b"helloworld", True))

    def test_chunked_body_with_extensions_and_trailers(self) -> None:
        c = Conn()
        c.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n")
        h = c.handlers[0]
        self.assertEqual(h.body, b"hello world")
        assert h.trailers is not None
        self.assertEqual(h.trailers.items(), [(b"x-sum", b"42")])
        assert h.headers is not None
        self.assertNotIn(b"transfer-encoding", h.headers)

    def test_expect_100_continue_is_answered_here(self) -> None:
        c = Conn(auto=None)
        out = c.send(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 3\r\n\r\n")
        self.assertEqual(out, b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = c.handlers[0].headers
        assert headers is not None
        self.assertNotIn(b"expect", headers)

    def test_hop_by_hop_headers_are_stripped(self) -> None:
        c = Conn()
        c.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, x-private\r\n"
               b"X-Private: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Kept: 2\r\n\r\n")
        headers = c.handlers[0].headers
        assert headers is not None
        self.assertEqual([n for n, _ in headers if not n.startswith(b":")],
                         [b"te", b"x-kept"])


class KeepAliveTests(unittest.TestCase):
    def test_pipelined_requests_are_answered_in_order(self) -> None:
        c = Conn(auto=None)
        c.send(GET + b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(len(c.handlers), 1)  # the second waits for the first's response
        self.assertTrue(c.transport.producerState == "paused")
        c.handlers[0].respond(b"first")
        c.clock.advance(0)
        self.assertEqual(len(c.handlers), 2)
        c.handlers[1].respond(b"second")
        out = c.transport.value()
        self.assertLess(out.index(b"first"), out.index(b"second"))
        self.assertEqual(c.transport.producerState, "producing")

    def test_http10_closes_after_a_body_without_length(self) -> None:
        c = Conn(auto=None)
        c.send(b"GET / HTTP/1.0\r\n\r\n")
        sink = c.handlers[0].sink
        sink.sendHeaders(Headers([(b":status", b"200")]), False)
        sink.sendData(b"streamed", True)
        out = c.transport.value()
        self.assertIn(b"connection: close", out)
        self.assertTrue(out.endswith(b"\r\n\r\nstreamed"))
        self.assertTrue(c.closed)

    def test_streamed_response_is_chunked_with_trailers(self) -> None:
        c = Conn(auto=None)
        c.send(GET)
        sink = c.handlers[0].sink
        sink.sendHeaders(Headers([(b":status", b"200"), (b"connection", b"x")]), False)
        sink.sendData(b"abc", False)
        sink.sendTrailers(Headers([(b"grpc-status", b"0")]))
        self.assertEqual(
            c.transport.value(),
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
            b"0\r\ngrpc-status: 0\r\n\r\n",
        )

    def test_connection_close_requested(self) -> None:
        c = Conn()
        out = c.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertIn(b"connection: close", out)
        self.assertTrue(c.closed)

    def test_head_response_has_no_body(self) -> None:
        c = Conn()
        out = c.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(out, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")

    def test_early_response_closes_instead_of_reading_the_body(self) -> None:
        c = Conn(auto=None)
        c.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\npartial")
        c.handlers[0].respond(b"too large", status=413)
        self.assertIn(b"connection: close", c.transport.value())
        self.assertTrue(c.closed)

    def test_client_leaving_mid_body_resets_the_request(self) -> None:
        c = Conn(auto=None)
        c.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\npartial")
        c.codec.readConnectionLost()
        self.assertTrue(c.handlers[0].was_reset)


class BadRequestTests(unittest.TestCase):
    def assert_rejected(self, data: bytes, status: int = 400, **limits: Any) -> None:
        c = Conn(**limits)
        out = c.send(data)
        self.assertTrue(out.startswith(b"HTTP/1.1 %d " % status), out)
        self.assertIn(b"connection: close", out)
        self.assertTrue(c.closed)
        for h in c.handlers:
            self.assertFalse(h.ended, "a rejected request reached the filters whole")

    def test_content_length_and_transfer_encoding(self) -> None:
        self.assert_rejected(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")

    def test_conflicting_content_lengths(self) -> None:
        self.assert_rejected(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                             b"Content-Length: 4\r\n\r\nabcd")
        self.assert_rejected(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\n")
        self.assert_rejected(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n")

    def test_bad_chunk_sizes(self) -> None:
        for size in (b"0x10", b"-1", b"zz", b"", b"1" * 17):
            self.assert_rejected(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
                                 b"\r\n\r\n" + size + b"\r\n")

    def test_chunk_without_its_crlf(self) -> None:
        self.assert_rejected(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
                             b"\r\n\r\n3\r\nabcX\r\n")

    def test_transfer_codings_other_than_chunked(self) -> None:
        self.assert_rejected(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip"
                             b"\r\n\r\n")
        self.assert_rejected(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked"
                             b"\r\n\r\n", status=501)

    def test_obs_fold(self) -> None:
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  continued\r\n\r\n")

    def test_nul_and_bare_cr_in_values(self) -> None:
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n")
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n")

    def test_malformed_lines(self) -> None:
        self.assert_rejected(b"GET /\r\n\r\n")
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: 1\r\n\r\n")
        self.assert_rejected(b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assert_rejected(b"GET / HTTP/1.1\r\n\r\n")  # no Host

    def test_over_long_request_line(self) -> None:
        self.assert_rejected(b"GET /" + b"a" * 20000, max_request_line=16384)

    def test_headers_over_the_limit_are_431(self) -> None:
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: " + b"a" * 70000,
                             status=431)

    def test_slow_head_is_cut_at_request_headers_timeout(self) -> None:
        c = Conn(request_headers_timeout=2)
        c.send(b"GET / HTTP/1.1\r\nHo")
        c.clock.advance(1.9)
        self.assertFalse(c.closed)
        c.clock.advance(0.1)
        self.assertTrue(c.transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(c.closed)

    def test_idle_kept_alive_connection_is_closed(self) -> None:
        c = Conn(idle_timeout=30, request_headers_timeout=0)
        c.send(GET)
        c.clock.advance(29)
        self.assertFalse(c.closed)
        c.clock.advance(1)
        self.assertTrue(c.closed)
