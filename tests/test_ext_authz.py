"""
``envoy.filters.http.ext_authz`` (http_service) driven through a FilterManager, with a fake
authorization pool whose connections record the check request and answer as told.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.errors import UpstreamError
from hbonex.filters.common.ext_authz_http import CheckStatus, classify
from hbonex.filters.http.ext_authz import ExtAuthzFilter, _Shared
from hbonex.filters.http.ext_authz_config import (
    BufferSettings,
    ExtAuthzConfig,
    ExtAuthzPerRoute,
    ExtAuthzStats,
)
from hbonex.http.filter_manager import FilterManager
from hbonex.http.headers import Headers
from hbonex.http.matchers import StringMatcher
from hbonex.http.routing import PerFilterConfig
from hbonex.network.listener import ConnectionInfo
from hbonex.observability.formatter import Template
from tests.test_http_filter_manager import Router, Sink


class FakeCodec:
    """One authorization connection: records the request; the test answers."""

    on_idle = None

    def __init__(self) -> None:
        self.headers: Headers | None = None
        self.body = b""
        self.ended = False
        self.response: Any = None
        self.aborted = False

    @property
    def busy(self) -> bool:
        return self.headers is not None and not self.aborted

    def start_request(self, headers: Headers, end_stream: bool, response: Any) -> None:
        self.headers, self.ended, self.response = headers, end_stream, response

    def send_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data
        self.ended = end_stream

    def abort(self) -> None:
        self.aborted = True

    def answer(self, status: int, headers: list[tuple[bytes, bytes]] = (),  # type: ignore
               body: bytes = b"") -> None:
        response = Headers([(b":status", str(status).encode()), *headers])
        self.response.decodeHeaders(response, not body)
        if body:
            self.response.decodeData(body, True)


class FakePool:
    def __init__(self) -> None:
        self.waiting: list[defer.Deferred[Any]] = []
        self.codecs: list[FakeCodec] = []
        self.cancelled = 0

    def acquire(self) -> defer.Deferred[Any]:
        def cancel(d: defer.Deferred[Any]) -> None:
            self.cancelled += 1

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        self.waiting.append(d)
        return d

    def connect(self) -> FakeCodec:
        codec = FakeCodec()
        self.codecs.append(codec)
        self.waiting.pop(0).callback(codec)
        return codec

    def refuse(self) -> None:
        self.waiting.pop(0).errback(UpstreamError(503, "connection refused"))


def request(**extra: str) -> Headers:
    headers = Headers.of(method="GET", path="/api/x?y=1", authority="svc.local", scheme="http")
    for name, value in extra.items():
        headers.add(name.replace("_", "-").encode(), value.encode())
    return headers


class ExtAuthzCase(unittest.TestCase):
    def make(self, per_route: Any = None, **config: Any) -> None:
        self.clock = Clock()
        self.pool = FakePool()
        self.stats = ExtAuthzStats("http.test.ext_authz.")
        cfg = ExtAuthzConfig(cluster="authz", timeout=config.pop("timeout", 0.5), **config)
        self.filter = ExtAuthzFilter(_Shared(cfg, self.clock, lambda c: self.pool, self.stats))
        self.log: list[tuple[Any, ...]] = []
        self.router = Router(self.log)
        self.sink = Sink()
        route = None
        if per_route is not None:
            route = attrs.make_class("R", ["per_filter_config"])(
                {"authz": PerFilterConfig(per_route)})
        self.manager = FilterManager([self.filter, self.router], self.sink,
                                     ConnectionInfo("l", "10.0.0.1:5555", "10.0.0.2:80"),
                                     route_resolver=lambda h, i: route, names=["authz", "r"])

    def setUp(self) -> None:
        self.router_headers: Headers | None = None
        original = Router.decodeHeaders

        def spy(router: Router, headers: Headers, end: bool) -> Any:
            self.router_headers = headers
            return original(router, headers, end)

        self.patch(Router, "decodeHeaders", spy)


class CheckRequestTests(ExtAuthzCase):
    def test_allowed_headers_prefix_and_headers_to_add(self) -> None:
        self.make(path_prefix=b"/check",
                  allowed_headers=(StringMatcher("prefix", "x-user"),),
                  disallowed_headers=(StringMatcher("exact", "x-user-secret"),),
                  headers_to_add=((b"x-peer", Template("%DOWNSTREAM_REMOTE_ADDRESS%", "t")),))
        self.manager.decodeHeaders(request(authorization="Bearer t", x_user_id="7",
                                           x_user_secret="s", cookie="c"), True)
        codec = self.pool.connect()
        assert codec.headers is not None
        self.assertEqual(codec.headers.items(), [
            (b":method", b"GET"), (b":path", b"/check/api/x?y=1"), (b":scheme", b"http"),
            (b":authority", b"svc.local"), (b"authorization", b"Bearer t"),
            (b"x-user-id", b"7"), (b"content-length", b"0"), (b"x-peer", b"10.0.0.1:5555"),
        ])
        self.assertTrue(codec.ended)
        self.assertEqual(self.log, [])  # held until the answer

    def test_with_request_body_buffers_and_sends_it(self) -> None:
        self.make(with_request_body=BufferSettings(10, allow_partial_message=False))
        self.manager.decodeHeaders(Headers.of(method="POST", path="/", authority="a"), False)
        self.manager.decodeData(b"hello", False)
        self.assertEqual(self.pool.waiting, [])  # not before the end
        self.manager.decodeData(b"!", True)
        codec = self.pool.connect()
        self.assertEqual(codec.body, b"hello!")
        assert codec.headers is not None
        self.assertEqual(codec.headers.get(b"content-length"), b"6")
        self.assertEqual(codec.headers.get(b"x-envoy-auth-partial-body"), b"false")
        codec.answer(200)
        self.assertEqual(self.router.body, b"hello!")
        self.assertEqual(self.sink.events[-1], ("data", b"hello!", True))

    def test_with_request_body_partial(self) -> None:
        self.make(with_request_body=BufferSettings(4, allow_partial_message=True))
        self.manager.decodeHeaders(Headers.of(method="POST", path="/", authority="a"), False)
        self.manager.decodeData(b"abcdef", False)
        codec = self.pool.connect()
        self.assertEqual(codec.body, b"abcd")
        assert codec.headers is not None
        self.assertEqual(codec.headers.get(b"x-envoy-auth-partial-body"), b"true")
        self.manager.decodeData(b"gh", True)
        codec.answer(200)
        self.assertEqual(self.router.body, b"abcdefgh")

    def test_with_request_body_over_the_limit_is_413(self) -> None:
        self.make(with_request_body=BufferSettings(4))
        self.manager.decodeHeaders(Headers.of(method="POST", path="/", authority="a"), False)
        self.manager.decodeData(b"abcdef", False)
        self.assertEqual(self.sink.events[0], ("headers", b"413", False))
        self.assertEqual(self.pool.waiting, [])

    def test_per_route_disabled_skips_the_check(self) -> None:
        self.make(per_route=ExtAuthzPerRoute(disabled=True))
        self.manager.decodeHeaders(request(), True)
        self.assertEqual(self.pool.waiting, [])
        self.assertEqual(self.sink.events, [("headers", b"200", True)])

    def test_per_route_check_settings_buffer(self) -> None:
        self.make(per_route=ExtAuthzPerRoute(with_request_body=BufferSettings(100)))
        self.manager.decodeHeaders(Headers.of(method="PUT", path="/", authority="a"), False)
        self.manager.decodeData(b"xyz", True)
        self.assertEqual(self.pool.connect().body, b"xyz")


class AnswerTests(ExtAuthzCase):
    def test_ok_applies_upstream_headers(self) -> None:
        self.make(allowed_upstream_headers=(StringMatcher("exact", "x-auth-user"),),
                  allowed_upstream_headers_to_append=(StringMatcher("exact", "x-tag"),),
                  allowed_client_headers_on_success=(StringMatcher("exact", "x-auth-note"),))
        self.manager.decodeHeaders(request(x_auth_user="forged", x_tag="a", x_drop="1"), True)
        self.pool.connect().answer(200, [(b"x-auth-user", b"alice"), (b"x-tag", b"b"),
                                         (b"x-auth-note", b"hi"), (b"x-other", b"no"),
                                         (b"x-envoy-auth-headers-to-remove", b"x-drop")])
        headers = self.router_headers
        assert headers is not None
        self.assertEqual(headers.get_all(b"x-auth-user"), [b"alice"])
        self.assertEqual(headers.get_all(b"x-tag"), [b"a", b"b"])
        self.assertIsNone(headers.get(b"x-other"))
        self.assertIsNone(headers.get(b"x-drop"))
        self.assertEqual(self.stats.stats_values()["http.test.ext_authz.ok"], 1)
        self.assertEqual(self.sink.events, [("headers", b"200", True)])

    def test_success_client_headers_reach_the_response(self) -> None:
        self.make(allowed_client_headers_on_success=(StringMatcher("exact", "x-auth-note"),))
        seen: list[Headers] = []
        self.sink.sendHeaders = lambda h, e: seen.append(h)  # type: ignore[method-assign]
        self.manager.decodeHeaders(request(), True)
        self.pool.connect().answer(200, [(b"x-auth-note", b"hi")])
        self.assertEqual(seen[0].get(b"x-auth-note"), b"hi")

    def test_denied_relays_status_body_and_client_headers(self) -> None:
        self.make()
        self.manager.decodeHeaders(request(), True)
        self.pool.connect().answer(401, [(b"www-authenticate", b"Bearer"),
                                         (b"content-type", b"application/json")],
                                   b'{"denied":true}')
        # The router never saw the request (its encoder side sees the local reply, as Envoy's).
        self.assertNotIn("decodeHeaders", [e[1] for e in self.log])
        self.assertEqual(self.sink.events, [("headers", b"401", False),
                                            ("data", b'{"denied":true}', True)])
        info = self.manager.stream_info
        self.assertIn("UAEX", info.response_flags)
        self.assertEqual(info.response_code_details, "ext_authz_denied")
        self.assertEqual(self.stats.denied, 1)

    def test_denied_allowed_client_headers_filter(self) -> None:
        self.make(allowed_client_headers=(StringMatcher("exact", "x-reason"),),
                  max_denied_response_body_bytes=3)
        seen: list[Headers] = []
        self.sink.sendHeaders = lambda h, e: seen.append(h)  # type: ignore[method-assign]
        self.manager.decodeHeaders(request(), True)
        self.pool.connect().answer(302, [(b"location", b"/login"), (b"x-reason", b"r"),
                                         (b"x-secret", b"s")], b"abcdef")
        [headers] = seen
        self.assertEqual(headers.get(b":status"), b"302")
        self.assertEqual(headers.get(b"location"), b"/login")
        self.assertEqual(headers.get(b"x-reason"), b"r")
        self.assertIsNone(headers.get(b"x-secret"))
        self.assertEqual(self.sink.body, b"abc")

    def test_5xx_is_an_error_403(self) -> None:
        self.make()
        self.manager.decodeHeaders(request(), True)
        self.pool.connect().answer(503, body=b"down")
        self.assertEqual(self.sink.events[0], ("headers", b"403", False))
        self.assertEqual(self.manager.stream_info.response_code_details, "ext_authz_error")
        self.assertIn("UAEX", self.manager.stream_info.response_flags)
        self.assertEqual((self.stats.error, self.stats.denied), (1, 0))

    def test_status_on_error(self) -> None:
        self.make(status_on_error=503)
        self.manager.decodeHeaders(request(), True)
        self.pool.refuse()
        self.assertEqual(self.sink.events[0], ("headers", b"503", False))

    def test_failure_mode_allow_on_connect_failure(self) -> None:
        self.make(failure_mode_allow=True, failure_mode_allow_header_add=True)
        self.manager.decodeHeaders(request(), True)
        self.pool.refuse()
        self.assertEqual(self.sink.events, [("headers", b"200", True)])
        assert self.router_headers is not None
        self.assertEqual(self.router_headers.get(b"x-envoy-auth-failure-mode-allowed"), b"true")
        self.assertEqual((self.stats.error, self.stats.failure_mode_allowed), (1, 1))

    def test_timeout(self) -> None:
        self.make(timeout=0.25)
        self.manager.decodeHeaders(request(), True)
        codec = self.pool.connect()
        self.clock.advance(0.24)
        self.assertEqual(self.sink.events, [])
        self.clock.advance(0.02)
        self.assertEqual(self.sink.events[0], ("headers", b"403", False))
        self.assertTrue(codec.aborted)

    def test_timeout_while_connecting_failure_mode_allow(self) -> None:
        self.make(timeout=0.25, failure_mode_allow=True)
        self.manager.decodeHeaders(request(), True)
        self.clock.advance(0.3)
        self.assertEqual(self.pool.cancelled, 1)
        self.assertEqual(self.sink.events, [("headers", b"200", True)])

    def test_body_held_and_producer_paused_while_checking(self) -> None:
        self.make()
        producer = self.sink.request_source
        self.manager.decodeHeaders(Headers.of(method="POST", path="/", authority="a"), False)
        self.assertEqual(producer.state, "paused")
        self.manager.decodeData(b"early", True)
        self.assertEqual(self.router.body, b"")
        self.pool.connect().answer(200)
        self.assertEqual(producer.state, "producing")
        self.assertEqual(self.router.body, b"early")

    def test_client_gone_cancels_the_check(self) -> None:
        self.make()
        self.manager.decodeHeaders(request(), True)
        codec = self.pool.connect()
        self.manager.reset()
        self.assertTrue(codec.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        codec.answer(200)  # too late: nothing happens
        self.assertEqual(self.log, [])

    def test_client_gone_while_connecting(self) -> None:
        self.make()
        self.manager.decodeHeaders(request(), True)
        self.manager.reset()
        self.assertEqual(self.pool.cancelled, 1)


class ClassifyTests(unittest.TestCase):
    def test_envoy_classes(self) -> None:
        def status(code: bytes) -> CheckStatus:
            return classify(Headers([(b":status", code)]), b"").status

        self.assertEqual(status(b"200"), CheckStatus.OK)
        self.assertEqual(status(b"204"), CheckStatus.DENIED)
        self.assertEqual(status(b"403"), CheckStatus.DENIED)
        self.assertEqual(status(b"500"), CheckStatus.ERROR)
        self.assertEqual(status(b"599"), CheckStatus.ERROR)
        self.assertEqual(classify(Headers([(b":status", b"x")]), b"").status_code, 403)

