"""
Upstream ``auto_config`` (HttpProtocolOptions): what the configuration accepts and refuses,
and the ALPN the cluster offers.
"""

from __future__ import annotations

from hbonex.upstream.auto_pool import AutoHttpPool
from tests.test_config import Base
from tests.test_e2e_hcm import HCM_TYPE

OPTIONS = """\
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {idle_timeout: 7s}
        auto_config:
          http2_protocol_options: {max_concurrent_streams: 10}
"""
TLS = """\
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificates:
          - certificate_chain: {filename: pki/client/cert.pem}
            private_key: {filename: pki/client/key.pem}
          validation_context:
            trusted_ca: {filename: pki/ca.pem}
"""
CONFIG = """\
static_resources:
  listeners:
  - name: front
    address:
      socket_address: {address: 127.0.0.1, port_value: 9000}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": """ + HCM_TYPE + """
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: backend}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: 127.0.0.1, port_value: 8443}
"""


class AutoConfigTests(Base):
    def test_alpn_offers_both_and_settings_apply(self) -> None:
        self.in_pki_dir()
        cluster = self.load(CONFIG + OPTIONS + TLS).bootstrap.clusters["backend"]
        self.assertEqual(cluster.upstream_protocol, "auto")
        self.assertEqual(cluster.tls.alpn, (b"h2", b"http/1.1"))
        self.assertEqual((cluster.max_streams_per_connection, cluster.pool_idle_timeout),
                         (10, 7.0))
        self.assertIsInstance(cluster.runtime.http_pool(cluster), AutoHttpPool)

    def test_configured_alpn_is_kept(self) -> None:
        self.in_pki_dir()
        text = CONFIG + OPTIONS + TLS.replace("        common_tls_context:\n",
                                              "        common_tls_context:\n"
                                              "          alpn_protocols: [http/1.1]\n")
        cluster = self.load(text).bootstrap.clusters["backend"]
        self.assertEqual(cluster.tls.alpn, (b"http/1.1",))

    def test_needs_tls(self) -> None:
        error = self.error(CONFIG + OPTIONS)
        self.assertIn('static_resources.clusters[0].typed_extension_protocol_options['
                      '"envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].auto_config: '
                      "auto_config chooses HTTP/2 or HTTP/1.1 by ALPN, so the cluster needs an "
                      "envoy.transport_sockets.tls transport_socket", error)
        self.assertIn("for plain text use explicit_http_config", error)

    def test_not_for_tunnels(self) -> None:
        self.in_pki_dir()
        start = CONFIG.index("      - name: envoy.filters.network.http_connection_manager")
        end = CONFIG.index("  clusters:")
        text = CONFIG[:start] + """\
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: out
          cluster: backend
          tunneling_config: {hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"}
""" + CONFIG[end:] + OPTIONS + TLS
        error = self.error(text)
        self.assertIn("filters[0].typed_config.tunneling_config: cluster 'backend' has "
                      "auto_config (static_resources.clusters[0]): hbonex tunnels with one "
                      "protocol per cluster; give it explicit_http_config", error)

    def test_http3_refused(self) -> None:
        self.in_pki_dir()
        text = CONFIG + OPTIONS.replace("          http2_protocol_options:",
                                        "          http3_protocol_options: {}\n"
                                        "          http2_protocol_options:") + TLS
        self.assertIn("auto_config.http3_protocol_options", self.error(text))
        self.assertIn("no HTTP/3", self.error(text))

    def test_use_downstream_protocol_config_over_tls_names_the_choice(self) -> None:
        self.in_pki_dir()
        text = CONFIG + OPTIONS.replace(
            "        auto_config:\n          http2_protocol_options: {max_concurrent_streams: "
            "10}\n", "        use_downstream_protocol_config: {}\n") + TLS
        message = self.error(text)
        self.assertIn(".use_downstream_protocol_config: use_downstream_protocol_config is "
                      "implemented for plain-text upstreams only", message)
        self.assertIn("over TLS use auto_config", message)
