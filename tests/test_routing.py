"""Tests for hbonex.http.routing: the CLI's ConnectRouter and Envoy-style RouteConfig."""

from __future__ import annotations

from twisted.trial import unittest

from hbonex.http.routing import ConnectRouter, HeaderMatcher, Route, RouteConfig, VirtualHost
from hbonex.tunnel.connect import ConnectRequest

CLUSTER = object()


def connect(authority: str, *headers: tuple[str, str], protocol: str | None = None,
            path: str | None = None) -> ConnectRequest:
    scheme = "https" if protocol is not None else None
    return ConnectRequest("CONNECT", authority, tuple(headers), protocol=protocol, path=path,
                          scheme=scheme)


def request(method: str, authority: str, path: str, *headers: tuple[str, str]) -> ConnectRequest:
    return ConnectRequest(method, authority, tuple(headers), path=path, scheme="https")


def connect_route(cluster: object = CLUSTER, **kwargs: object) -> Route:
    return Route(connect_matcher=True, cluster=cluster, **kwargs)  # type: ignore[arg-type]


def vhost(name: str, *domains: str, routes: tuple[Route, ...] | None = None) -> VirtualHost:
    return VirtualHost(name, domains, routes if routes is not None else (connect_route(name),))


def config(*vhosts: VirtualHost, connect_enabled: bool = True) -> RouteConfig:
    return RouteConfig("local", vhosts, connect_enabled=connect_enabled)


class ConnectRouterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.router = ConnectRouter(CLUSTER, idle_timeout=42.0)

    def test_non_connect_is_405(self) -> None:
        decision = self.router.route(request("GET", "a:80", "/"), None)
        self.assertEqual(decision.status, 405)
        self.assertIn("GET", decision.reason)
        self.assertIsNone(decision.cluster)

    def test_bad_authority_is_400(self) -> None:
        for bad in ("no-port", "::1:80", "user@h:80", "h:0", "h:\xb2"):
            decision = self.router.route(connect(bad), None)
            self.assertEqual(decision.status, 400, bad)
            self.assertIsNone(decision.cluster)

    def test_unknown_protocol_is_400(self) -> None:
        decision = self.router.route(connect("a:80", protocol="websocket", path="/"), None)
        self.assertEqual(decision.status, 400)
        self.assertIn("websocket", decision.reason)

    def test_connect_is_200(self) -> None:
        decision = self.router.route(connect("10.0.0.1:8080"), None)
        self.assertEqual(decision.status, 200)
        self.assertIs(decision.cluster, CLUSTER)
        self.assertEqual(decision.original_destination, "10.0.0.1:8080")
        self.assertEqual(decision.idle_timeout, 42.0)
        self.assertEqual(decision.kind, "tunnel")

    def test_bytestream_is_200(self) -> None:
        decision = self.router.route(connect("[::1]:80", protocol="bytestream", path="/"), None)
        self.assertEqual(decision.status, 200)
        self.assertEqual(decision.original_destination, "[::1]:80")


class DomainTests(unittest.TestCase):
    def setUp(self) -> None:
        self.config = config(
            vhost("any", "*"),
            vhost("prefix", "foo.*"),
            vhost("suffix", "*.example.com"),
            vhost("longer-suffix", "*.b.example.com"),
            vhost("exact", "api.example.com", "foo.example.com"),
        )

    def picked(self, authority: str) -> object:
        decision = self.config.route(connect(authority), None)
        self.assertEqual(decision.status, 200, decision.reason)
        return decision.cluster

    def test_exact_beats_wildcards(self) -> None:
        self.assertEqual(self.picked("api.example.com"), "exact")
        self.assertEqual(self.picked("API.Example.COM"), "exact")
        # foo.example.com matches "foo.*" and "*.example.com" too.
        self.assertEqual(self.picked("foo.example.com"), "exact")

    def test_suffix_beats_prefix(self) -> None:
        self.assertEqual(self.picked("foo.bar.example.com"), "suffix")

    def test_longest_suffix_wins(self) -> None:
        self.assertEqual(self.picked("x.b.example.com"), "longer-suffix")

    def test_prefix_beats_catch_all(self) -> None:
        self.assertEqual(self.picked("foo.org"), "prefix")

    def test_catch_all(self) -> None:
        self.assertEqual(self.picked("other.org"), "any")

    def test_wildcard_needs_a_character(self) -> None:
        # "*.example.com" does not match ".example.com" itself.
        self.assertEqual(self.picked(".example.com"), "any")

    def test_host_port_domain(self) -> None:
        cfg = config(vhost("port", "db.internal:5432"), vhost("host", "db.internal"))
        self.assertEqual(cfg.route(connect("db.internal:5432"), None).cluster, "port")
        # No host:port domain for 5433: the port is stripped and the host matches.
        self.assertEqual(cfg.route(connect("db.internal:5433"), None).cluster, "host")

    def test_ipv6_host_port_domain(self) -> None:
        cfg = config(vhost("v6", "[::1]"), vhost("v6-port", "[::1]:443"))
        self.assertEqual(cfg.route(connect("[::1]:443"), None).cluster, "v6-port")
        self.assertEqual(cfg.route(connect("[::1]:80"), None).cluster, "v6")

    def test_no_virtual_host_is_404(self) -> None:
        cfg = config(vhost("only", "only.example"))
        decision = cfg.route(connect("other.example:80"), None)
        self.assertEqual(decision.status, 404)
        self.assertIn("no virtual host", decision.reason)


class RouteTests(unittest.TestCase):
    def test_weighted_clusters_follow_their_weights(self) -> None:
        """10,000 seeded picks at weights 1:3:6 land within 2 points of 10/30/60 %."""
        import random

        a, b, c = object(), object(), object()
        cfg = config(VirtualHost("v", ("*",), (
            Route(prefix="/", weighted_clusters=((a, 1), (b, 3), (c, 6))),)))
        state = random.getstate()
        self.addCleanup(random.setstate, state)
        random.seed(20261205)
        counts = {a: 0, b: 0, c: 0}
        for _ in range(10_000):
            counts[cfg.route(request("GET", "h", "/x"), None).cluster] += 1
        for cluster, expected in ((a, 0.1), (b, 0.3), (c, 0.6)):
            share = counts[cluster] / 10_000
            self.assertLess(abs(share - expected), 0.02, (share, expected))

    def test_original_destination_is_authority(self) -> None:
        decision = config(vhost("c", "*")).route(connect("10.1.1.1:80"), None)
        self.assertEqual(decision.original_destination, "10.1.1.1:80")

    def test_no_matching_route_is_404(self) -> None:
        cfg = config(VirtualHost("v", ("*",), (Route(prefix="/api", cluster=CLUSTER),)))
        decision = cfg.route(connect("a:80"), None)  # a CONNECT has no :path
        self.assertEqual(decision.status, 404)
        self.assertIn("no route", decision.reason)
        self.assertEqual(cfg.route(request("GET", "a", "/other"), None).status, 404)

    def test_connect_not_enabled_is_403(self) -> None:
        cfg = config(vhost("v", "*"), connect_enabled=False)
        decision = cfg.route(connect("a:80"), None)
        self.assertEqual(decision.status, 403)
        self.assertIsNone(decision.cluster)

    def test_route_level_connect(self) -> None:
        routes = (connect_route("enabled", connect_enabled=True),)
        cfg = config(VirtualHost("v", ("*",), routes), connect_enabled=False)
        decision = cfg.route(connect("a:80"), None)
        self.assertEqual(decision.status, 200)
        self.assertEqual(decision.cluster, "enabled")

    def test_first_matching_route_wins(self) -> None:
        routes = (
            connect_route("tagged", headers=(HeaderMatcher("x-tag", exact="blue"),)),
            connect_route("default"),
        )
        cfg = config(VirtualHost("v", ("*",), routes))
        self.assertEqual(cfg.route(connect("a:1", ("x-tag", "blue")), None).cluster, "tagged")
        self.assertEqual(cfg.route(connect("a:1", ("x-tag", "red")), None).cluster, "default")
        self.assertEqual(cfg.route(connect("a:1"), None).cluster, "default")

    def test_direct_response(self) -> None:
        routes = (Route(path="/healthz", direct_status=200, direct_body=b"ok"),
                  connect_route(direct_status=418, direct_body=b"teapot"))
        cfg = config(VirtualHost("v", ("*",), routes), connect_enabled=False)
        health = cfg.route(request("GET", "a", "/healthz?verbose"), None)
        self.assertEqual((health.status, health.body, health.cluster), (200, b"ok", None))
        # Direct responses win even over the CONNECT-not-enabled check.
        tea = cfg.route(connect("a:1"), None)
        self.assertEqual((tea.status, tea.body), (418, b"teapot"))

    def test_non_connect_is_http_proxied(self) -> None:
        routes = (Route(prefix="/", cluster=CLUSTER),)
        decision = config(VirtualHost("v", ("*",), routes)).route(
            request("GET", "a:1", "/t"), None
        )
        self.assertEqual((decision.status, decision.kind, decision.cluster),
                         (200, "http", CLUSTER))
        # A POST is only a tunnel (Envoy's CONNECT-over-POST) with allow_post.
        post = config(VirtualHost("v", ("*",), routes)).route(request("POST", "a:1", "/t"), None)
        self.assertEqual(post.kind, "http")

    def test_post_tunnel_with_destination_header(self) -> None:
        routes = (Route(prefix="/", cluster=CLUSTER, allow_post=True,
                        original_destination_header="x-dest"),)
        decision = config(VirtualHost("v", ("*",), routes)).route(
            request("POST", "a:1", "/t", ("x-dest", "10.0.0.9:80")), None
        )
        self.assertEqual((decision.status, decision.kind, decision.original_destination),
                         (200, "tunnel", "10.0.0.9:80"))
        self.assertEqual(config(VirtualHost("v", ("*",), routes))
                         .route(request("GET", "a:1", "/t"), None).kind, "http")

    def test_connect_is_a_tunnel(self) -> None:
        decision = config(vhost("c", "*")).route(connect("a:1"), None)
        self.assertEqual(decision.kind, "tunnel")

    def test_route_without_cluster_is_404(self) -> None:
        routes = (Route(connect_matcher=True, cluster=None),)
        decision = config(VirtualHost("v", ("*",), routes)).route(connect("a:1"), None)
        self.assertEqual(decision.status, 404)

    def test_extended_connect_routes_by_path(self) -> None:
        routes = (Route(prefix="/tunnel", cluster="ext", connect_enabled=True),)
        cfg = config(VirtualHost("v", ("*",), routes), connect_enabled=False)
        ok = cfg.route(connect("a:1", protocol="bytestream", path="/tunnel/x"), None)
        self.assertEqual((ok.status, ok.cluster), (200, "ext"))
        bad = cfg.route(connect("a:1", protocol="websocket", path="/tunnel/x"), None)
        self.assertEqual(bad.status, 400)

    def test_path_and_regex_matchers(self) -> None:
        routes = (Route(path="/exact", cluster="path"),
                  Route(safe_regex=r"/v[0-9]+/.*", cluster="regex"))
        cfg = config(VirtualHost("v", ("*",), routes))
        self.assertEqual(cfg.route(request("POST", "a", "/exact"), None).cluster, "path")
        self.assertEqual(cfg.route(request("POST", "a", "/exact/no"), None).status, 404)
        self.assertEqual(cfg.route(request("POST", "a", "/v2/x"), None).cluster, "regex")
        self.assertEqual(cfg.route(request("POST", "a", "/vx/x"), None).status, 404)


class HeaderMatcherTests(unittest.TestCase):
    req = connect("svc.ns:8080", ("x-env", "prod-eu"), ("x-empty", ""))

    def check(self, matcher: HeaderMatcher, expected: bool) -> None:
        self.assertIs(matcher.matches(self.req), expected, matcher)

    def test_exact(self) -> None:
        self.check(HeaderMatcher("x-env", exact="prod-eu"), True)
        self.check(HeaderMatcher("x-env", exact="prod"), False)
        self.check(HeaderMatcher("X-Env", exact="prod-eu"), True)

    def test_prefix(self) -> None:
        self.check(HeaderMatcher("x-env", prefix="prod-"), True)
        self.check(HeaderMatcher("x-env", prefix="dev-"), False)

    def test_regex_is_full_match(self) -> None:
        self.check(HeaderMatcher("x-env", regex=r"prod-[a-z]+"), True)
        self.check(HeaderMatcher("x-env", regex=r"prod"), False)

    def test_present(self) -> None:
        self.check(HeaderMatcher("x-empty", present=True), True)
        self.check(HeaderMatcher("x-missing", present=True), False)
        self.check(HeaderMatcher("x-missing", present=False), True)
        self.check(HeaderMatcher("x-env"), True)
        self.check(HeaderMatcher("x-missing", exact="a"), False)

    def test_invert(self) -> None:
        self.check(HeaderMatcher("x-env", exact="prod-eu", invert=True), False)
        self.check(HeaderMatcher("x-missing", exact="a", invert=True), True)

    def test_pseudo_headers(self) -> None:
        self.check(HeaderMatcher(":authority", regex=r"svc\.ns:\d+"), True)
        self.check(HeaderMatcher(":method", exact="CONNECT"), True)
        self.check(HeaderMatcher(":path", present=False), True)

