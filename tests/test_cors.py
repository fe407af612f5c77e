"""
``envoy.filters.http.cors`` (hbonex.filters.http.cors): preflights answered by the proxy,
actual responses with the Access-Control-* headers, policies per route level field by field,
filter_enabled / shadow_enabled, and the configuration errors.
"""

from __future__ import annotations

import random

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from hbonex.errors import ConfigError
from hbonex.filters.http.cors import CorsExtension, CorsFilter
from hbonex.http.headers import Headers
from hbonex.interfaces import IHTTPFilterPerRouteExtension, IStreamFilter
from tests.http_filter_support import hcm_yaml, load_hcm, run

POLICY = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
FILTER = """\
- name: envoy.filters.http.cors
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
"""


def policy(fields: str) -> str:
    body = "\n".join("    " + line for line in fields.splitlines())
    return (f"typed_per_filter_config:\n  envoy.filters.http.cors:\n"
            f"    \"@type\": {POLICY}\n{body}\n")


VHOST_POLICY = """\
allow_origin_string_match:
- exact: https://app.example
- suffix: .trusted.example
- safe_regex: {regex: "https://[a-z]+\\\\.regex\\\\.example"}
allow_methods: GET,POST
allow_headers: x-custom,content-type
expose_headers: x-exposed
max_age: "600"
allow_credentials: true
allow_private_network_access: true
"""

def route(prefix: str, fields: str = "", action: str = "route: {cluster: backend}") -> str:
    """One route, with a CorsPolicy of ``fields`` when given."""
    text = f"- match: {{prefix: {prefix}}}\n  {action}\n"
    if fields:
        text += "\n".join("  " + line for line in policy(fields).splitlines()) + "\n"
    return text


ROUTES = "".join([
    route("/star", 'allow_methods: "*"\nallow_headers: "*"\nallow_credentials: false'),
    route("/off", "filter_enabled:\n  default_value: {numerator: 0}"),
    route("/shadow", "filter_enabled:\n  default_value: {numerator: 0}\n"
          "shadow_enabled:\n  default_value: {numerator: 100}"),
    route("/strict", "forward_not_matching_preflights: false"),
    route("/direct", action="direct_response: {status: 200}"),
    route("/"),
])


def preflight(origin: str, path: str = "/api", method: str = "POST", **more: str) -> Headers:
    headers = Headers.of(method="OPTIONS", path=path, authority="svc", scheme="http")
    headers.add(b"origin", origin.encode())
    headers.add(b"access-control-request-method", method.encode())
    for name, value in more.items():
        headers.add(name.replace("_", "-").encode(), value.encode())
    return headers


def actual(origin: str | None, path: str = "/api", method: str = "GET") -> Headers:
    headers = Headers.of(method=method, path=path, authority="svc", scheme="http")
    if origin is not None:
        headers.add(b"origin", origin.encode())
    return headers


def cors_headers(headers: Headers) -> dict[bytes, bytes]:
    return {n: v for n, v in headers if n.startswith(b"access-control-")}


class CorsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.config = load_hcm(hcm_yaml(FILTER, routes=ROUTES, vhost=policy(VHOST_POLICY)))

    def test_plugin_and_filter_verify(self) -> None:
        self.assertTrue(verifyObject(IHTTPFilterPerRouteExtension, CorsExtension()))
        made = self.config.http_filters[0]()
        self.assertIsInstance(made, CorsFilter)
        self.assertTrue(verifyObject(IStreamFilter, made))

    def test_preflight_answered_by_the_proxy(self) -> None:
        upstream, response, sink, manager = run(
            self.config,
            preflight("https://app.example", access_control_request_private_network="true"))
        self.assertIsNone(upstream.request)  # never reached the upstream
        self.assertEqual(response.get(b":status"), b"200")
        self.assertEqual(cors_headers(response), {
            b"access-control-allow-origin": b"https://app.example",
            b"access-control-allow-credentials": b"true",
            b"access-control-allow-methods": b"GET,POST",
            b"access-control-allow-headers": b"x-custom,content-type",
            b"access-control-max-age": b"600",
            b"access-control-allow-private-network": b"true",
            # The filter's encoder runs on its own answer too, as in Envoy.
            b"access-control-expose-headers": b"x-exposed",
        })
        self.assertEqual(manager.stream_info.response_code_details, "cors_response")
        self.assertEqual(sink.events[-1], ("headers", b"200", True))

    def test_origin_matchers(self) -> None:
        for origin, allowed in (("https://app.example", True), ("https://a.trusted.example", True),
                                ("https://abc.regex.example", True),
                                ("https://evil.example", False),
                                ("https://app.example.evil", False)):
            _, response, _, _ = run(self.config, actual(origin))
            self.assertEqual(response.get(b"access-control-allow-origin"),
                             origin.encode() if allowed else None, origin)

    def test_actual_request_gets_the_headers(self) -> None:
        upstream, response, _, _ = run(self.config, actual("https://app.example"),
                                       Headers([(b":status", b"200")]))
        self.assertIsNotNone(upstream.request)
        self.assertEqual(cors_headers(response), {
            b"access-control-allow-origin": b"https://app.example",
            b"access-control-allow-credentials": b"true",
            b"access-control-expose-headers": b"x-exposed",
        })

    def test_disallowed_origin_gets_nothing(self) -> None:
        # A preflight from another origin goes on to the upstream (forward_not_matching
        # _preflights defaults to true); its answer gets no CORS header.
        upstream, response, _, _ = run(self.config, preflight("https://evil.example"))
        self.assertIsNotNone(upstream.request)
        self.assertEqual(cors_headers(response), {})
        _, response, _, _ = run(self.config, actual("https://evil.example"))
        self.assertEqual(cors_headers(response), {})
        # No Origin: not a CORS request at all.
        _, response, _, _ = run(self.config, actual(None))
        self.assertEqual(cors_headers(response), {})

    def test_preflight_with_a_disallowed_origin_not_forwarded(self) -> None:
        upstream, response, _, _ = run(self.config, preflight("https://evil.example",
                                                              "/strict"))
        self.assertIsNone(upstream.request)
        self.assertEqual(response.get(b":status"), b"200")
        # The route's policy sets only forward_not_matching_preflights: the rest comes from
        # the virtual host, but no allow-origin for an origin that does not match.
        self.assertNotIn(b"access-control-allow-origin", response)
        self.assertEqual(response.get(b"access-control-allow-methods"), b"GET,POST")

    def test_route_fields_over_the_virtual_hosts(self) -> None:
        _, response, _, _ = run(self.config, preflight(
            "https://app.example", "/star", method="PATCH",
            access_control_request_headers="x-a,x-b"))
        self.assertEqual(response.get(b"access-control-allow-methods"), b"PATCH")
        self.assertEqual(response.get(b"access-control-allow-headers"), b"x-a,x-b")
        # allow_credentials: false at the route wins over the virtual host's true.
        self.assertNotIn(b"access-control-allow-credentials", response)
        # Inherited from the virtual host.
        self.assertEqual(response.get(b"access-control-max-age"), b"600")

    def test_filter_disabled_and_shadow(self) -> None:
        for path in ("/off", "/shadow"):
            upstream, response, _, _ = run(self.config, preflight("https://app.example", path))
            self.assertIsNotNone(upstream.request, path)  # not answered here
            self.assertEqual(cors_headers(response), {}, path)
        # Shadow mode evaluates the origin without enforcing anything.
        made = self.config.http_filters[0]()
        run(self.config, actual("https://app.example", "/shadow"), filters=[made])
        self.assertEqual(made.latched_origin, b"https://app.example")
        self.assertFalse(made.is_cors_request)

    def test_no_policy_or_direct_response(self) -> None:
        bare = load_hcm(hcm_yaml(FILTER))
        upstream, response, _, _ = run(bare, preflight("https://app.example"))
        self.assertIsNotNone(upstream.request)
        self.assertEqual(cors_headers(response), {})
        made = self.config.http_filters[0]()
        run(self.config, preflight("https://app.example", "/direct"), filters=[made])
        self.assertFalse(made.is_cors_request)

    def test_filter_enabled_fraction_is_sampled(self) -> None:
        config = load_hcm(hcm_yaml(FILTER, vhost=policy(
            VHOST_POLICY + "filter_enabled:\n  default_value: {numerator: 30}\n")))
        rng = random.Random(7)
        answered = 0
        for _ in range(200):
            made = CorsFilter(rng)
            upstream, _, _, _ = run(config, preflight("https://app.example"), filters=[made])
            answered += upstream.request is None
        self.assertGreater(answered, 40)
        self.assertLess(answered, 80)


class CorsConfigErrorTests(unittest.TestCase):
    def test_errors_name_the_path(self) -> None:
        where = ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
                 "route_config.virtual_hosts[0].typed_per_filter_config")
        # The schema's own errors bracket the dotted key; hbonex's name it as written.
        where, schema = f"{where}.envoy.filters.http.cors", f'{where}["envoy.filters.http.cors"]'
        cases = [
            ("allow_origin_string_match: [{}]\n",
             f"{where}.allow_origin_string_match[0]: one of exact, prefix, suffix, contains, "
             "safe_regex is required"),
            ("allow_origin_string_match: [{safe_regex: {regex: '('}}]\n",
             f"{where}.allow_origin_string_match[0].safe_regex"),
            ("allow_origin_string_match: [{exact: a}]\nallow_origin: [a]\n",
             f"{schema}.allow_origin: unknown field 'allow_origin'"),
        ]
        for fields, expected in cases:
            text = hcm_yaml(FILTER, vhost=policy(fields))
            message = str(self.assertRaises(ConfigError, load_hcm, text))
            self.assertTrue(message.startswith(expected), f"{message!r}\n!= {expected!r}")

    def test_runtime_key_warns(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from hbonex.config import load_config

        text = hcm_yaml(FILTER, vhost=policy(
            "allow_origin_string_match: [{exact: a}]\nfilter_enabled:\n"
            "  runtime_key: cors.on\n  default_value: {numerator: 100}\n"))
        loaded = load_config(text, MemoryReactorClock())
        [(path, message)] = loaded.warnings
        self.assertTrue(path.endswith('cors"].filter_enabled.runtime_key'),
                        path)
        self.assertIn("runtime keys are not read: default_value applies", message)


class DocumentedExampleTests(unittest.TestCase):
    """docs/waypoint-filters.md's two sections: their YAML loads and does what they say."""

    def test_examples_load(self) -> None:
        import re
        from pathlib import Path

        text = (Path(__file__).parent.parent / "docs" / "waypoint-filters.md").read_text()
        for section in ("envoy.filters.http.header_mutation", "envoy.filters.http.cors"):
            body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
            filters, per_route = re.findall(r"^```yaml\n(.*?)^```", body,
                                            re.MULTILINE | re.DOTALL)
            filters = filters.split("\n", 1)[1].rsplit("- name: envoy.filters.http.router", 1)[0]
            routes = ("- match: {prefix: /}\n  route: {cluster: backend}\n"
                      + "\n".join("  " + line for line in per_route.splitlines()) + "\n")
            config = load_hcm(hcm_yaml(filters, routes=routes))
            self.assertEqual([f.name for f in config.http_filters], [section])
        # The CORS example answers a preflight from its origin.
        _, response, _, _ = run(config, preflight("https://app.example"))
        self.assertEqual(response.get(b"access-control-max-age"), b"86400")
