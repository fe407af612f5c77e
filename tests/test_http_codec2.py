"""
Ordinary HTTP/2 requests through hbonex.http.codec2 and the filter chain, in memory: an
H2TunnelConnection serving requests against the plain ``h2`` library as the client.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from hbonex.h2.connection import H2TunnelConnection
from hbonex.h2.settings import H2Settings
from hbonex.http.codec2 import malformed_request, serve_request
from hbonex.http.filter_manager import FilterDataStatus, FilterHeadersStatus, FilterManager
from hbonex.http.headers import Headers
from hbonex.interfaces import IStreamDecoderFilter
from tests.fakes import HalfCloseTransport


@implementer(IStreamDecoderFilter)
class EchoRouter:
    """Answers each request with its body, and trailers carrying the body length."""

    instances: list[EchoRouter] = []

    def __init__(self) -> None:
        self.body = b""
        self.callbacks: Any = None
        self.destroyed = False
        EchoRouter.instances.append(self)

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        self.path = headers.get(b":path")
        if endStream:
            self._answer()
        return FilterHeadersStatus.StopIteration

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        self.body += data
        if endStream:
            self._answer()
        return FilterDataStatus.StopIterationNoBuffer

    def decodeTrailers(self, trailers: Headers) -> Any:
        self.body += b"|" + (trailers.get(b"x-checksum") or b"")
        self._answer()
        return None

    def _answer(self) -> None:
        cb = self.callbacks
        cb.encodeHeaders(Headers([(b":status", b"200")]), False)
        cb.encodeData(self.body or b"empty", False)
        cb.encodeTrailers(Headers([(b"x-length", str(len(self.body)).encode())]))

    def onDestroy(self) -> None:
        self.destroyed = True


class Server(H2TunnelConnection):
    def __init__(self, clock: Clock) -> None:
        super().__init__(H2Settings(initial_stream_window_size=65535), clock)
        self.managers: list[FilterManager] = []

    def request_received(self, event: h2.events.RequestReceived) -> None:
        serve_request(self, event.stream_id, event.headers,
                      event.stream_ended is not None, self._new)

    def _new(self, sink: Any) -> FilterManager:
        manager = FilterManager([EchoRouter()], sink)
        self.managers.append(manager)
        return manager


class Pair:
    def __init__(self) -> None:
        self.clock = Clock()
        self.server = Server(self.clock)
        self.server_transport = HalfCloseTransport()
        self.server.makeConnection(self.server_transport)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.client.initiate_connection()
        self.events: list[Any] = []
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
                    if isinstance(event, h2.events.DataReceived):
                        self.client.acknowledge_received_data(event.flow_controlled_length,
                                                              event.stream_id)
            if not out and not back:
                return
        raise AssertionError("never quiet")

    def request(self, path: bytes, body: bytes = b"", trailers: bool = False,
                extra: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.client.get_next_available_stream_id()
        headers = [(b":method", b"POST" if body else b"GET"), (b":scheme", b"https"),
                   (b":authority", b"svc"), (b":path", path), *(extra or [])]
        self.client.send_headers(sid, headers, end_stream=not body and not trailers)
        if body:
            for i in range(0, len(body), 16384):
                piece = body[i:i + 16384]
                last = i + 16384 >= len(body)
                self.client.send_data(sid, piece, end_stream=last and not trailers)
                self.pump()
        if trailers:
            self.client.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
        self.pump()
        return sid

    def response(self, sid: int) -> tuple[dict[bytes, bytes], bytes, dict[bytes, bytes], bool]:
        headers: dict[bytes, bytes] = {}
        trailers: dict[bytes, bytes] = {}
        body = b""
        ended = False
        for e in self.events:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, h2.events.ResponseReceived):
                headers = dict(e.headers)
            elif isinstance(e, h2.events.DataReceived):
                body += e.data
            elif isinstance(e, h2.events.TrailersReceived):
                trailers = dict(e.headers)
            elif isinstance(e, h2.events.StreamEnded):
                ended = True
        return headers, body, trailers, ended


class RequestTests(unittest.TestCase):
    def test_get(self) -> None:
        pair = Pair()
        sid = pair.request(b"/hello")
        headers, body, trailers, ended = pair.response(sid)
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual((body, trailers, ended), (b"empty", {b"x-length": b"0"}, True))
        self.assertEqual(pair.server.streams, {})
        self.assertTrue(pair.server.managers[0].complete)

    def test_post_body_and_trailers_both_ways_beyond_the_window(self) -> None:
        pair = Pair()
        body = bytes(range(256)) * 1024  # 256 KiB: four times the 64 KiB windows
        sid = pair.request(b"/upload", body, trailers=True)
        headers, echoed, trailers, ended = pair.response(sid)
        self.assertEqual(echoed, body + b"|abc")
        self.assertEqual(trailers, {b"x-length": str(len(body) + 4).encode()})
        self.assertTrue(ended)

    def test_many_concurrent_requests_on_one_connection(self) -> None:
        pair = Pair()
        sids = []
        for _ in range(100):
            sid = pair.client.get_next_available_stream_id()
            pair.client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                                           (b":authority", b"svc"), (b":path", b"/")])
            sids.append(sid)
        pair.pump()
        for i, sid in enumerate(sids):
            pair.client.send_data(sid, b"request %d" % i, end_stream=True)
        pair.pump()
        for i, sid in enumerate(sids):
            self.assertEqual(pair.response(sid)[1], b"request %d" % i)

    def test_malformed_request_is_a_stream_error(self) -> None:
        pair = Pair()
        bad = pair.request(b"/", extra=[(b"Upper", b"x")])
        good = pair.request(b"/fine")
        resets = [e for e in pair.events if isinstance(e, h2.events.StreamReset)]
        self.assertEqual([(e.stream_id, e.error_code) for e in resets],
                         [(bad, ErrorCodes.PROTOCOL_ERROR)])
        self.assertEqual(pair.response(good)[1], b"empty")

    def test_client_reset_mid_request_resets_the_chain(self) -> None:
        pair = Pair()
        EchoRouter.instances.clear()
        sid = pair.client.get_next_available_stream_id()
        pair.client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                                       (b":authority", b"svc"), (b":path", b"/")])
        pair.client.send_data(sid, b"partial")
        pair.pump()
        pair.client.reset_stream(sid, ErrorCodes.CANCEL)
        pair.pump()
        [manager] = pair.server.managers
        self.assertIn("DC", manager.stream_info.response_flags)
        self.assertTrue(EchoRouter.instances[-1].destroyed)
        self.assertEqual(pair.server.streams, {})


class ValidationTests(unittest.TestCase):
    def check(self, items: list[tuple[bytes, bytes]]) -> str | None:
        return malformed_request(items)

    def test_rules(self) -> None:
        ok = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
              (b":authority", b"a")]
        self.assertIsNone(self.check(ok))
        self.assertIsNone(self.check([(b":method", b"CONNECT"), (b":authority", b"a:1")]))
        self.assertIsNone(self.check(ok + [(b"te", b"trailers")]))
        self.assertIn("uppercase", self.check(ok + [(b"X-Up", b"1")]) or "")
        self.assertIn("connection-specific", self.check(ok + [(b"connection", b"x")]) or "")
        self.assertIn("no :scheme", self.check(ok[:1] + ok[2:]) or "")
        self.assertIn("unknown pseudo", self.check(ok + [(b":x", b"1")]) or "")
        self.assertIn("invalid character", self.check(ok + [(b"a", b"b\nc")]) or "")
        self.assertIn("empty :path",
                      self.check([(b":method", b"GET"), (b":scheme", b"h"), (b":path", b"")])
                      or "")
