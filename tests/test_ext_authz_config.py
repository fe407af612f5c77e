"""
ext_authz configuration (Envoy's ExtAuthz with http_service, ExtAuthzPerRoute) and optional
HTTP filters (``is_optional: true``): what loads, what is refused, with paths and lines.
"""

from __future__ import annotations

from typing import Any

from hbonex.filters.http.ext_authz_config import ExtAuthzConfig, ExtAuthzPerRoute
from tests.test_config import Base

AUTHZ_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
CONFIG = """\
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: backend}}
{per_route}
          http_filters:
{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}
"""
AUTHZ = f"""\
- name: envoy.filters.http.ext_authz
  typed_config:
    "@type": {AUTHZ_TYPE}
"""
SERVICE = """\
    http_service:
      server_uri: {uri: "http://authz", cluster: backend, timeout: 0.5s}
"""


def config(filters: str, per_route: str = "") -> str:
    return CONFIG.format(
        hcm="type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager",
        filters="\n".join(" " * 10 + line for line in filters.splitlines()),
        per_route="\n".join(" " * 16 + line for line in per_route.splitlines()))


class ExtAuthzConfigTests(Base):
    def parsed(self, text: str) -> Any:
        loaded = self.load(text)
        return loaded, loaded.listeners[0].chains[0].filters[0].parsed.http_filters

    def test_full_http_service(self) -> None:
        loaded = self.load(config(AUTHZ + SERVICE + """\
      path_prefix: /check
      authorization_request:
        allowed_headers: {patterns: [{exact: x-user}, {prefix: x-b3-}]}
        headers_to_add: [{key: X-Peer, value: "%DOWNSTREAM_REMOTE_ADDRESS%"}]
      authorization_response:
        allowed_upstream_headers: {patterns: [{exact: x-auth-user}]}
        allowed_client_headers: {patterns: [{exact: x-reason}]}
    failure_mode_allow: true
    status_on_error: {code: ServiceUnavailable}
    with_request_body: {max_request_bytes: 1024, allow_partial_message: true}
    transport_api_version: V3
""", per_route="""\
typed_per_filter_config:
  envoy.filters.http.ext_authz:
    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
    disabled: true
"""))
        from hbonex.config.loader import LoadedConfig

        self.assertIsInstance(loaded, LoadedConfig)
        hcm = loaded.listeners[0].chains[0].filters[0].parsed
        [factory] = hcm.http_filters
        shared = factory().shared
        config_: ExtAuthzConfig = shared.config
        self.assertEqual(config_.cluster.name, "backend")
        self.assertEqual((config_.timeout, config_.path_prefix), (0.5, b"/check"))
        self.assertEqual(config_.status_on_error, 503)
        self.assertTrue(config_.failure_mode_allow)
        self.assertTrue(config_.request_header_allowed(b"x-b3-traceid"))
        self.assertTrue(config_.request_header_allowed(b":path"))
        self.assertFalse(config_.request_header_allowed(b"cookie"))
        self.assertTrue(config_.client_header_allowed(b"location"))
        self.assertFalse(config_.client_header_allowed(b"x-other"))
        self.assertEqual(config_.headers_to_add[0][0], b"x-peer")
        self.assertEqual(shared.stats.prefix, "http.ingress.ext_authz.")
        route = hcm.router.virtual_hosts[0].routes[0]
        self.assertEqual(route.per_filter_config["envoy.filters.http.ext_authz"].config,
                         ExtAuthzPerRoute(disabled=True))
        warned = [path for path, _ in loaded.warnings]
        self.assertEqual(len([p for p in warned if p.endswith("transport_api_version")]), 1)

    def test_grpc_service_refused(self) -> None:
        text = config(AUTHZ + """\
    grpc_service: {envoy_grpc: {cluster_name: backend}}
""")
        message = self.error(text)
        self.assertIn("http_filters[0].typed_config.grpc_service: grpc_service "
                      "(envoy.extensions.filters.http.ext_authz.v3.ExtAuthz) is known to Envoy "
                      "but not implemented by hbonex: use http_service (an HTTP authorization "
                      "service) (line 23)", message)

    def test_missing_timeout(self) -> None:
        message = self.error(config(AUTHZ + """\
    http_service:
      server_uri: {uri: "http://authz", cluster: backend}
"""))
        self.assertIn("http_filters[0].typed_config.http_service.server_uri: missing required "
                      "field 'timeout'", message)

    def test_undefined_cluster(self) -> None:
        message = self.error(config(AUTHZ + SERVICE.replace("cluster: backend",
                                                            "cluster: authz")))
        self.assertIn("server_uri.cluster: undefined cluster 'authz'; defined clusters: "
                      "backend", message)

    def test_missing_service(self) -> None:
        message = self.error(config(AUTHZ + "    failure_mode_allow: true\n"))
        self.assertIn("http_filters[0].typed_config: missing required field 'http_service'",
                      message)

    def test_duplicate_allowed_headers(self) -> None:
        message = self.error(config(AUTHZ + SERVICE + """\
      authorization_request:
        allowed_headers: {patterns: [{exact: a}]}
    allowed_headers: {patterns: [{exact: b}]}
"""))
        self.assertIn("typed_config.allowed_headers: set allowed_headers here or in "
                      "http_service.authorization_request, not both", message)

    def test_bad_regex_in_matcher(self) -> None:
        message = self.error(config(AUTHZ + SERVICE + """\
    allowed_headers: {patterns: [{safe_regex: {regex: "x-("}}]}
"""))
        self.assertIn("allowed_headers.patterns[0].safe_regex.regex: invalid regex 'x-('", message)

    def test_max_request_bytes_required(self) -> None:
        message = self.error(config(AUTHZ + SERVICE + """\
    with_request_body: {allow_partial_message: true}
"""))
        self.assertIn("typed_config.with_request_body: missing required field "
                      "'max_request_bytes'", message)

    def test_per_route_service_refused(self) -> None:
        message = self.error(config(AUTHZ + SERVICE, per_route="""\
typed_per_filter_config:
  envoy.filters.http.ext_authz:
    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
    check_settings: {http_service: {path_prefix: /x}}
"""))
        self.assertIn("check_settings.http_service: http_service "
                      "(envoy.extensions.filters.http.ext_authz.v3.CheckSettings) is known to "
                      "Envoy but not implemented by hbonex: one authorization service per "
                      "filter (no per-route service)", message)

    def test_per_route_disabled_false(self) -> None:
        message = self.error(config(AUTHZ + SERVICE, per_route="""\
typed_per_filter_config:
  envoy.filters.http.ext_authz:
    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
    disabled: false
"""))
        self.assertIn("typed_per_filter_config.envoy.filters.http.ext_authz.disabled: must be "
                      "true (Envoy's rule) (line 19)", message)


class OptionalFilterTests(Base):
    UNKNOWN = """\
- name: istio.stats
  {optional}
  typed_config:
    "@type": {type_url}
"""

    def test_optional_unknown_filters_are_skipped_with_a_warning(self) -> None:
        for type_url in ("type.googleapis.com/istio.Unknown",
                         "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"):
            loaded = self.load(config(self.UNKNOWN.format(optional="is_optional: true",
                                                          type_url=type_url)))
            hcm = loaded.listeners[0].chains[0].filters[0].parsed
            self.assertEqual(tuple(hcm.http_filters), ())
            [(path, text)] = [w for w in loaded.warnings if "skipped" in w[1]]
            self.assertTrue(path.endswith("typed_config.http_filters[0]"), path)
            self.assertIn(f"optional HTTP filter 'istio.stats' skipped: hbonex has no HTTP "
                          f"filter '{type_url}' (is_optional: true) (line 20)", text)

    def test_unknown_filters_without_is_optional_stay_errors(self) -> None:
        for type_url, what in (
                ("type.googleapis.com/istio.Unknown", "unknown HTTP filter type"),
                ("type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                 "unknown HTTP filter type")):
            message = self.error(config(self.UNKNOWN.format(optional="is_optional: false",
                                                            type_url=type_url)))
            self.assertIn(f"{what} '{type_url}'", message)

    def test_optional_known_filter_is_used(self) -> None:
        loaded = self.load(config(AUTHZ.replace("  typed_config", "  is_optional: true\n"
                                                "  typed_config") + SERVICE))
        hcm = loaded.listeners[0].chains[0].filters[0].parsed
        self.assertEqual([f.name for f in hcm.http_filters], ["envoy.filters.http.ext_authz"])
        self.assertEqual([w for w in loaded.warnings if "skipped" in w[1]], [])

    def test_config_check_says_so(self) -> None:
        import io
        import sys

        from hbonex.cli import main as cli

        path = self.mktemp()
        with open(path, "w") as f:
            f.write(config(self.UNKNOWN.format(optional="is_optional: true",
                                               type_url="type.googleapis.com/istio.Unknown")))
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", out)
        try:
            cli.main(["config", "check", path])
        except SystemExit as e:
            self.assertEqual(e.code, 0)
        text = out.getvalue()
        self.assertEqual(text.count("optional HTTP filter 'istio.stats' skipped"), 1, text)
