"""
The per-request HTTP filter chain (hbonex.http.filter_manager): Envoy's decoder/encoder filter
model, with in-memory filters and sink.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hbonex.http.filter_manager import (
    FilterDataStatus,
    FilterHeadersStatus,
    FilterManager,
    FilterTrailersStatus,
    IResponseSink,
)
from hbonex.http.headers import Headers
from hbonex.http.stream_info import FilterState, FilterStateError, SharedWithUpstream
from hbonex.interfaces import (
    IStreamDecoderFilterCallbacks,
    IStreamEncoderFilterCallbacks,
    IStreamFilter,
)

H, D, T = FilterHeadersStatus, FilterDataStatus, FilterTrailersStatus


@implementer(IResponseSink)
class Sink:
    def __init__(self) -> None:
        from tests.fakes import FakeProducer

        self.events: list[tuple[Any, ...]] = []
        self.was_reset = False
        self.producer: Any = None
        #: What the router pauses when the upstream is full.
        self.request_source = FakeProducer()

    def sendHeaders(self, headers: Headers, endStream: bool) -> None:
        self.events.append(("headers", headers.get(b":status"), endStream))

    def sendData(self, data: bytes, endStream: bool) -> None:
        self.events.append(("data", data, endStream))

    def sendTrailers(self, trailers: Headers) -> None:
        self.events.append(("trailers", trailers.items()))

    def reset(self) -> None:
        self.was_reset = True

    def registerProducer(self, producer: Any) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def requestProducer(self) -> Any:
        return self.request_source

    def switchProtocols(self, protocol: Any) -> bool:
        self.events.append(("switched", protocol))
        return True

    @property
    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")


@implementer(IStreamFilter)
class Recorder:
    """
    Records every call in a shared log; answers with the statuses it is given (per call
    kind, a list consumed in order; Continue when exhausted).
    """

    def __init__(self, name: str, log: list[tuple[Any, ...]], **answers: list[Any]) -> None:
        self.name = name
        self.log = log
        self.answers = answers
        self.decoder: Any = None
        self.encoder: Any = None
        self.destroyed = 0

    def _answer(self, kind: str, default: Any) -> Any:
        queue = self.answers.get(kind)
        return queue.pop(0) if queue else default

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder = callbacks

    def setEncoderFilterCallbacks(self, callbacks: Any) -> None:
        self.encoder = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        self.log.append((self.name, "decodeHeaders", endStream))
        return self._answer("headers", H.Continue)

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        self.log.append((self.name, "decodeData", data, endStream))
        return self._answer("data", D.Continue)

    def decodeTrailers(self, trailers: Headers) -> Any:
        self.log.append((self.name, "decodeTrailers"))
        return self._answer("trailers", T.Continue)

    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        self.log.append((self.name, "encodeHeaders", headers.get(b":status"), endStream))
        return self._answer("eheaders", H.Continue)

    def encodeData(self, data: bytes, endStream: bool) -> Any:
        self.log.append((self.name, "encodeData", data, endStream))
        return self._answer("edata", D.Continue)

    def encodeTrailers(self, trailers: Headers) -> Any:
        self.log.append((self.name, "encodeTrailers"))
        return self._answer("etrailers", T.Continue)

    def onDestroy(self) -> None:
        self.destroyed += 1


@implementer(IStreamFilter)
class Router(Recorder):
    """The terminal filter: answers 200 echoing the request body once the request ended."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        super().__init__("router", log)
        self.body = b""

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        super().decodeHeaders(headers, endStream)
        if endStream:
            self.decoder.encodeHeaders(Headers([(b":status", b"200")]), True)
        return H.StopIteration

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        super().decodeData(data, endStream)
        self.body += data
        if endStream:
            self.decoder.encodeHeaders(Headers([(b":status", b"200")]), False)
            self.decoder.encodeData(self.body, True)
        return D.StopIterationNoBuffer


def request() -> Headers:
    return Headers.of(method="POST", path="/", authority="a", scheme="http")


def chain(*filters: Any, limit: int = 1024 * 1024,
          resolver: Callable[..., Any] | None = None) -> tuple[FilterManager, Sink]:
    sink = Sink()
    return FilterManager(filters, sink, route_resolver=resolver, buffer_limit=limit), sink


class OrderTests(unittest.TestCase):
    def test_decoding_in_order_encoding_in_reverse(self) -> None:
        log: list[Any] = []
        a, b, router = Recorder("a", log), Recorder("b", log), Router(log)
        manager, sink = chain(a, b, router)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"hello", True)
        self.assertEqual(log, [
            ("a", "decodeHeaders", False), ("b", "decodeHeaders", False),
            ("router", "decodeHeaders", False),
            ("a", "decodeData", b"hello", True), ("b", "decodeData", b"hello", True),
            ("router", "decodeData", b"hello", True),
            ("router", "encodeHeaders", b"200", False), ("b", "encodeHeaders", b"200", False),
            ("a", "encodeHeaders", b"200", False),
            ("router", "encodeData", b"hello", True), ("b", "encodeData", b"hello", True),
            ("a", "encodeData", b"hello", True),
        ])
        self.assertEqual(sink.events, [("headers", b"200", False), ("data", b"hello", True)])
        self.assertTrue(manager.complete)
        self.assertEqual([f.destroyed for f in (a, b, router)], [1, 1, 1])

    def test_callbacks_provide_their_interfaces(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log)
        chain(a, Router(log))
        self.assertTrue(verifyObject(IStreamDecoderFilterCallbacks, a.decoder))
        self.assertTrue(verifyObject(IStreamEncoderFilterCallbacks, a.encoder))
        self.assertTrue(verifyObject(IResponseSink, Sink()))


class StopAndResumeTests(unittest.TestCase):
    def test_stop_headers_then_resume_later(self) -> None:
        """
        An asynchronous check: headers held at 'a'; body chunks reach 'a' (buffered there),
        nothing reaches 'b' until 'a' continues, then everything in order, END_STREAM last.
        """
        log: list[Any] = []
        a = Recorder("a", log, headers=[H.StopIteration],
                     data=[D.StopIterationAndBuffer, D.StopIterationAndBuffer])
        b, router = Recorder("b", log), Router(log)
        manager, sink = chain(a, b, router)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"one ", False)
        manager.decodeData(b"two", True)
        self.assertEqual([e for e in log if e[0] != "a"], [])
        a.decoder.continueDecoding()
        self.assertEqual([e[:2] for e in log if e[0] == "b" and e[1].startswith("decode")],
                         [("b", "decodeHeaders"), ("b", "decodeData")])
        self.assertIn(("b", "decodeData", b"one two", True), log)
        self.assertEqual(sink.body, b"one two")

    def test_data_continue_after_stopped_headers_resumes(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log, headers=[H.StopIteration],
                     data=[D.StopIterationAndBuffer, D.Continue])
        router = Router(log)
        manager, sink = chain(a, router)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"x", False)
        self.assertNotIn(("router", "decodeHeaders", False), log)
        manager.decodeData(b"y", True)
        self.assertIn(("router", "decodeHeaders", False), log)
        self.assertIn(("router", "decodeData", b"xy", True), log)
        self.assertEqual(sink.body, b"xy")

    def test_stop_all_buffers_without_calling_the_filter(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log, headers=[H.StopAllIterationAndBuffer])
        router = Router(log)
        manager, sink = chain(a, router)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"abc", False)
        manager.decodeData(b"def", True)
        self.assertEqual([e[1] for e in log], ["decodeHeaders"])  # 'a' saw only the headers
        self.assertEqual(a.decoder.decodingBuffer(), b"abcdef")
        a.decoder.continueDecoding()
        # After StopAll the filter itself gets the held body first.
        self.assertIn(("a", "decodeData", b"abcdef", True), log)
        self.assertEqual(sink.body, b"abcdef")

    def test_no_buffer_drops_the_chunk(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log, data=[D.StopIterationNoBuffer, D.Continue])
        router = Router(log)
        manager, sink = chain(a, router)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"secret", False)
        manager.decodeData(b"public", True)
        self.assertEqual(sink.body, b"public")

    def test_filter_replaces_the_body_it_buffered(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log, data=[D.StopIterationAndBuffer])
        router = Router(log)
        manager, sink = chain(a, router)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"original", True)
        a.decoder.modifyDecodingBuffer(b"rewritten")
        a.decoder.continueDecoding()
        self.assertEqual(sink.body, b"rewritten")

    def test_trailers_wait_for_the_stopped_filter(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log, headers=[H.StopIteration], data=[D.StopIterationAndBuffer],
                     trailers=[T.StopIteration])
        b = Recorder("b", log)
        manager, _ = chain(a, b)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"body", False)
        manager.decodeTrailers(Headers([(b"x-checksum", b"1")]))
        self.assertEqual([e for e in log if e[0] == "b"], [])
        a.decoder.continueDecoding()
        self.assertEqual([e[1] for e in log if e[0] == "b"],
                         ["decodeHeaders", "decodeData", "decodeTrailers"])
        self.assertIn(("b", "decodeData", b"body", False), log)  # trailers end the stream

    def test_encoder_stop_and_resume(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log, eheaders=[H.StopIteration], edata=[D.StopIterationAndBuffer])
        router = Router(log)
        manager, sink = chain(a, router)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"ping", True)
        self.assertEqual(sink.events, [])
        a.encoder.continueEncoding()
        self.assertEqual(sink.events, [("headers", b"200", False), ("data", b"ping", True)])


class LocalReplyTests(unittest.TestCase):
    def test_local_reply_runs_through_every_encoder_and_stops_decoding(self) -> None:
        log: list[Any] = []

        @implementer(IStreamFilter)
        class Deny(Recorder):
            def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
                super().decodeHeaders(headers, endStream)
                self.decoder.sendLocalReply(403, b"RBAC: access denied", None,
                                            "rbac_access_denied", "RBAC")
                return H.StopIteration

        a, deny, c = Recorder("a", log), Deny("deny", log), Recorder("c", log)
        manager, sink = chain(a, deny, c)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"ignored", True)
        self.assertEqual([e[0] for e in log if e[1].startswith("decode")], ["a", "deny"])
        self.assertEqual([e[0] for e in log if e[1] == "encodeHeaders"], ["c", "deny", "a"])
        self.assertEqual(sink.events[0], ("headers", b"403", False))
        self.assertEqual(sink.body, b"RBAC: access denied")
        info = manager.stream_info
        self.assertEqual((info.response_code, info.response_code_details, info.flags_text()),
                         (403, "rbac_access_denied", "RBAC"))
        self.assertEqual(deny.destroyed, 1)

    def test_request_over_the_buffer_limit_is_413(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log, headers=[H.StopIteration],
                     data=[D.StopIterationAndBuffer] * 3)
        manager, sink = chain(a, Router(log), limit=10)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"123456", False)
        self.assertEqual(sink.events, [])
        manager.decodeData(b"789012", False)
        self.assertEqual(sink.events[0], ("headers", b"413", False))
        self.assertEqual(sink.body, b"Payload Too Large")
        manager.decodeData(b"more", True)  # ignored from now on
        self.assertNotIn(("router", "decodeData", b"more", True), log)

    def test_response_over_the_buffer_limit_is_500(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log, eheaders=[H.StopIteration],
                     edata=[D.StopIterationAndBuffer] * 3)
        manager, sink = chain(a, Router(log), limit=4)
        manager.decodeHeaders(request(), False)
        manager.decodeData(b"too long for it", True)
        self.assertEqual(sink.events[0], ("headers", b"500", False))
        self.assertEqual(sink.body, b"Internal Server Error")

    def test_reply_after_the_response_started_is_a_reset(self) -> None:
        log: list[Any] = []
        a = Recorder("a", log)
        router = Router(log)
        manager, sink = chain(a, router)
        manager.decodeHeaders(request(), False)
        router.decoder.encodeHeaders(Headers([(b":status", b"200")]), False)
        router.decoder.sendLocalReply(503, b"", None, "upstream_reset", "UC")
        self.assertTrue(sink.was_reset)
        self.assertEqual(sink.events, [("headers", b"200", False)])


class RouteAndStateTests(unittest.TestCase):
    def test_route_is_cached_until_cleared(self) -> None:
        log: list[Any] = []
        resolved: list[bytes] = []

        def resolver(headers: Headers, connection: Any) -> bytes:
            path = headers.get(b":path") or b""
            resolved.append(path)
            return path

        @implementer(IStreamFilter)
        class Rewrite(Recorder):
            def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
                assert self.decoder.route() == b"/"
                assert self.decoder.route() == b"/"  # cached
                headers.set(b":path", b"/v2")
                self.decoder.clearRouteCache()
                return H.Continue

        rewrite, a = Rewrite("rewrite", log), Recorder("a", log)
        manager, _ = chain(rewrite, a, Router(log), resolver=resolver)
        manager.decodeHeaders(request(), True)
        self.assertEqual(a.decoder.route(), b"/v2")
        self.assertEqual(resolved, [b"/", b"/v2"])

    def test_route_name_is_recorded_when_a_route_is_chosen(self) -> None:
        """%ROUTE_NAME% names the chosen route even when a filter answers before a router."""

        class Route:
            name = "default.echo.0"

        @implementer(IStreamFilter)
        class Deny(Recorder):
            def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
                assert self.decoder.route() is not None
                self.decoder.sendLocalReply(403, b"no", None, "denied", None)
                return H.StopIteration

        manager, sink = chain(Deny("deny", []), resolver=lambda h, c: Route())
        self.assertEqual(manager.stream_info.route_name, "")
        manager.decodeHeaders(request(), True)
        self.assertEqual(sink.events[0][:2], ("headers", b"403"))
        self.assertEqual(manager.stream_info.route_name, "default.echo.0")

    def test_filter_state_for_later_filters_and_hops(self) -> None:
        state = FilterState()
        state.set_data("io.istio.peer_principal", "spiffe://td/ns/a/sa/b",
                       SharedWithUpstream.ONCE, read_only=True)
        state.set_data("local", 1)
        state.set_data("everywhere", 2, SharedWithUpstream.TRANSITIVE)
        with self.assertRaises(FilterStateError):
            state.set_data("io.istio.peer_principal", "other")
        hop = state.shared_with_upstream()
        assert hop is not None
        self.assertEqual(hop.keys(), ["everywhere", "io.istio.peer_principal"])
        second_hop = hop.shared_with_upstream()
        assert second_hop is not None
        self.assertEqual(second_hop.keys(), ["everywhere"])  # ONCE arrived as NONE
        # Nothing shared: no state at all for the next hop (no copy per tunnel).
        self.assertIsNone(FilterState().shared_with_upstream(FilterState()))
        only_local = FilterState()
        only_local.set_data("local", 1)
        self.assertIsNone(only_local.shared_with_upstream())
        # A request's state is shared over its connection's.
        request = FilterState()
        request.set_data("everywhere", 3, SharedWithUpstream.ONCE)
        merged = state.shared_with_upstream(None, request)
        assert merged is not None
        self.assertEqual(merged.get_data("everywhere"), 3)
        self.assertEqual(merged.get_data("io.istio.peer_principal"), "spiffe://td/ns/a/sa/b")


class ObjectFactoryTests(unittest.TestCase):
    def test_addresses_are_checked_strings_are_not(self) -> None:
        from hbonex.filters.http.set_filter_state import OBJECT_FACTORIES

        local_ip = OBJECT_FACTORIES["envoy.filters.listener.original_dst.local_ip"]
        for good in ("10.1.2.3:8080", "[fd00::1]:443"):
            self.assertEqual(local_ip(good), good)
        for bad in ("10.1.2.3", "host.example:80", "10.1.2.3:99999", "fd00::1:443", "-"):
            self.assertIsNone(local_ip(bad), bad)
        self.assertEqual(OBJECT_FACTORIES["envoy.string"]("anything: at all"),
                         "anything: at all")

    def test_an_invalid_address_is_not_stored(self) -> None:
        from hbonex.filters.http.set_filter_state import OBJECT_FACTORIES, FilterStateValue, store
        from hbonex.observability.formatter import Template

        values = (
            FilterStateValue("envoy.filters.listener.original_dst.local_ip",
                             Template("%REQ(:AUTHORITY)%"),
                             factory=OBJECT_FACTORIES["envoy.filters.listener.original_dst.local_ip"]),
            FilterStateValue("plain", Template("%REQ(:AUTHORITY)%")),
        )
        state = FilterState()
        store(values, {"req::authority": "not-an-address:80"}, state)
        self.assertEqual(state.keys(), ["plain"])
        store(values, {"req::authority": "10.0.0.1:80"}, state)
        self.assertEqual(state.get_data("envoy.filters.listener.original_dst.local_ip"),
                         "10.0.0.1:80")


class HeadersTests(unittest.TestCase):
    def test_pseudo_headers_first_and_lookups(self) -> None:
        h = Headers([(b"X-A", b"1"), (b":path", b"/"), (b"x-a", b"2")])
        h.add(b":method", b"GET")
        self.assertEqual([n for n, _ in h], [b":path", b":method", b"x-a", b"x-a"])
        self.assertEqual(h.get_all(b"X-A"), [b"1", b"2"])
        self.assertEqual(h.joined(b"x-a"), b"1, 2")
        h.set(b"x-a", b"3")
        self.assertEqual(h.get_all(b"x-a"), [b"3"])
        self.assertEqual(h.remove(b"x-a"), 1)
        self.assertNotIn(b"x-a", h)
        self.assertEqual(h.byte_size(), len(b":path/:methodGET"))


class ReasonPhraseTests(unittest.TestCase):
    def test_envoy_texts_then_the_standard_phrase(self) -> None:
        from hbonex.http.filter_manager import reason_phrase

        self.assertEqual(reason_phrase(413), "Payload Too Large")  # Envoy's text
        self.assertEqual(reason_phrase(429), "Too Many Requests")
        self.assertEqual(reason_phrase(405), "Method Not Allowed")  # the standard phrase
        self.assertEqual(reason_phrase(599), "Unknown")
