"""
The original_dst listener filter and the internal_upstream transport socket: where the
restored address comes from (metadata, then filter state; SO_ORIGINAL_DST on kernel
sockets), what passes through an internal hop, and the configuration errors.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest

from hbonex.config.support import check
from hbonex.filters.listener.original_dst import (
    LOCAL_FILTER_STATE_KEY,
    METADATA_NAMESPACE,
    REMOTE_FILTER_STATE_KEY,
    OriginalDstFilter,
    ip_port,
    kernel_socket,
    original_destination,
)
from hbonex.http.stream_info import SharedWithUpstream
from hbonex.network.listener import ConnectionInfo
from hbonex.upstream.cluster import InternalAddress, UpstreamRequest
from tests.test_config import Base

INTERNAL_LISTENER = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
"""
INTERNAL_UPSTREAM_TYPE = ("type.googleapis.com/envoy.extensions.transport_sockets."
                          "internal_upstream.v3.InternalUpstreamTransport")
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
CONFIG = INTERNAL_LISTENER + """\
static_resources:
  listeners:
  - name: inner
    internal_listener: {}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inner
          cluster: passthrough
  clusters:
  - name: to_inner
    metadata:
      filter_metadata:
        tenant: {name: blue}
    load_assignment:
      cluster_name: to_inner
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {server_listener_name: inner, endpoint_id: one}
          metadata:
            filter_metadata:
              envoy.filters.listener.original_dst: {local: "10.1.2.3:8080"}
              istio: {workload: w}
    transport_socket:
      name: envoy.transport_sockets.internal_upstream
      typed_config:
        "@type": """ + INTERNAL_UPSTREAM_TYPE + """
        passthrough_metadata:
        - kind: {host: {}}
          name: envoy.filters.listener.original_dst
        - kind: {cluster: {}}
          name: tenant
        - kind: {host: {}}
          name: absent
        transport_socket:
          name: envoy.transport_sockets.raw_buffer
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
"""


class Callbacks:
    """A listener filter's view of one connection."""

    def __init__(self, info: ConnectionInfo, transport: Any = None) -> None:
        self.info = info
        self.transport = transport


def internal_info(**metadata: Any) -> ConnectionInfo:
    return ConnectionInfo("inner", "envoy://internal_client_address/", "envoy://inner/",
                          dynamic_metadata=metadata)


class AddressTests(unittest.TestCase):
    def test_ip_port(self) -> None:
        self.assertEqual(ip_port("10.0.0.1:80"), "10.0.0.1:80")
        self.assertEqual(ip_port("[::1]:443"), "[::1]:443")
        self.assertEqual(ip_port("[0:0::1]:0443"), "[::1]:443")
        for bad in ("host.example:80", "10.0.0.1", "10.0.0.1:x", "10.0.0.1:70000", "::1:80",
                    "", None, 8080):
            self.assertIsNone(ip_port(bad), bad)


class InternalTests(unittest.TestCase):
    def test_metadata_restores_the_local_address(self) -> None:
        info = internal_info(**{METADATA_NAMESPACE: {"local": "10.0.0.7:9080"}})
        info.filter_state.set_data(LOCAL_FILTER_STATE_KEY, "10.9.9.9:1", SharedWithUpstream.NONE)
        OriginalDstFilter().onAccept(Callbacks(info))
        # Metadata first, as Envoy: the filter state is not read.
        self.assertEqual((info.localAddress, info.localAddressRestored), ("10.0.0.7:9080", True))
        self.assertEqual(info.substitutions()["local"], "10.0.0.7:9080")

    def test_filter_state_when_there_is_no_metadata(self) -> None:
        info = internal_info()
        info.filter_state.set_data(LOCAL_FILTER_STATE_KEY, "[fd00::1]:15008",
                                   SharedWithUpstream.NONE)
        info.filter_state.set_data(REMOTE_FILTER_STATE_KEY, "10.0.0.2:5555",
                                   SharedWithUpstream.NONE)
        OriginalDstFilter().onAccept(Callbacks(info))
        self.assertEqual((info.localAddress, info.localAddressRestored),
                         ("[fd00::1]:15008", True))
        self.assertEqual(info.remoteAddress, "10.0.0.2:5555")

    def test_unparsable_metadata_does_not_fall_back(self) -> None:
        info = internal_info(**{METADATA_NAMESPACE: {"local": "svc.example:80"}})
        info.filter_state.set_data(LOCAL_FILTER_STATE_KEY, "10.9.9.9:1", SharedWithUpstream.NONE)
        OriginalDstFilter().onAccept(Callbacks(info))
        self.assertEqual((info.localAddress, info.localAddressRestored),
                         ("envoy://inner/", False))

    def test_nothing_to_restore(self) -> None:
        info = internal_info(other={"local": "10.0.0.7:9080"})
        info.filter_state.set_data(LOCAL_FILTER_STATE_KEY, "not an address",
                                   SharedWithUpstream.NONE)
        OriginalDstFilter().onAccept(Callbacks(info))
        self.assertEqual((info.localAddress, info.localAddressRestored),
                         ("envoy://inner/", False))


class Capture(protocol.Protocol):
    def __init__(self, made: defer.Deferred[Any]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self.transport)


class KernelTests(unittest.TestCase):
    async def test_accepted_socket_without_redirect(self) -> None:
        """
        A real accepted socket on 127.0.0.1, not redirected: SO_ORIGINAL_DST (where netfilter
        tracks the connection) or the fallback gives the address it was accepted on, and the
        local address counts as restored.
        """
        made: defer.Deferred[Any] = defer.Deferred()
        factory = protocol.Factory.forProtocol(lambda: Capture(made))
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            factory)
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        client = socket.create_connection(("127.0.0.1", number))
        self.addCleanup(client.close)
        transport = await made
        self.addCleanup(transport.loseConnection)
        sock = kernel_socket(transport)
        assert sock is not None
        self.assertIn(original_destination(sock), (None, ("127.0.0.1", number)))
        info = ConnectionInfo("l", "127.0.0.1:1", "0.0.0.0:0")
        OriginalDstFilter().onAccept(Callbacks(info, transport))
        self.assertTrue(info.localAddressRestored)
        if original_destination(sock) is not None:
            self.assertEqual(info.localAddress, f"127.0.0.1:{number}")
        else:
            self.assertEqual(info.localAddress, "0.0.0.0:0")

    def test_no_socket_under_the_transport(self) -> None:
        self.assertIsNone(kernel_socket(object()))


class PassthroughTests(Base):
    def test_host_and_cluster_metadata_reach_the_internal_connection(self) -> None:
        """
        Connecting through to_inner: the inner connection starts with the host's
        original_dst namespace and the cluster's tenant namespace (not istio, which was not
        named); the listener filter restores 10.1.2.3:8080 and tcp_proxy's ORIGINAL_DST
        connects there.  The missing namespace is counted.
        """
        loaded = self.load(CONFIG)
        cluster = loaded.bootstrap.clusters["to_inner"]
        self.assertEqual(cluster.passthrough_metadata, (
            ("host", METADATA_NAMESPACE), ("cluster", "tenant"), ("host", "absent")))
        self.assertEqual(cluster.endpoints, (InternalAddress("inner", "one"),))
        registry = cluster.runtime.internal_listeners
        registry.register("inner", loaded.listeners[0].listener)
        client = protocol.Protocol()
        d = cluster.connect_stream(client, UpstreamRequest())
        self.assertIsNotNone(self.successResultOf(d))
        server = client.transport.other.protocol  # type: ignore[union-attr, attr-defined]
        self.assertEqual(server.info.dynamic_metadata, {
            METADATA_NAMESPACE: {"local": "10.1.2.3:8080"}, "tenant": {"name": "blue"}})
        self.assertEqual((server.info.localAddress, server.info.localAddressRestored),
                         ("10.1.2.3:8080", True))
        self.assertEqual(cluster.stats.internal_upstream_no_metadata, 1)
        host, port = self.reactor.tcpClients[-1][:2]
        self.assertEqual((host, port), ("10.1.2.3", 8080))


class ConfigErrorTests(Base):
    def test_unsupported_metadata_kind(self) -> None:
        text = CONFIG.replace("- kind: {cluster: {}}", "- kind: {request: {}}")
        self.assertIn(
            "transport_socket.typed_config.passthrough_metadata[1].kind.request: request "
            "(envoy.type.metadata.v3.MetadataKind) is known to Envoy but not implemented by "
            "hbonex: internal_upstream passes host or cluster metadata: use host: {} or "
            "cluster: {}", self.error(text))

    def test_missing_name(self) -> None:
        text = CONFIG.replace("          name: tenant\n", "")
        error = self.error(text)
        self.assertIn("passthrough_metadata[1]: missing required field 'name'", error)
        self.assertIn("e.g. envoy.filters.listener.original_dst", error)

    def test_missing_inner_transport_socket(self) -> None:
        start = CONFIG.index("        transport_socket:\n          name: envoy.transport_sockets"
                             ".raw_buffer")
        end = CONFIG.index("  - name: passthrough")
        error = self.error(CONFIG[:start] + CONFIG[end:])
        self.assertIn("clusters[0].transport_socket.typed_config: missing required field "
                      "'transport_socket'", error)
        self.assertIn("envoy.transport_sockets.raw_buffer", error)

    def test_on_a_listener(self) -> None:
        text = CONFIG.replace("""\
    filter_chains:
    - filters:""", """\
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.internal_upstream
        typed_config:
          "@type": """ + INTERNAL_UPSTREAM_TYPE + """
          transport_socket: {name: envoy.transport_sockets.raw_buffer}
      filters:""")
        self.assertIn("listeners[0].filter_chains[0].transport_socket.typed_config.@type: "
                      "envoy.transport_sockets.internal_upstream is an upstream transport "
                      "socket: it belongs on a cluster, not a listener", self.error(text))

    def test_tls_inside(self) -> None:
        self.in_pki_dir()
        text = CONFIG.replace("""\
          name: envoy.transport_sockets.raw_buffer
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer
""", """\
          name: envoy.transport_sockets.tls
          typed_config:
            "@type": """ + TLS_TYPE + """
            common_tls_context:
              tls_certificates:
              - certificate_chain: {filename: pki/client/cert.pem}
                private_key: {filename: pki/client/key.pem}
              validation_context:
                trusted_ca: {filename: pki/ca.pem}
""")
        self.assertIn("clusters[0].transport_socket.typed_config.transport_socket: internal "
                      "connections carry no TLS in hbonex: wrap "
                      "envoy.transport_sockets.raw_buffer", self.error(text))

    def test_unknown_listener_filter(self) -> None:
        text = CONFIG.replace("    - name: envoy.filters.listener.original_dst\n      "
                              "typed_config:\n        \"@type\": type.googleapis.com/envoy."
                              "extensions.filters.listener.original_dst.v3.OriginalDst\n",
                              "    - name: envoy.filters.listener.proxy_protocol\n")
        error = self.error(text)
        self.assertIn("listeners[0].listener_filters[0].name: unknown listener filter "
                      "'envoy.filters.listener.proxy_protocol'; known: "
                      "envoy.filters.listener.http_inspector, "
                      "envoy.filters.listener.original_dst, "
                      "envoy.filters.listener.tls_inspector", error)

    def test_use_original_dst_points_at_the_listener_filter(self) -> None:
        text = CONFIG.replace("    internal_listener: {}\n",
                              "    internal_listener: {}\n    use_original_dst: true\n")
        self.assertIn("use the envoy.filters.listener.original_dst listener filter",
                      self.error(text))

    def test_use_original_dst_false_is_the_default(self) -> None:
        """istiod writes use_original_dst: false on connect_originate: Envoy's default."""
        text = CONFIG.replace("    internal_listener: {}\n",
                              "    internal_listener: {}\n    use_original_dst: false\n")
        self.assertIn("use_original_dst: false", text)
        self.load(text)

    def test_endpoint_metadata_is_implemented(self) -> None:
        warnings: list[str] = []

        class Context:
            def warn(self, path: str, text: str) -> None:
                warnings.append(path)

            def error(self, path: str, text: str, key: Any = None) -> Exception:
                return AssertionError(f"{path}: {text}")

        from envoy.config.endpoint.v3.endpoint_components_pb2 import LbEndpoint

        lb = LbEndpoint()
        lb.metadata.filter_metadata["a"].update({"local": "1.2.3.4:5"})
        check(lb, "x", Context())
        self.assertEqual(warnings, [])
