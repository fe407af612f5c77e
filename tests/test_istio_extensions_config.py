"""
Istio's own extensions in configuration, in the exact shapes istiod writes them
(istio/istio istioctl/pkg/proxyconfig/testdata/config_dump.json and
istioctl/pkg/writer/compare/testdata/configdump.json): they load, warn where hbonex can't do
what they ask, and refuse mistakes naming the YAML path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from hbonex.config.loader import load_config
from hbonex.errors import ConfigError

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
       "HttpConnectionManager"

#: The waypoint's HTTP chain, as in Istio's dump.
WAYPOINT_FILTERS = """\
- name: envoy.filters.http.grpc_stats
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
    emit_filter_state: true
    stats_for_all_methods: false
- name: waypoint_upstream_peer_metadata
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/io.istio.http.peer_metadata.Config
    value:
      upstream_discovery:
      - workload_discovery: {}
- name: istio.stats
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/stats.PluginConfig
    value:
      reporter: SERVER_GATEWAY
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

#: The connect_terminate listener's first filter.
DOWNSTREAM_FILTERS = """\
- name: waypoint_downstream_peer_metadata
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/io.istio.http.peer_metadata.Config
    value:
      downstream_discovery:
      - workload_discovery: {}
      shared_with_upstream: true
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

#: A TCP chain of the waypoint.
TCP_FILTERS = """\
- name: istio.metadata_exchange
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange
    value:
      protocol: istio-peer-exchange
      enable_discovery: true
- name: istio.stats
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/stats.PluginConfig
    value:
      reporter: SERVER_GATEWAY
- name: envoy.filters.network.tcp_proxy
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
    stat_prefix: backend
    cluster: backend
"""


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def http_config(http_filters: str) -> str:
    return f"""\
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {_HCM}
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
{_indent(http_filters, 10)}
  clusters:
  - name: backend
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}
"""


def tcp_config(filters: str) -> str:
    text = http_config("- name: envoy.filters.http.router")
    start = text.index("    - filters:\n") + len("    - filters:\n")
    end = text.index("  clusters:")
    return text[:start] + _indent(filters, 6) + "\n" + text[end:]


class IstioDumpShapesTests(unittest.TestCase):
    def load(self, text: str) -> Any:
        return load_config(text, MemoryReactorClock())

    def warnings(self, text: str) -> list[tuple[str, str]]:
        return list(self.load(text).warnings)

    def error(self, text: str) -> str:
        return str(self.assertRaises(ConfigError, self.load, text))

    def test_waypoint_chain_loads(self) -> None:
        warnings = self.warnings(http_config(WAYPOINT_FILTERS))
        paths = [path for path, _ in warnings]
        # workload discovery is out of reach: said once, at its path.
        wds = [(p, m) for p, m in warnings if "workload_discovery" in m]
        self.assertEqual(len(wds), 1, warnings)
        self.assertTrue(wds[0][0].endswith(
            "http_filters[1].typed_config.value.upstream_discovery[0].workload_discovery"),
            wds[0][0])
        self.assertIn("WDS", wds[0][1])
        self.assertEqual(len(paths), 1, warnings)

    def test_downstream_chain_loads(self) -> None:
        warnings = self.warnings(http_config(DOWNSTREAM_FILTERS))
        self.assertEqual(len(warnings), 1)
        self.assertIn("downstream_discovery[0].workload_discovery", warnings[0][0])

    def test_tcp_chain_loads_with_metadata_exchange_warning(self) -> None:
        warnings = self.warnings(tcp_config(TCP_FILTERS))
        self.assertEqual(len(warnings), 1, warnings)
        path, message = warnings[0]
        self.assertIn("filters[0].typed_config.value", path)
        self.assertIn("istio.metadata_exchange: no effect", message)

    def test_baggage_discovery_has_no_warning(self) -> None:
        filters = WAYPOINT_FILTERS.replace("upstream_discovery:\n      - workload_discovery: {}",
                                           "downstream_discovery:\n      - baggage: {}")
        self.assertEqual(self.warnings(http_config(filters)), [])

    def test_unknown_discovery_method(self) -> None:
        filters = WAYPOINT_FILTERS.replace("workload_discovery: {}", "wds: {}")
        message = self.error(http_config(filters))
        self.assertIn("upstream_discovery[0]", message)
        self.assertIn("one of baggage, workload_discovery, istio_headers is required", message)

    def test_two_discovery_methods_in_one_item(self) -> None:
        filters = WAYPOINT_FILTERS.replace("- workload_discovery: {}",
                                           "- workload_discovery: {}\n        baggage: {}")
        message = self.error(http_config(filters))
        self.assertIn("upstream_discovery[0].workload_discovery", message)
        self.assertIn("only one of baggage, workload_discovery may be set", message)

    def test_bad_reporter(self) -> None:
        message = self.error(http_config(WAYPOINT_FILTERS.replace(
            "reporter: SERVER_GATEWAY", "reporter: WAYPOINT")))
        self.assertIn("http_filters[2].typed_config.value.reporter", message)
        self.assertIn("SERVER_GATEWAY", message)

    def test_unknown_stats_field(self) -> None:
        message = self.error(http_config(WAYPOINT_FILTERS.replace(
            "reporter: SERVER_GATEWAY", "reporter: SERVER_GATEWAY\n      stat_prefix: x")))
        self.assertIn("http_filters[2].typed_config.value.stat_prefix", message)
        self.assertIn("unknown field 'stat_prefix'", message)

    def test_stats_metrics_overrides(self) -> None:
        filters = WAYPOINT_FILTERS.replace("reporter: SERVER_GATEWAY", """\
reporter: SERVER_GATEWAY
      disable_host_header_fallback: true
      tcp_reporting_duration: 10s
      metrics:
      - name: requests_total
        tags_to_remove: [source_cluster]
        dimensions: {custom: request.host}
      - name: request_bytes
        drop: true
      definitions:
      - {name: my_count, value: "1", type: COUNTER}""")
        warnings = self.warnings(http_config(filters))
        by_path = {path.rsplit(".", 1)[-1]: message for path, message in warnings}
        self.assertIn("CEL", by_path["dimensions"])
        self.assertIn("tcp_reporting_duration", by_path["tcp_reporting_duration"])
        self.assertTrue(any("definitions[0]" in p for p, _ in warnings), warnings)

    def test_unknown_metric_name(self) -> None:
        filters = WAYPOINT_FILTERS.replace("reporter: SERVER_GATEWAY", """\
reporter: SERVER_GATEWAY
      metrics:
      - name: request_total""")
        message = self.error(http_config(filters))
        self.assertIn("metrics[0].name", message)
        self.assertIn("requests_total", message)

    def test_grpc_stats_upstream_stats_warns(self) -> None:
        filters = WAYPOINT_FILTERS.replace("emit_filter_state: true",
                                           "emit_filter_state: true\n    "
                                           "enable_upstream_stats: true")
        warnings = self.warnings(http_config(filters))
        self.assertTrue(any(p.endswith("enable_upstream_stats") for p, _ in warnings),
                        warnings)

    def test_grpc_stats_allowlist_and_all_methods(self) -> None:
        filters = WAYPOINT_FILTERS.replace("stats_for_all_methods: false", """\
stats_for_all_methods: true
    individual_method_stats_allowlist:
      services: [{name: a.B, method_names: [C]}]""")
        message = self.error(http_config(filters))
        self.assertIn("http_filters[0].typed_config.individual_method_stats_allowlist", message)
        self.assertIn("only one of", message)

    def test_metadata_exchange_unknown_field(self) -> None:
        message = self.error(tcp_config(TCP_FILTERS.replace("enable_discovery: true",
                                                            "enable_discover: true")))
        self.assertIn("filters[0].typed_config.value.enable_discover", message)
        self.assertIn("did you mean 'enable_discovery'", message)

    def test_bare_type_without_typed_struct(self) -> None:
        """Istio's type as a bare @type: refused with the TypedStruct form, or skipped when
        optional (the plugin exists, but there is no compiled message to read it)."""
        bare = """\
- name: istio.peer_metadata
  typed_config:
    "@type": type.googleapis.com/io.istio.http.peer_metadata.Config
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""
        message = self.error(http_config(bare))
        self.assertIn("TypedStruct", message)
        optional = bare.replace("  typed_config:\n    \"@type\": type.googleapis.com/io",
                                "  is_optional: true\n  typed_config:\n"
                                "    \"@type\": type.googleapis.com/io", 1)
        [(path, warning)] = self.warnings(http_config(optional))
        self.assertTrue(path.endswith("http_filters[0]"), path)
        self.assertIn("skipped", warning)
