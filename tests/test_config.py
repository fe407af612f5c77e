"""Tests for the Envoy v3 bootstrap YAML loader (hbonex.config), its CLI and the plugins."""

from __future__ import annotations

import datetime
import io
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin
from twisted.trial import unittest

from hbonex import extensions
from hbonex.cli import main as cli
from hbonex.config import load_bootstrap, load_config
from hbonex.config.yamlpath import Node, load_yaml
from hbonex.errors import ConfigError
from hbonex.http.routing import RouteConfig
from hbonex.interfaces import (
    IClusterTypeExtension,
    IHTTPFilterExtension,
    IListenerFilterExtension,
    INetworkFilterExtension,
    ITransportSocketExtension,
)
from hbonex.tls import pki
from hbonex.tls.context import SanMatcher
from hbonex.tunnel.connect import ConnectRequest, TargetPolicy, TargetRule
from hbonex.upstream.cluster import InternalAddress, SocketAddress


def _configs_dir() -> Path:
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "shared" / "configs", Path("/work/shared/configs")):
        if candidate.is_dir():
            return candidate
    return here.parents[2] / "shared" / "configs"


CONFIGS = _configs_dir()


def config_text(name: str) -> str:
    path = CONFIGS / name
    if not path.exists():
        raise unittest.SkipTest(f"{path} is not here")
    return path.read_text()


def make_pki(directory: Path, **issue_kwargs: Any) -> Path:
    """
    DIR/pki/{ca.pem, client/, server/} as `hbonex pki` writes it.
    """
    root = directory / "pki"
    pki.init_ca(root)
    pki.issue(root, "client", spiffe="spiffe://cluster.local/ns/default/sa/client",
              **issue_kwargs)
    pki.issue(root, "server", spiffe="spiffe://cluster.local/ns/default/sa/server",
              dns=["localhost"], ip=["127.0.0.1"], **issue_kwargs)
    return root


def line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the text")


def connect(authority: str) -> ConnectRequest:
    return ConnectRequest("CONNECT", authority, ())


class Base(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def load(self, text: str, **kwargs: Any) -> Any:
        return load_config(text, self.reactor, **kwargs)

    def in_pki_dir(self) -> Path:
        """
        A temporary working directory holding pki/ (configs name pki/... relative to it).
        """
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        make_pki(directory)
        old = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, old)
        return directory

    def error(self, text: str, **kwargs: Any) -> str:
        error = self.assertRaises(ConfigError, self.load, text, **kwargs)
        return str(error)


class AcceptanceConfigTests(Base):
    """
    Every configuration in shared/configs loads, unmodified, into the expected objects.
    """

    def test_internal_listener_chain(self) -> None:
        loaded = load_config(str(CONFIGS / "seed-internal-listener-chain.yaml"), self.reactor)
        ingress, internal = loaded.listeners
        self.assertEqual(ingress.listener.name, "ingress")
        self.assertEqual(ingress.listener.endpoint, "tcp:9999:interface=127.0.0.1")
        self.assertFalse(ingress.listener.internal)
        self.assertEqual(internal.listener.name, "demo_internal_listener")
        self.assertTrue(internal.listener.internal)
        self.assertIsNone(internal.listener.endpoint)
        [chain] = ingress.chains
        [f] = chain.filters
        self.assertEqual(f.name, "envoy.filters.network.tcp_proxy")
        self.assertEqual([c.name for c in f.parsed.clusters], ["encap_cluster"])
        self.assertIsNone(f.parsed.tunneling)
        self.assertEqual(
            [c.name for c in internal.chains[0].filters[0].parsed.clusters], ["backend"]
        )
        clusters = loaded.bootstrap.clusters
        self.assertEqual(clusters["encap_cluster"].endpoints,
                         (InternalAddress("demo_internal_listener"),))
        self.assertEqual(clusters["backend"].endpoints, (SocketAddress("127.0.0.1", 8080),))
        self.assertEqual(clusters["backend"].connect_timeout, 2.0)
        self.assertEqual(clusters["encap_cluster"].connect_timeout, 5.0)
        self.assertIsNone(clusters["backend"].upstream_protocol)
        self.assertEqual([x.name for x in loaded.bootstrap.listeners],
                         ["ingress", "demo_internal_listener"])
        self.assertEqual(loaded.bootstrap.listener_paths["ingress"],
                         "static_resources.listeners[0]")

    def test_encapsulate_http_in_h2_connect(self) -> None:
        loaded = self.load(config_text("seed-encapsulate-http-in-h2-connect.yaml"))
        http, encap = loaded.listeners
        self.assertEqual(http.listener.endpoint, "tcp:10000:interface=127.0.0.1")
        self.assertTrue(encap.listener.internal)
        hcm = http.chains[0].filters[0].parsed
        self.assertEqual(hcm.stat_prefix, "ingress_http")
        self.assertEqual(hcm.codec_type, "AUTO")
        router = hcm.router
        self.assertIsInstance(router, RouteConfig)
        self.assertFalse(router.connect_enabled)
        [vhost] = router.virtual_hosts
        self.assertEqual(vhost.domains, ("*",))
        [route] = vhost.routes
        self.assertEqual(route.prefix, "/")
        self.assertIs(route.cluster, loaded.bootstrap.clusters["encap_cluster"])
        proxy = encap.chains[0].filters[0].parsed
        self.assertEqual(proxy.tunneling.hostname.text, "host.com:443")
        cluster_0 = loaded.bootstrap.clusters["cluster_0"]
        self.assertEqual(cluster_0.upstream_protocol, "http2")
        self.assertIsNone(cluster_0.tls)
        self.assertEqual(cluster_0.endpoints, (SocketAddress("127.0.0.1", 10001),))
        self.assertEqual(loaded.bootstrap.clusters["encap_cluster"].endpoints,
                         (InternalAddress("encap"),))

    def test_terminate_h2_connect(self) -> None:
        loaded = self.load(config_text("seed-terminate-h2-connect.yaml"))
        [listener] = loaded.listeners
        self.assertEqual(listener.listener.endpoint, "tcp:10001:interface=127.0.0.1")
        [chain] = listener.chains
        self.assertIsNone(chain.chain.tls)
        hcm = chain.filters[0].parsed
        self.assertTrue(hcm.router.connect_enabled)
        [route] = hcm.router.virtual_hosts[0].routes
        self.assertTrue(route.connect_matcher)
        self.assertTrue(route.connect_enabled)
        backend = loaded.bootstrap.clusters["backend"]
        decision = hcm.router.route(connect("host.com:443"), None)
        self.assertEqual((decision.status, decision.cluster), (200, backend))

    def test_hbone_client(self) -> None:
        self.in_pki_dir()
        loaded = load_config(str(CONFIGS / "hbone-client.yaml"), self.reactor)
        [listener] = loaded.listeners
        self.assertEqual(listener.listener.endpoint, "tcp:9000:interface=127.0.0.1")
        proxy = listener.chains[0].filters[0].parsed
        self.assertEqual(proxy.tunneling.hostname.text, "127.0.0.1:8080")
        [header] = proxy.tunneling.headers_to_add
        self.assertEqual(header.key, "forwarded")
        self.assertEqual(header.value.render({"remote": "1.2.3.4:5"}), 'for="1.2.3.4:5"')
        cluster = loaded.bootstrap.clusters["hbone"]
        self.assertEqual(cluster.upstream_protocol, "http2")
        self.assertEqual(cluster.h2_settings.initial_stream_window_size, 4194304)
        self.assertEqual(cluster.endpoints, (SocketAddress("127.0.0.1", 15008),))
        tls = cluster.tls
        self.assertEqual(tls.alpn, (b"h2",))
        self.assertEqual(tls.min_version, "TLSv1_3")
        self.assertEqual(tls.peer_policy.san_matchers, (
            SanMatcher("URI", "exact", "spiffe://cluster.local/ns/default/sa/server"),))
        material = pki.load_pki_dir("pki/client")
        self.assertEqual(tls.certificate, material.certificate)
        self.assertEqual(tls.ca_certificates, tuple(material.ca_certificates))
        self.assertIsNotNone(cluster.client_tls)

    def test_hbone_server(self) -> None:
        self.in_pki_dir()
        loaded = load_config(str(CONFIGS / "hbone-server.yaml"), self.reactor)
        [listener] = loaded.listeners
        [chain] = listener.chains
        self.assertIsNotNone(chain.chain.tls)
        tls = chain.tls
        self.assertTrue(tls.require_peer_certificate)
        self.assertEqual(tls.alpn, (b"h2",))
        self.assertEqual(tls.peer_policy.san_matchers,
                         (SanMatcher("URI", "prefix", "spiffe://cluster.local/"),))
        client = pki.load_pki_dir("pki/client").certificate
        server = pki.load_pki_dir("pki/server").certificate
        self.assertIsNone(tls.peer_policy.check(client))
        hcm = chain.filters[0].parsed
        self.assertEqual(hcm.codec_type, "HTTP2")
        self.assertEqual(hcm.h2_settings.max_concurrent_streams, 200)
        self.assertIsNone(tls.peer_policy.check(server))
        cluster = loaded.bootstrap.clusters["original_dst"]
        self.assertEqual(cluster.type, "ORIGINAL_DST")
        self.assertEqual(cluster.original_dst_header, ":authority")
        self.assertIsNone(cluster.target_policy)
        ok = hcm.router.route(connect("127.0.0.1:8080"), None)
        self.assertEqual((ok.status, ok.cluster, ok.original_destination),
                         (200, cluster, "127.0.0.1:8080"))
        self.assertEqual(hcm.router.route(connect("10.0.0.1:80"), None).status, 404)

    def test_load_bootstrap_relative_to_base_dir(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        make_pki(directory)
        bootstrap = load_bootstrap(config_text("hbone-client.yaml"), self.reactor,
                                   base_dir=directory)
        self.assertEqual(bootstrap.clusters["hbone"].upstream_protocol, "http2")


SIMPLE = """\
static_resources:
  listeners:
  - name: a
    address:
      socket_address: {address: 127.0.0.1, port_value: 9000}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: a
          cluster: backend
  clusters:
  - name: backend
    connect_timeout: 1s
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: 127.0.0.1, port_value: 8080}
"""


class ErrorTests(Base):
    """
    Bad configurations fail with the exact path, the problem, what fits, and the line.
    """

    def test_unknown_field_suggests(self) -> None:
        text = config_text("seed-encapsulate-http-in-h2-connect.yaml").replace(
            "hostname: host.com:443", "hostname: host.com:443\n            use_pst: true"
        )
        self.assertEqual(self.error(text), (
            "static_resources.listeners[1].filter_chains[0].filters[0].typed_config."
            "tunneling_config.use_pst: unknown field 'use_pst'; accepted here: headers_to_add, "
            "hostname, post_path, propagate_response_headers, propagate_response_trailers, "
            "request_id_extension, request_id_header, request_id_metadata_key, use_post (did "
            f"you mean 'use_post'?) (line {line_of(text, 'use_pst')})"
        ))

    def test_wrong_type_duration(self) -> None:
        text = SIMPLE.replace("connect_timeout: 1s", "connect_timeout: 5")
        self.assertEqual(self.error(text), (
            "static_resources.clusters[0].connect_timeout: expected a duration like '5s', "
            f"got 5 (line {line_of(text, 'connect_timeout')})"
        ))

    def test_wrong_type_integer(self) -> None:
        text = SIMPLE.replace("port_value: 9000", "port_value: nine")
        self.assertEqual(self.error(text), (
            "static_resources.listeners[0].address.socket_address.port_value: expected an "
            "integer, got 'nine' (line 5)"
        ))

    def test_unknown_type_url_lists_known(self) -> None:
        text = SIMPLE.replace("tcp_proxy.v3.TcpProxy", "tcp_proxy.v3.TcpProxyz")
        message = self.error(text)
        self.assertTrue(message.startswith(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.@type: "
            "unknown network filter type 'type.googleapis.com/envoy.extensions.filters."
            "network.tcp_proxy.v3.TcpProxyz'; known: "), message)
        self.assertIn("type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3."
                      "TcpProxy, ", message)
        self.assertIn("HttpConnectionManager", message)
        self.assertTrue(message.endswith("(line 10)"), message)

    def test_unknown_filter_name(self) -> None:
        text = """\
static_resources:
  listeners:
  - name: a
    address: {socket_address: {address: 127.0.0.1, port_value: 9000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.echo
"""
        self.assertEqual(self.error(text), (
            "static_resources.listeners[0].filter_chains[0].filters[0].name: unknown network "
            "filter 'envoy.filters.network.echo'; known: "
            "envoy.filters.network.connection_limit, "
            "envoy.filters.network.http_connection_manager, envoy.filters.network.rbac, "
            "envoy.filters.network.set_filter_state, envoy.filters.network.tcp_proxy, "
            "istio.metadata_exchange, istio.stats (line 7)"
        ))

    def test_undefined_cluster_in_tcp_proxy(self) -> None:
        text = SIMPLE.replace("cluster: backend", "cluster: backnd")
        self.assertEqual(self.error(text), (
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.cluster: "
            "undefined cluster 'backnd'; defined clusters: backend (line 12)"
        ))

    def test_undefined_cluster_in_route(self) -> None:
        text = config_text("seed-terminate-h2-connect.yaml").replace(
            "cluster: backend", "cluster: nowhere"
        )
        self.assertEqual(self.error(text), (
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
            "route_config.virtual_hosts[0].routes[0].route.cluster: undefined cluster "
            f"'nowhere'; defined clusters: backend (line {line_of(text, 'nowhere')})"
        ))

    def test_undefined_internal_listener(self) -> None:
        text = config_text("seed-internal-listener-chain.yaml").replace(
            "server_listener_name: demo_internal_listener", "server_listener_name: demo"
        )
        self.assertEqual(self.error(text), (
            "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0]."
            "endpoint.address.envoy_internal_address.server_listener_name: no internal "
            "listener named 'demo'; internal listeners: demo_internal_listener "
            f"(line {line_of(text, 'server_listener_name: demo')})"
        ))

    def test_internal_address_of_kernel_listener(self) -> None:
        text = config_text("seed-internal-listener-chain.yaml").replace(
            "server_listener_name: demo_internal_listener", "server_listener_name: ingress"
        )
        self.assertIn("listener 'ingress' (static_resources.listeners[0]) is not an internal "
                      "listener", self.error(text))

    def test_internal_listener_needs_bootstrap_extension(self) -> None:
        text = config_text("seed-internal-listener-chain.yaml")
        text = text[text.index("static_resources:"):]
        message = self.error(text)
        self.assertTrue(message.startswith(
            "static_resources.listeners[1].internal_listener: internal listeners need the "
            "bootstrap extension: add to the top level `bootstrap_extensions: "
            "[{name: envoy.bootstrap.internal_listener"), message)
        self.assertTrue(message.endswith(f"(line {line_of(text, 'internal_listener: {}')})"))

    def test_internal_listener_buffer_size(self) -> None:
        text = config_text("seed-internal-listener-chain.yaml").replace(
            "v3.InternalListener", "v3.InternalListener\n    buffer_size_kb: 64"
        )
        bootstrap = self.load(text).bootstrap
        self.assertEqual(bootstrap.runtime.internal_listeners.buffer_size, 64 * 1024)

    def test_duplicate_listener_address(self) -> None:
        text = SIMPLE.replace("  clusters:", """\
  - name: b
    address:
      socket_address: {address: 127.0.0.1, port_value: 9000}
    filter_chains:
    - filters:
      - typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: b
          cluster: backend
  clusters:""")
        self.assertEqual(self.error(text), (
            "static_resources.listeners[1].address: address 127.0.0.1:9000 of listener 'b' is "
            "already used by static_resources.listeners[0] (listener 'a') (line 14)"
        ))

    def test_duplicate_names(self) -> None:
        text = SIMPLE.replace("  - name: backend\n", "  - name: backend\n    type: STATIC\n"
                              "  - name: backend\n")
        self.assertIn("static_resources.clusters[1].name: duplicate cluster name 'backend' "
                      "(also static_resources.clusters[0])", self.error(text))

    def test_missing_certificate_file(self) -> None:
        directory = self.in_pki_dir()
        (directory / "pki" / "client" / "cert.pem").unlink()
        message = self.error(config_text("hbone-client.yaml"))
        self.assertTrue(message.startswith(
            "static_resources.clusters[0].transport_socket.typed_config.common_tls_context."
            "tls_certificates[0].certificate_chain.filename: pki/client/cert.pem: no such file "
            "(line "), message)

    def test_expired_certificate(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
        root = directory / "pki"
        pki.init_ca(root)
        pki.issue(root, "server", spiffe="spiffe://cluster.local/ns/default/sa/server",
                  days=2, now=long_ago)
        message = self.error(config_text("hbone-server.yaml"), base_dir=directory)
        self.assertIn("tls_certificates[0].certificate_chain.filename: ", message)
        self.assertIn("pki/server/cert.pem: certificate expired on", message)

    def test_yaml_syntax_error(self) -> None:
        message = self.error("static_resources:\n  listeners: [\n  clusters: {\n")
        self.assertRegex(message, r"^<config>:\d+:\d+: ")
        path = Path(self.mktemp())
        path.write_text("static_resources:\n  listeners:\n   - name: a\n  - name: b\n")
        message = str(self.assertRaises(ConfigError, load_config, str(path), self.reactor))
        self.assertEqual(message, f"{path}:4:3: expected <block end>, but found '-' "
                                  "(while parsing a block mapping)")

    def test_duplicate_yaml_key(self) -> None:
        message = self.error("static_resources:\n  listeners: []\n  listeners: []\n")
        self.assertEqual(message, "<config>:3:3: found duplicate key 'listeners' "
                                  "(while constructing a mapping)")

    def test_router_must_be_last(self) -> None:
        text = config_text("seed-terminate-h2-connect.yaml").replace(
            "          http_filters:\n",
            "          http_filters:\n          - name: envoy.filters.http.router\n",
        )
        self.assertEqual(self.error(text), (
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
            "http_filters[0]: envoy.filters.http.router must be the last HTTP filter "
            f"(line {line_of(text, 'http_filters:') + 1})"
        ))

    def test_router_required(self) -> None:
        text = config_text("seed-terminate-h2-connect.yaml").replace(
            "          http_filters:\n          - name: envoy.filters.http.router\n"
            "            typed_config:\n              \"@type\": type.googleapis.com/envoy."
            "extensions.filters.http.router.v3.Router\n",
            "          http_filters: []\n",
        )
        self.assertIn("typed_config.http_filters: must not be empty", self.error(text))

    def test_filter_state_object_factories(self) -> None:
        def with_value(value: str) -> str:
            return config_text("seed-terminate-h2-connect.yaml").replace(
                "          http_filters:\n",
                "          http_filters:\n"
                "          - name: envoy.filters.http.set_filter_state\n"
                "            typed_config:\n"
                "              \"@type\": type.googleapis.com/envoy.extensions.filters.http."
                "set_filter_state.v3.Config\n"
                "              on_request_headers:\n"
                f"              - {value}\n",
            )

        where = ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
                 "http_filters[0].typed_config.on_request_headers[0]")
        # As in Envoy: a key without a factory of its own needs factory_key.
        message = self.error(with_value(
            '{object_key: my.key, format_string: {text_format: "%REQ(:AUTHORITY)%"}}'))
        self.assertTrue(message.startswith(
            f"{where}.object_key: 'my.key' does not have an object factory"), message)
        self.assertIn("set factory_key: envoy.string", message)
        message = self.error(with_value(
            '{object_key: my.key, factory_key: envoy.strung, format_string: {text_format: x}}'))
        self.assertTrue(message.startswith(
            f"{where}.factory_key: 'envoy.strung' does not have an object factory"), message)
        for value in ('{object_key: my.key, factory_key: envoy.string, '
                      'format_string: {text_format: x}}',
                      '{object_key: envoy.filters.listener.original_dst.local_ip, '
                      'format_string: {text_format: "%REQ(:AUTHORITY)%"}}'):
            self.load(with_value(value))

    def test_original_dst_metadata_key_and_port_override(self) -> None:
        odst = SIMPLE[:SIMPLE.index("    load_assignment:")] + (
            "    type: ORIGINAL_DST\n    original_dst_lb_config:\n")
        where = "static_resources.clusters[0].original_dst_lb_config"
        cluster = self.load(odst + "      upstream_port_override: 15008\n"
                            "      metadata_key: {key: ns, path: [{key: a}, {key: b}]}\n"
                            ).clusters["backend"].cluster
        self.assertEqual((cluster.original_dst_metadata_key, cluster.upstream_port_override),
                         (("ns", ("a", "b")), 15008))
        self.assertIn(f"{where}.upstream_port_override: must be a port (1-65535), got 70000",
                      self.error(odst + "      upstream_port_override: 70000\n"))
        self.assertIn(f"{where}.metadata_key: missing required field 'key'",
                      self.error(odst + "      metadata_key: {path: [{key: a}]}\n"))

    def test_request_timeouts(self) -> None:
        text = config_text("seed-terminate-h2-connect.yaml").replace(
            "          codec_type: AUTO\n",
            "          codec_type: AUTO\n          request_timeout: 30s\n"
            "          request_headers_timeout: 2.5s\n")
        [listener] = self.load(text).listeners
        options = listener.chains[0].filters[0].parsed.http_options
        self.assertEqual((options.request_timeout, options.request_headers_timeout),
                         (30.0, 2.5))
        [listener] = self.load(config_text("seed-terminate-h2-connect.yaml")).listeners
        options = listener.chains[0].filters[0].parsed.http_options
        self.assertEqual((options.request_timeout, options.request_headers_timeout),
                         (0.0, 10.0))

    def test_typed_per_filter_config(self) -> None:
        def with_entry(entry: str) -> str:
            return config_text("seed-terminate-h2-connect.yaml").replace(
                "            - name: local_service\n",
                "            - name: local_service\n"
                "              typed_per_filter_config:\n"
                f"                {entry}\n",
            )

        where = ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
                 "route_config.virtual_hosts[0].typed_per_filter_config.some.filter")
        # A type no HTTP filter takes per route (the router takes none).
        message = self.error(with_entry(
            'some.filter: {"@type": type.googleapis.com/envoy.extensions.filters.http.router'
            '.v3.Router}'))
        self.assertTrue(message.startswith(
            f"{where}: no HTTP filter takes per-route configuration of type "
            "'type.googleapis.com/envoy.extensions.filters.http.router.v3.Router'"), message)
        # FilterConfig: optional is ignored, disabled stands alone, neither is an error.
        filter_config = '{"@type": type.googleapis.com/envoy.config.route.v3.FilterConfig, '
        router = ('config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.'
                  'v3.Router}')
        self.assertIn(f"{where}.config: no HTTP filter takes per-route configuration",
                      self.error(with_entry(f"some.filter: {filter_config}{router}}}")))
        self.load(with_entry(f"some.filter: {filter_config}{router}, is_optional: true}}"))
        bootstrap = self.load(with_entry(f"some.filter: {filter_config}disabled: true}}"))
        [listener] = bootstrap.listeners
        router = listener.chains[0].filters[0].parsed.router
        [vhost] = router.virtual_hosts
        self.assertTrue(vhost.per_filter_config["some.filter"].disabled)
        # Merged into each route at load time; the chain then looks at routes.
        self.assertTrue(vhost.routes[0].per_filter_config["some.filter"].disabled)
        self.assertTrue(router.switches_filters)
        self.assertIn(f"{where}: a FilterConfig needs config or disabled: true",
                      self.error(with_entry(f"some.filter: {filter_config[:-2]}}}")))

    def test_unknown_substitution_operator(self) -> None:
        text = config_text("hbone-client.yaml").replace("%DOWNSTREAM_REMOTE_ADDRESS%",
                                                        "%DOWNSTREAM_REMOTE_ADRESS%")
        self.in_pki_dir()
        message = self.error(text)
        self.assertTrue(message.startswith(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
            "tunneling_config.headers_to_add[0].header.value: unknown substitution operator "
            "%DOWNSTREAM_REMOTE_ADRESS%; known: "), message)
        self.assertTrue(message.endswith(f"(line {line_of(text, 'ADRESS')})"), message)

    def test_original_dst_rejects_load_assignment(self) -> None:
        text = SIMPLE.replace("connect_timeout: 1s", "type: ORIGINAL_DST")
        self.assertIn("static_resources.clusters[0].load_assignment: ORIGINAL_DST clusters "
                      "take their destination", self.error(text))

    def test_unsupported_lb_policy(self) -> None:
        text = SIMPLE.replace("connect_timeout: 1s", "lb_policy: MAGLEV")
        self.assertEqual(self.error(text), (
            "static_resources.clusters[0].lb_policy: lb_policy 'MAGLEV' is not supported; "
            "accepted: ROUND_ROBIN, LEAST_REQUEST, RANDOM, CLUSTER_PROVIDED (line 15)"))

    def test_unknown_cluster_type(self) -> None:
        text = SIMPLE.replace("connect_timeout: 1s", "type: EDS")
        self.assertEqual(self.error(text), (
            "static_resources.clusters[0].type: unknown cluster type 'EDS'; known: "
            "LOGICAL_DNS, ORIGINAL_DST, STATIC, STRICT_DNS (line 15)"))

    def test_static_needs_ip(self) -> None:
        text = SIMPLE.replace("{address: 127.0.0.1, port_value: 8080}",
                              "{address: backend.local, port_value: 8080}")
        self.assertIn("malformed IP address 'backend.local' (a hostname needs a STRICT_DNS",
                      self.error(text))
        text = text.replace("connect_timeout: 1s", "type: STRICT_DNS")
        cluster = self.load(text).bootstrap.clusters["backend"]
        self.assertEqual(cluster.endpoints, (SocketAddress("backend.local", 8080),))

    def test_upstream_context_on_listener(self) -> None:
        self.in_pki_dir()
        text = config_text("hbone-server.yaml").replace(
            "tls.v3.DownstreamTlsContext", "tls.v3.UpstreamTlsContext"
        )
        message = self.error(text)
        self.assertIn("require_client_certificate: unknown field", message)

    def test_missing_static_resources(self) -> None:
        self.assertEqual(self.error("node: {id: x}\n"),
                         "missing required field 'static_resources' (line 1)")

    def test_unknown_top_level_field(self) -> None:
        message = self.error("static_resource: {}\n")
        self.assertTrue(message.startswith(
            "static_resource: unknown field 'static_resource'; accepted here: admin, "
            "bootstrap_extensions, layered_runtime, node, overload_manager, static_resources, "
            "and "), message)
        self.assertTrue(message.endswith(
            "more fields of envoy.config.bootstrap.v3.Bootstrap that hbonex does not implement "
            "(did you mean 'static_resources'?) (line 1)"), message)
        message = self.error(SIMPLE + "dynamic_resources: {lds_config: {}}\n")
        self.assertEqual(message, (
            "dynamic_resources: dynamic_resources (envoy.config.bootstrap.v3.Bootstrap) is known "
            "to Envoy but not implemented by hbonex: static configuration only (no xDS yet) "
            "(line 22)"))

    def test_camel_case_hint(self) -> None:
        text = SIMPLE.replace("stat_prefix: a", "stat_prefix: a\n          idleTimeout: 1s")
        self.assertIn("unknown field 'idleTimeout'", self.error(text))
        self.assertIn("(did you mean 'idle_timeout'?)", self.error(text))

    def test_access_log_flush_interval(self) -> None:
        text = SIMPLE.replace("stat_prefix: a", "stat_prefix: a\n          access_log_options: "
                              "{access_log_flush_interval: 2.5s, "
                              "flush_access_log_on_connected: true}")
        proxy = self.load(text).listeners[0].chains[0].filters[0].parsed
        self.assertEqual((proxy.access_log_flush_interval, proxy.flush_access_log_on_connected),
                         (2.5, True))
        deprecated = SIMPLE.replace("stat_prefix: a", "stat_prefix: a\n          "
                                    "access_log_flush_interval: 3s")
        proxy = self.load(deprecated).listeners[0].chains[0].filters[0].parsed
        self.assertEqual(proxy.access_log_flush_interval, 3.0)
        too_often = text.replace("2.5s", "0.0005s")
        self.assertIn("typed_config.access_log_options.access_log_flush_interval: must be at "
                      "least 1ms", self.error(too_often))

    def test_missing_config_file(self) -> None:
        self.assertEqual(str(self.assertRaises(ConfigError, load_config, "/nonexistent.yaml",
                                               self.reactor)),
                         "/nonexistent.yaml: no such file")


class FeatureTests(Base):
    """
    The parts of the supported subset the acceptance configs do not use.
    """

    def test_weighted_clusters_timeouts_and_tunneling_options(self) -> None:
        text = SIMPLE.replace("          cluster: backend\n", """\
          weighted_clusters:
            clusters:
            - {name: backend, weight: 3}
            - {name: other, weight: 1}
          idle_timeout: 0.25s
          max_connect_attempts: 3
          max_downstream_connection_duration: {seconds: 1, nanos: 500000000}
          tunneling_config:
            hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"
            use_post: true
            post_path: /tunnel
            headers_to_add:
            - header: {key: X-Peer, value: "%DOWNSTREAM_PEER_URI_SAN%"}
              append_action: OVERWRITE_IF_EXISTS_OR_ADD
""") + """\
  - name: other
    type: STRICT_DNS
    lb_policy: LEAST_REQUEST
    circuit_breakers:
      thresholds:
      - {max_connections: 10, max_pending_requests: 20, max_requests: 30}
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: localhost, port_value: 1}}}
"""
        loaded = self.load(text)
        proxy = loaded.listeners[0].chains[0].filters[0].parsed
        self.assertEqual([(c.name, c.weight) for c in proxy.clusters],
                         [("backend", 3), ("other", 1)])
        self.assertEqual(proxy.idle_timeout, 0.25)
        self.assertEqual(proxy.max_connect_attempts, 3)
        self.assertEqual(proxy.max_downstream_connection_duration, 1.5)
        tunnel = proxy.tunneling
        self.assertEqual((tunnel.use_post, tunnel.post_path), (True, "/tunnel"))
        self.assertEqual(tunnel.hostname.render({"local": "10.0.0.1:80"}), "10.0.0.1:80")
        [header] = tunnel.headers_to_add
        self.assertEqual((header.key, header.append), ("x-peer", False))
        other = loaded.bootstrap.clusters["other"]
        self.assertEqual((other.type, other.lb_policy), ("STRICT_DNS", "LEAST_REQUEST"))
        self.assertEqual(other.circuit_breakers.max_requests, 30)
        # Tunneling without protocol options: HTTP/1.1, as Envoy.
        self.assertEqual(other.upstream_protocol, "http1")
        self.assertEqual(loaded.bootstrap.clusters["backend"].upstream_protocol, "http1")

    def test_post_path_needs_use_post(self) -> None:
        text = SIMPLE.replace("          cluster: backend\n", """\
          cluster: backend
          tunneling_config: {hostname: x:1, post_path: /p}
""")
        self.assertIn("tunneling_config.post_path: post_path can only be set with use_post: "
                      "true", self.error(text))

    def test_original_dst_target_policy_and_header(self) -> None:
        text = SIMPLE.replace("""\
    connect_timeout: 1s
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: 127.0.0.1, port_value: 8080}
""", """\
    type: ORIGINAL_DST
    original_dst_lb_config: {use_http_header: true}
    metadata:
      filter_metadata:
        other: {anything: 1}
        hbonex:
          allowed_targets: ["127.0.0.0/8", "10.0.0.0/8:80-90"]
""")
        cluster = self.load(text).bootstrap.clusters["backend"]
        self.assertEqual(cluster.target_policy, TargetPolicy((
            TargetRule.parse("127.0.0.0/8"), TargetRule.parse("10.0.0.0/8:80-90"))))
        self.assertEqual(cluster.original_dst_header, "x-envoy-original-dst-host")
        self.assertEqual(cluster.lb_policy, "CLUSTER_PROVIDED")
        bad = text.replace("10.0.0.0/8:80-90", "10.0.0.0/8:90-80")
        self.assertIn("allowed_targets[1]: '10.0.0.0/8:90-80': port range", self.error(bad))
        static = SIMPLE.replace("connect_timeout: 1s", "metadata: {filter_metadata: {hbonex: "
                                "{allowed_targets: [127.0.0.1]}}}")
        self.assertIn("applies to ORIGINAL_DST clusters only", self.error(static))

    def test_route_matchers_and_direct_response(self) -> None:
        text = config_text("seed-terminate-h2-connect.yaml").replace("""\
              routes:
""", """\
              routes:
              - match:
                  path: /health
                direct_response: {status: 200, body: {inline_string: ok}}
              - match:
                  safe_regex: {regex: "/api/.*"}
                  headers:
                  - {name: x-a, string_match: {suffix: z}}
                  - {name: x-b, contains_match: mid, invert_match: true}
                  - {name: x-c, present_match: true}
                route: {cluster: backend, timeout: 2s, idle_timeout: 30s}
""")
        router = self.load(text).listeners[0].chains[0].filters[0].parsed.router
        health, api, _ = router.virtual_hosts[0].routes
        self.assertEqual((health.path, health.direct_status, health.direct_body),
                         ("/health", 200, b"ok"))
        self.assertEqual(api.safe_regex, "/api/.*")
        self.assertEqual([(h.name, h.suffix, h.contains, h.present, h.invert) for h in
                          api.headers], [("x-a", "z", None, None, False),
                                         ("x-b", None, "mid", None, True),
                                         ("x-c", None, None, True, False)])
        self.assertEqual((api.timeout, api.idle_timeout), (2.0, 30.0))
        bad = text.replace('"/api/.*"', '"/api/(.*"')
        self.assertIn("match.safe_regex.regex: invalid regex '/api/(.*'", self.error(bad))

    def test_domain_wildcards_validated(self) -> None:
        text = config_text("seed-terminate-h2-connect.yaml").replace('["*"]', '["a.*.com"]')
        self.assertIn("virtual_hosts[0].domains[0]: invalid domain 'a.*.com'", self.error(text))

    def test_filter_chain_match_transport_socket_and_listener_filters(self) -> None:
        directory = self.in_pki_dir()
        text = config_text("hbone-server.yaml").replace("""\
    filter_chains:
    - transport_socket:""", """\
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
    per_connection_buffer_limit_bytes: 32768
    filter_chains:
    - filter_chain_match: {server_names: [Example.COM], transport_protocol: tls}
      transport_socket_connect_timeout: 3s
      transport_socket:""")
        info = self.load(text).listeners[0]
        chain = info.chains[0].chain
        self.assertEqual(chain.match.server_names, ("example.com",))
        self.assertEqual(chain.match.transport_protocol, "tls")
        self.assertEqual(chain.handshake_timeout, 3.0)
        self.assertEqual(info.listener.per_connection_buffer_limit_bytes, 32768)
        self.assertTrue(directory.exists())

    def test_ipv6_listener(self) -> None:
        text = SIMPLE.replace("{address: 127.0.0.1, port_value: 9000}",
                              "{address: '::1', port_value: 9000}")
        info = self.load(text).listeners[0]
        self.assertEqual(info.listener.endpoint, "tcp6:9000:interface=\\:\\:1")
        self.assertEqual(info.address, "[::1]:9000")

    def test_http1_protocol_options_and_alpn_default(self) -> None:
        self.in_pki_dir()
        text = config_text("hbone-client.yaml").replace(
            "          http2_protocol_options:\n"
            "            initial_stream_window_size: 4194304\n"
            "            initial_connection_window_size: 16777216\n",
            "          http_protocol_options: {}\n",
        ).replace("          alpn_protocols: [h2]\n", "")
        cluster = self.load(text).bootstrap.clusters["hbone"]
        self.assertEqual(cluster.upstream_protocol, "http1")
        self.assertEqual(cluster.tls.alpn, (b"http/1.1",))

    def test_access_log_file(self) -> None:
        log = Path(self.mktemp()).resolve()
        text = SIMPLE.replace("          cluster: backend\n", f"""\
          cluster: backend
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                text_format_source:
                  inline_string: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %UPSTREAM_HOST% \\
                    %RESPONSE_CODE%\\n"
          - name: envoy.access_loggers.stdout
""")
        proxy = self.load(text).listeners[0].chains[0].filters[0].parsed
        file_sink, stdout_sink = proxy.access_log
        file_sink({"remote": "10.1.2.3:4567", "upstream_host": "127.0.0.1:8080",
                   "response_code": "200"})
        self.assertEqual(log.read_text(), "10.1.2.3 127.0.0.1:8080 200\n")
        out = io.StringIO()
        # The process's own stdout: under twistd, sys.stdout is its log (with prefixes).
        self.patch(sys, "__stdout__", out)
        stdout_sink({"remote": "1.1.1.1:1", "response_code": "503", "duration_ms": "5"})
        self.assertIn('"- - -" 503', out.getvalue())

    def test_access_log_unknown_logger(self) -> None:
        text = SIMPLE.replace("          cluster: backend\n", """\
          cluster: backend
          access_log:
          - name: envoy.access_loggers.syslog
""")
        self.assertIn("access_log[0].name: unknown access logger 'envoy.access_loggers.syslog'",
                      self.error(text))

    def test_admin_is_stored(self) -> None:
        text = SIMPLE + "admin:\n  address: {socket_address: {address: 127.0.0.1, " \
                        "port_value: 9901}}\nnode: {id: x}\n"
        bootstrap = self.load(text).bootstrap
        self.assertEqual(bootstrap.admin, {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": 9901}}})

    def test_hcm_common_options_and_keepalive(self) -> None:
        text = config_text("seed-terminate-h2-connect.yaml").replace("""\
          http2_protocol_options:
            allow_connect: true
""", """\
          http2_protocol_options:
            allow_connect: true
            max_concurrent_streams: 7
            connection_keepalive: {interval: 1s, timeout: 0.5s}
          common_http_protocol_options: {max_requests_per_connection: 9}
          stream_idle_timeout: 60s
""")
        hcm = self.load(text).listeners[0].chains[0].filters[0].parsed
        self.assertEqual(hcm.h2_settings.max_concurrent_streams, 7)
        self.assertEqual((hcm.h2_settings.keepalive_interval, hcm.h2_settings.keepalive_timeout),
                         (1.0, 0.5))
        self.assertEqual(hcm.max_requests_per_connection, 9)
        self.assertEqual(hcm.stream_idle_timeout, 60.0)
        bad = text.replace("max_concurrent_streams: 7", "max_concurrent_streams: 0")
        self.assertIn("http2_protocol_options.max_concurrent_streams: must be at least 1, got 0",
                      self.error(bad))


class NodeTests(unittest.TestCase):
    def node(self, text: str) -> Node:
        return Node(load_yaml(text), "root")

    def test_durations(self) -> None:
        node = self.node("a: 5s\nb: 0.25s\nc: 1.5s\nd: {seconds: 2, nanos: 1000000}\n"
                         "e: 5\nf: -1s\ng: 5ms\n")
        self.assertEqual(node.duration_field("a"), 5.0)
        self.assertEqual(node.duration_field("b"), 0.25)
        self.assertEqual(node.duration_field("c"), 1.5)
        self.assertEqual(node.duration_field("d"), 2.001)
        self.assertEqual(node.duration_field("missing", 7.0), 7.0)
        for key, shown in (("e", "5"), ("f", "'-1s'"), ("g", "'5ms'")):
            error = self.assertRaises(ConfigError, node.duration_field, key)
            self.assertEqual(error.path, f"root.{key}")
            self.assertIn(f"expected a duration like '5s', got {shown}", error.message)

    def test_oneof(self) -> None:
        node = self.node("a: 1\nb: 2\n")
        error = self.assertRaises(ConfigError, node.oneof, "a", "b")
        self.assertEqual(str(error), "root.b: only one of a, b may be set (line 2)")
        self.assertIsNone(self.node("c: 1\n").oneof("a", "b", required=False))

    def test_bool_and_list(self) -> None:
        node = self.node("a: yes\nb: 'true'\nc: [1, 2]\n")
        self.assertTrue(node.bool_field("a"))
        self.assertIn("expected true or false, got 'true'",
                      str(self.assertRaises(ConfigError, node.bool_field, "b")))
        self.assertEqual([n.path for n in node.list_field("c")], ["root.c[0]", "root.c[1]"])

    def test_quoted_keys_in_paths(self) -> None:
        node = self.node("opts:\n  envoy.x.Y: {a: 1}\n")
        [(key, child)] = list(node.map_field("opts").items())  # type: ignore[union-attr]
        self.assertEqual(child.path, 'root.opts["envoy.x.Y"]')


class PluginTests(unittest.TestCase):
    def test_builtins_are_plugins(self) -> None:
        expected = {
            INetworkFilterExtension: ["envoy.filters.network.connection_limit",
                                      "envoy.filters.network.http_connection_manager",
                                      "envoy.filters.network.rbac",
                                      "envoy.filters.network.set_filter_state",
                                      "envoy.filters.network.tcp_proxy",
                                      "istio.metadata_exchange", "istio.stats"],
            IHTTPFilterExtension: ["envoy.filters.http.cors", "envoy.filters.http.ext_authz",
                                   "envoy.filters.http.fault", "envoy.filters.http.grpc_stats",
                                   "envoy.filters.http.header_mutation",
                                   "envoy.filters.http.local_ratelimit", "envoy.filters.http.rbac",
                                   "envoy.filters.http.router",
                                   "envoy.filters.http.set_filter_state",
                                   "istio.peer_metadata", "istio.stats"],
            IClusterTypeExtension: ["LOGICAL_DNS", "ORIGINAL_DST", "STATIC", "STRICT_DNS"],
            ITransportSocketExtension: ["envoy.transport_sockets.internal_upstream",
                                        "envoy.transport_sockets.raw_buffer",
                                        "envoy.transport_sockets.tls"],
            IListenerFilterExtension: ["envoy.filters.listener.http_inspector",
                                       "envoy.filters.listener.original_dst",
                                       "envoy.filters.listener.tls_inspector"],
        }
        for interface, names in expected.items():
            plugins = extensions.extensions(interface)
            self.assertEqual(extensions.names(plugins), names)
            for plugin in plugins:
                self.assertTrue(IPlugin.providedBy(plugin))
                self.assertTrue(interface.providedBy(plugin))


class CheckCommandTests(Base):
    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_check_ok(self) -> None:
        path = str(CONFIGS / "seed-encapsulate-http-in-h2-connect.yaml")
        config_text("seed-encapsulate-http-in-h2-connect.yaml")
        code, out, err = self.run_cli("config", "check", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [
            f"{path}: OK (2 listener(s), 2 cluster(s))",
            "listeners:",
            "  http: 127.0.0.1:10000 (tcp:10000:interface=127.0.0.1)",
            "    filter chain 0: match any; TLS no",
            "      envoy.filters.network.http_connection_manager codec AUTO",
            "        http filters: envoy.filters.http.router",
            "        virtual host local_service [*]",
            "          prefix / -> cluster encap_cluster",
            "  encap: internal listener",
            "    filter chain 0: match any; TLS no",
            "      envoy.filters.network.tcp_proxy -> CONNECT host.com:443 via cluster cluster_0",
            "clusters:",
            "  encap_cluster: STATIC, endpoints envoy://encap/, lb ROUND_ROBIN, protocol TCP, "
            "connect_timeout 5s, TLS no",
            "  cluster_0: STATIC, endpoints 127.0.0.1:10001, lb ROUND_ROBIN, protocol HTTP/2 "
            "CONNECT, connect_timeout 5s, TLS no",
        ])

    def test_check_tls(self) -> None:
        self.in_pki_dir()
        code, out, _ = self.run_cli("config", "check", str(CONFIGS / "hbone-server.yaml"))
        self.assertEqual(code, 0)
        self.assertIn("TLS yes (min TLSv1_3; ALPN h2; client certificate required; peer: URI "
                      "prefix 'spiffe://cluster.local/')", out)
        self.assertIn("original_dst: ORIGINAL_DST, destination from header :authority", out)

    def test_check_error(self) -> None:
        path = Path(self.mktemp())
        path.write_text(SIMPLE.replace("cluster: backend", "cluster: nope"))
        code, out, err = self.run_cli("config", "check", str(path))
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(err, (
            f"hbonex: error: {path}: static_resources.listeners[0].filter_chains[0].filters[0]."
            "typed_config.cluster: undefined cluster 'nope'; defined clusters: backend "
            "(line 12)\n"))

    def test_check_binds_nothing(self) -> None:
        from twisted.internet import reactor

        before = set(reactor.getReaders())  # type: ignore[attr-defined]
        code, _, _ = self.run_cli("config", "check",
                                  str(CONFIGS / "seed-internal-listener-chain.yaml"))
        self.assertEqual(code, 0)
        self.assertEqual(set(reactor.getReaders()), before)  # type: ignore[attr-defined]


class RenderTests(Base):
    """
    ``hbonex config render`` output loads into a Bootstrap equivalent to the flags' own.
    """

    def render(self, side: str, *flags: str) -> str:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["config", "render", side, *flags]), 0)
        return out.getvalue()

    def options(self, module: Any, *flags: str) -> Any:
        options = module.Options()
        options.parseOptions(list(flags))
        return options

    def test_client_round_trip(self) -> None:
        from hbonex.cli import client_tap

        self.in_pki_dir()
        flags = ("--pki", "pki/client", "--forward", "127.0.0.1:9000=127.0.0.1:8080",
                 "--forward", "[::1]:9001=example.com:443", "--header", "x-team=blue",
                 "--server-identity", "spiffe://cluster.local/ns/default/sa/server",
                 "--max-streams", "50", "--tls-min", "1.2", "--idle-timeout", "60",
                 "--keepalive-interval", "2.5")
        text = self.render("client", *flags)
        self.assertTrue(text.startswith("# hbonex config render client --pki pki/client"))
        loaded = load_bootstrap(text, self.reactor)
        built = client_tap.build(self.options(client_tap, *flags), self.reactor)
        self.assertEqual([(x.name, x.endpoint, x.internal) for x in loaded.listeners],
                         [(x.name, x.endpoint, x.internal) for x in built.listeners])
        for mine, theirs in zip(loaded.listeners, built.listeners, strict=True):
            a = mine.filter_chains[0].filters[0]().config
            b = theirs.filter_chains[0].filters[0]().config
            self.assertEqual((a.stat_prefix, a.clusters, a.idle_timeout),
                             (b.stat_prefix, b.clusters, b.idle_timeout))
            self.assertEqual(a.tunneling.hostname.text, b.tunneling.hostname.text)
            self.assertEqual([(h.key, h.value.text, h.append) for h in a.tunneling.headers_to_add],
                             [(h.key, h.value.text, h.append) for h in b.tunneling.headers_to_add])
        self.assert_clusters_equivalent(loaded.clusters["hbone"], built.clusters["hbone"])

    def test_workers_become_the_runtime_key(self) -> None:
        self.in_pki_dir()
        flags = ("--pki", "pki/server", "--reject-early-connect-data", "--workers", "0")
        text = self.render("server", *flags)
        self.assertIn("hbonex.workers: 0", text)
        self.assertIn("envoy.reloadable_features.reject_early_connect_data: true", text)
        loaded = load_bootstrap(text, self.reactor)
        self.assertEqual(loaded.workers, 0)
        self.assertIsNone(load_bootstrap(self.render("server", "--pki", "pki/server"),
                                         self.reactor).workers)

    def test_client_http1_round_trip(self) -> None:
        from hbonex.cli import client_tap

        self.in_pki_dir()
        flags = ("--pki", "pki/client", "--http1", "--forward", "9000=127.0.0.1:8080")
        loaded = load_bootstrap(self.render("client", *flags), self.reactor)
        built = client_tap.build(self.options(client_tap, *flags), self.reactor)
        self.assert_clusters_equivalent(loaded.clusters["hbone"], built.clusters["hbone"])
        self.assertEqual(loaded.clusters["hbone"].upstream_protocol, "http1")

    def test_server_round_trip(self) -> None:
        from hbonex.cli import server_tap

        self.in_pki_dir()
        flags = ("--pki", "pki/server", "--listen", "127.0.0.1:15009",
                 "--allow-target", "10.0.0.0/8:80-90", "--allow-target", "127.0.0.1",
                 "--allow-identity", "spiffe://cluster.local/ns/*/sa/client",
                 "--max-concurrent-streams", "64", "--max-requests-per-connection", "10",
                 "--handshake-timeout", "4", "--connect-timeout", "1.5")
        loaded = load_bootstrap(self.render("server", *flags), self.reactor)
        built = server_tap.build(self.options(server_tap, *flags), self.reactor)
        [mine], [theirs] = loaded.listeners, built.listeners
        self.assertEqual((mine.name, mine.endpoint), (theirs.name, theirs.endpoint))
        a_chain, b_chain = mine.filter_chains[0], theirs.filter_chains[0]
        self.assertEqual(a_chain.handshake_timeout, b_chain.handshake_timeout)
        self.assert_tls_equivalent(a_chain.tls.settings, b_chain.tls.settings)
        a, b = a_chain.filters[0]().config, b_chain.filters[0]().config
        self.assertEqual((a.h2_settings, a.max_requests_per_connection, a.codec_type),
                         (b.h2_settings, b.max_requests_per_connection, b.codec_type))
        self.assert_clusters_equivalent(loaded.clusters["original_dst"],
                                        built.clusters["original_dst"])
        for authority in ("10.1.2.3:85", "127.0.0.1:22", "[::1]:8080"):
            x, y = a.router.route(connect(authority), None), b.router.route(connect(authority),
                                                                             None)
            self.assertEqual((x.status, x.cluster.name, x.original_destination, x.idle_timeout),
                             (y.status, y.cluster.name, y.original_destination, y.idle_timeout))

    def test_render_rejects_bad_flags(self) -> None:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(cli.main(["config", "render", "client", "--forward", "nonsense"]), 2)
        self.assertIn("expected LISTEN=TARGET", err.getvalue())
        self.assertEqual(cli.main(["config", "render", "server", "--config", "x.yaml"]), 2)
        self.assertIn("--config is YAML already", err.getvalue())
        self.assertEqual(cli.main(["config"]), 2)
        self.assertIn("a command is required", err.getvalue())

    def test_render_client_without_forward(self) -> None:
        """One line naming what is missing, no stray space, no --config hint (render has none)."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.in_pki_dir()
        self.assertEqual(cli.main(["config", "render", "client", "--pki", "pki/client"]), 2)
        self.assertEqual(err.getvalue(), "hbonex: error: hbone-client --pki pki/client: give "
                                         "at least one --forward LISTEN=TARGET\n")
        err.truncate(0)
        err.seek(0)
        self.assertEqual(cli.main(["config", "render", "client", "--server", "nowhere"]), 2)
        self.assertTrue(err.getvalue().startswith("hbonex: error: hbone-client --server "
                                                  "nowhere: "), err.getvalue())

    def test_render_server_allow_target_replaces_loopback(self) -> None:
        self.in_pki_dir()
        text = self.render("server", "--pki", "pki/server", "--allow-target", "127.0.0.1/32:8080")
        self.assertIn("# note: --allow-target replaces the loopback default: allowed_targets "
                      "holds exactly the targets given\n", text)
        cluster = yaml.safe_load(text)["static_resources"]["clusters"][0]
        self.assertEqual(cluster["metadata"]["filter_metadata"]["hbonex"]["allowed_targets"],
                         ["127.0.0.1/32:8080"])
        default = yaml.safe_load(self.render("server", "--pki", "pki/server"))
        self.assertEqual(default["static_resources"]["clusters"][0]["metadata"]
                         ["filter_metadata"]["hbonex"]["allowed_targets"],
                         ["127.0.0.0/8", "::1/128"])

    def test_render_keeps_the_admin_endpoint(self) -> None:
        from hbonex.bootstrap import admin_endpoint

        self.in_pki_dir()
        for flag, endpoint in (("127.0.0.1:15000", "tcp:15000:interface=127.0.0.1"),
                               ("tcp6:15001:interface=\\:\\:1", "tcp6:15001:interface=\\:\\:1")):
            data = yaml.safe_load(self.render("server", "--pki", "pki/server", "--admin", flag))
            self.assertEqual(admin_endpoint(data["admin"]), endpoint, flag)
        self.assertNotIn("admin", yaml.safe_load(self.render("server", "--pki", "pki/server")))

    def assert_clusters_equivalent(self, a: Any, b: Any) -> None:
        if a.type != "ORIGINAL_DST":  # which picks no host: CLUSTER_PROVIDED in the YAML
            self.assertEqual(a.lb_policy, b.lb_policy)
        for attr in ("name", "type", "endpoints", "connect_timeout",
                     "upstream_protocol", "max_streams_per_connection", "pool_idle_timeout",
                     "target_policy", "circuit_breakers"):
            self.assertEqual(getattr(a, attr), getattr(b, attr), attr)
        if a.upstream_protocol == "http2":
            for attr in ("initial_stream_window_size", "initial_connection_window_size",
                         "keepalive_interval", "keepalive_timeout", "max_frame_size"):
                self.assertEqual(getattr(a.h2_settings, attr), getattr(b.h2_settings, attr))
        if a.type == "ORIGINAL_DST":
            self.assertEqual(a.original_dst_header, ":authority")
        self.assertEqual(a.tls is None, b.tls is None)
        if a.tls is not None:
            self.assert_tls_equivalent(a.tls, b.tls)

    def assert_tls_equivalent(self, a: Any, b: Any) -> None:
        for attr in ("certificate", "ca_certificates", "chain", "min_version", "alpn", "sni",
                     "require_peer_certificate"):
            self.assertEqual(getattr(a, attr), getattr(b, attr), attr)
        # Same peers accepted and refused (SAN matchers vs SPIFFE patterns).
        other = Path(self.mktemp())
        pki.init_ca(other, trust_domain="example.org")
        peers = [pki.load_pki_dir(f"pki/{n}").certificate for n in ("client", "server")]
        pki.issue(other, "x", spiffe="spiffe://example.org/ns/default/sa/client")
        peers.append(pki.load_pki_dir(other / "x").certificate)
        for peer in peers:
            self.assertEqual(a.peer_policy.check(peer) is None, b.peer_policy.check(peer) is None)


class TwistdOptionsTests(Base):
    def test_config_loaded_while_parsing_options(self) -> None:
        from hbonex.cli import client_tap

        options = client_tap.Options()
        options.parseOptions(["--config", str(CONFIGS / "seed-internal-listener-chain.yaml")])
        self.assertEqual([x.name for x in options.bootstrap.listeners],
                         ["ingress", "demo_internal_listener"])
        self.assertIs(options.config_bootstrap(self.reactor), options.bootstrap)

    def test_config_error_is_one_clean_exit(self) -> None:
        from hbonex.cli import server_tap

        path = Path(self.mktemp())
        path.write_text(SIMPLE.replace("stat_prefix: a", "stat_prefx: a"))
        options = server_tap.Options()
        error = self.assertRaises(SystemExit, options.parseOptions, ["--config", str(path)])
        self.assertTrue(str(error.code).startswith(
            f"twistd: error: --config {path}: static_resources.listeners[0].filter_chains[0]."
            "filters[0].typed_config.stat_prefx: unknown field 'stat_prefx'; accepted here: "
            "access_log, access_log_flush_interval, access_log_options, cluster, "
            "flush_access_log_on_connected, idle_timeout, max_connect_attempts, "))
        self.assertTrue(str(error.code).endswith(
            "(did you mean 'stat_prefix'?) (line 11)"), error.code)


class RoutingTests(unittest.TestCase):
    def test_cluster_original_dst_header(self) -> None:
        from hbonex.http.routing import Route, VirtualHost

        class FakeCluster:
            name = "c"
            original_dst_header = "x-dest"

        route = Route(connect_matcher=True, cluster=FakeCluster(), connect_enabled=True)
        config = RouteConfig("r", (VirtualHost("v", ("*",), (route,)),))
        request = ConnectRequest("CONNECT", "a:1", (("x-dest", "10.0.0.1:80"),))
        self.assertEqual(config.route(request, None).original_destination, "10.0.0.1:80")
        yaml.safe_dump({})  # the YAML module is what load_yaml builds on
