"""
The connection manager's own request handling (hbonex.http.connection_manager,
hbonex.http.path): path normalisation before routing, request ids, x-forwarded-for, the
server header, headers with underscores.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.trial import unittest

from hbonex.http.connection_manager import HttpOptions, StandardHeaders
from hbonex.http.filter_manager import FilterManager
from hbonex.http.headers import Headers
from hbonex.http.path import EscapedSlashes, PathRedirect, PathRejected, normalize
from hbonex.network.listener import ConnectionInfo
from tests.test_http_filter_manager import Recorder, Router, Sink

INFO = ConnectionInfo("l", "10.1.2.3:5555", "10.0.0.1:80")


def run(options: HttpOptions, headers: Headers) -> tuple[FilterManager, Sink, list[Any]]:
    log: list[Any] = []
    seen = Recorder("seen", log)
    sink = Sink()
    manager = FilterManager([StandardHeaders(INFO, options), seen, Router(log)], sink,
                            route_resolver=lambda h, c: h.get(b":path"))
    manager.decodeHeaders(headers, True)
    seen.headers = manager.decoding.headers  # type: ignore[attr-defined]
    return manager, sink, log


def get(path: bytes = b"/a", **extra: str) -> Headers:
    headers = Headers([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"),
                       (b":path", path)])
    for name, value in extra.items():
        headers.add(name.replace("_", "-").encode(), value.encode())
    return headers


class PathTests(unittest.TestCase):
    def test_normalize(self) -> None:
        self.assertEqual(normalize(b"/a/./b/../c?x=../y", normalize_path=True), b"/a/c?x=../y")
        self.assertEqual(normalize(b"/%61%2D%7e/%2f", normalize_path=True), b"/a-~/%2F")
        self.assertEqual(normalize(b"/../../etc", normalize_path=True), b"/etc")
        self.assertEqual(normalize(b"/a//b///c/", merge_slashes=True), b"/a/b/c/")
        self.assertEqual(normalize(b"/a/b/..", normalize_path=True), b"/a/")

    def test_escaped_slashes(self) -> None:
        self.assertEqual(normalize(b"/a%2Fb"), b"/a%2Fb")
        self.assertRaises(PathRejected, normalize, b"/a%2fb",
                          escaped_slashes=EscapedSlashes.REJECT_REQUEST)
        self.assertEqual(normalize(b"/a%2Fb%5Cc",
                                   escaped_slashes=EscapedSlashes.UNESCAPE_AND_FORWARD),
                         b"/a/b\\c")
        redirect = self.assertRaises(PathRedirect, normalize, b"/a%2Fb?q",
                                     escaped_slashes=EscapedSlashes.UNESCAPE_AND_REDIRECT)
        self.assertEqual(redirect.location, b"/a/b?q")


class StandardHeadersTests(unittest.TestCase):
    def test_defaults(self) -> None:
        manager, sink, log = run(HttpOptions(), get(x_forwarded_for="1.1.1.1"))
        headers = manager.decoding.headers
        assert headers is not None
        self.assertRegex(headers.get(b"x-request-id") or b"", rb"^[0-9a-f-]{36}$")
        # Without use_remote_address Envoy appends nothing to x-forwarded-for.
        self.assertEqual(headers.get_all(b"x-forwarded-for"), [b"1.1.1.1"])
        self.assertEqual(headers.get(b"x-forwarded-proto"), b"http")
        self.assertIn(("router", "encodeHeaders", b"200", True), log)

    def test_request_id_kept_and_echoed(self) -> None:
        options = HttpOptions(always_set_request_id_in_response=True)
        manager, sink, log = run(options, get(x_request_id="abc"))
        headers = manager.decoding.headers
        assert headers is not None
        self.assertEqual(headers.get_all(b"x-request-id"), [b"abc"])
        self.assertEqual(sink.events[0][:2], ("headers", b"200"))

    def test_use_remote_address_appends_the_peer(self) -> None:
        manager, _, _ = run(HttpOptions(use_remote_address=True),
                            get(x_forwarded_for="1.1.1.1"))
        headers = manager.decoding.headers
        assert headers is not None
        self.assertEqual(headers.get(b"x-forwarded-for"), b"1.1.1.1, 10.1.2.3")
        manager, _, _ = run(HttpOptions(use_remote_address=True, skip_xff_append=True), get())
        assert manager.decoding.headers is not None
        self.assertNotIn(b"x-forwarded-for", manager.decoding.headers)

    def test_paths_are_normalised_before_routing(self) -> None:
        options = HttpOptions(normalize_path=True, merge_slashes=True)
        manager, _, _ = run(options, get(b"//admin/./x/../secret"))
        self.assertEqual(manager.route(), b"/admin/secret")

    def test_escaped_slashes_rejected_or_redirected(self) -> None:
        _, sink, _ = run(HttpOptions(escaped_slashes=EscapedSlashes.REJECT_REQUEST),
                         get(b"/a%2Fb"))
        self.assertEqual(sink.events[0][:2], ("headers", b"400"))
        manager, sink, _ = run(
            HttpOptions(escaped_slashes=EscapedSlashes.UNESCAPE_AND_REDIRECT), get(b"/a%2Fb")
        )
        self.assertEqual(sink.events[0][:2], ("headers", b"307"))

    def test_headers_with_underscores(self) -> None:
        def underscored() -> Headers:
            headers = get(x_ok="1")
            headers.add(b"bad_name", b"1")
            return headers

        _, sink, _ = run(HttpOptions(headers_with_underscores="REJECT_REQUEST"), underscored())
        self.assertEqual(sink.events, [("headers", b"400", False), ("data", b"Bad Request",
                                                                    True)])
        manager, sink, _ = run(HttpOptions(headers_with_underscores="DROP_HEADER"),
                               underscored())
        assert manager.decoding.headers is not None
        self.assertNotIn(b"bad_name", manager.decoding.headers)
        self.assertEqual(sink.events[0][:2], ("headers", b"200"))

    def test_server_header(self) -> None:
        for transformation, upstream, expected in (
            ("OVERWRITE", b"backend", b"hbonex"),
            ("APPEND_IF_ABSENT", b"backend", b"backend"),
            ("PASS_THROUGH", b"backend", b"backend"),
        ):
            options = HttpOptions(server_name=b"hbonex",
                                  server_header_transformation=transformation)
            log: list[Any] = []
            sink = Sink()
            router = Router(log)
            manager = FilterManager([StandardHeaders(INFO, options), router], sink,
                                    route_resolver=lambda h, c: None)
            manager.decodeHeaders(get(), False)
            response = Headers([(b":status", b"200"), (b"server", upstream)])
            router.decoder.encodeHeaders(response, True)
            self.assertEqual(response.get(b"server"), expected, transformation)

    def test_request_timeout(self) -> None:
        """Envoy's request_timeout: 408 unless the whole request arrived in time."""
        from twisted.internet.task import Clock

        for ended_in_time in (False, True):
            clock = Clock()
            sink = Sink()
            standard = StandardHeaders(INFO, HttpOptions(request_timeout=5), reactor=clock)
            manager = FilterManager([standard, Router([])], sink,
                                    route_resolver=lambda h, c: None)
            manager.decodeHeaders(get(), False)  # a body follows
            clock.advance(4)
            manager.decodeData(b"x", ended_in_time)
            clock.advance(2)
            if ended_in_time:
                self.assertEqual(clock.getDelayedCalls(), [])
                self.assertNotIn(("headers", b"408", False), sink.events)
            else:
                self.assertEqual(sink.events[0][:2], ("headers", b"408"))
                self.assertEqual(manager.stream_info.response_code_details,
                                 "request_overall_timeout")
        # No limit by default (Envoy's); the request's end or destruction cancels the timer.
        self.assertEqual(HttpOptions().request_timeout, 0)
        clock = Clock()
        standard = StandardHeaders(INFO, HttpOptions(request_timeout=5), reactor=clock)
        standard.onDestroy()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_options_are_frozen(self) -> None:
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, HttpOptions(),
                          "server_name", b"x")
