"""
Istio's extensions, driven in memory: istio.peer_metadata (baggage into filter state),
istio.stats (Istio's request and TCP metrics with its labels), envoy.filters.http.grpc_stats
(Envoy's gRPC counts), istio.metadata_exchange (passes everything).
"""

from __future__ import annotations

import textwrap
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hbonex.filters.common.peer_metadata import DOWNSTREAM_PEER, UPSTREAM_PEER, PeerMetadata
from hbonex.filters.http.grpc_stats import NAME as GRPC_STATS_KEY
from hbonex.filters.http.grpc_stats import _Frames
from hbonex.http.headers import Headers
from hbonex.http.stream_info import SharedWithUpstream
from hbonex.network.listener import ConnectionInfo
from hbonex.observability import istio_metrics
from hbonex.observability.stats import STATS
from tests.http_filter_support import hcm_yaml, load_hcm, run

BAGGAGE = (b"k8s.namespace.name=shop,k8s.deployment.name=curl,service.name=curl-svc,"
           b"service.version=v1,app.name=curl-app,app.version=v2,k8s.cluster.name=west")


def peer_metadata(value: str, name: str = "istio.peer_metadata") -> str:
    return f"""\
- name: {name}
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/io.istio.http.peer_metadata.Config
    value:
{textwrap.indent(value, " " * 6)}
"""


def stats(value: str = "reporter: SERVER_GATEWAY") -> str:
    return f"""\
- name: istio.stats
  typed_config:
    "@type": type.googleapis.com/xds.type.v3.TypedStruct
    type_url: type.googleapis.com/stats.PluginConfig
    value:
{textwrap.indent(value, " " * 6)}
"""


def request(*extra: tuple[bytes, bytes], authority: bytes = b"reviews.shop.svc.cluster.local"
            ) -> Headers:
    return Headers([(b":method", b"GET"), (b":path", b"/"), (b":authority", authority),
                    (b":scheme", b"http"), *extra])


class PeerMetadataObjectTests(unittest.TestCase):
    def test_from_baggage(self) -> None:
        peer = PeerMetadata.from_baggage(BAGGAGE.decode())
        self.assertEqual(peer, PeerMetadata(
            namespace="shop", cluster="west", workload="curl", workload_type="deployment",
            canonical_service="curl-svc", canonical_revision="v1", app="curl-app",
            version="v2"))

    def test_properties_spaces_and_percent_encoding(self) -> None:
        peer = PeerMetadata.from_baggage(
            " k8s.namespace.name = a%2Cb ;prop=1, k8s.pod.name=p-1,junk,=x")
        assert peer is not None
        self.assertEqual((peer.namespace, peer.workload, peer.workload_type, peer.instance),
                         ("a,b", "p-1", "pod", "p-1"))

    def test_no_workload_keys(self) -> None:
        self.assertIsNone(PeerMetadata.from_baggage("userid=42,sessionid=x"))
        self.assertIsNone(PeerMetadata.from_baggage(""))

    def test_baggage_round_trip(self) -> None:
        peer = PeerMetadata.from_baggage(BAGGAGE.decode())
        assert peer is not None
        self.assertEqual(PeerMetadata.from_baggage(peer.baggage()), peer)
        self.assertIn("k8s.deployment.name=curl", str(peer))


class PeerMetadataFilterTests(unittest.TestCase):
    def test_downstream_baggage_into_filter_state(self) -> None:
        config = load_hcm(hcm_yaml(peer_metadata(
            "downstream_discovery:\n- baggage: {}\nshared_with_upstream: true")))
        _, response, _, manager = run(config, request((b"baggage", BAGGAGE)))
        self.assertEqual(response.get(b":status"), b"200")
        state = manager.stream_info.filter_state
        peer = state.get_data(DOWNSTREAM_PEER)
        self.assertEqual((peer.namespace, peer.workload), ("shop", "curl"))
        # shared_with_upstream: the internal listener behind gets it.
        shared = state.shared_with_upstream()
        assert shared is not None
        self.assertEqual(shared.get_data(DOWNSTREAM_PEER), peer)

    def test_not_shared_by_default(self) -> None:
        config = load_hcm(hcm_yaml(peer_metadata("downstream_discovery:\n- baggage: {}")))
        _, _, _, manager = run(config, request((b"baggage", BAGGAGE)))
        state = manager.stream_info.filter_state
        self.assertTrue(state.has_data(DOWNSTREAM_PEER))
        self.assertEqual(state._entries[DOWNSTREAM_PEER].shared, SharedWithUpstream.NONE)

    def test_workload_discovery_finds_nothing_then_baggage(self) -> None:
        config = load_hcm(hcm_yaml(peer_metadata(
            "downstream_discovery:\n- workload_discovery: {}\n- baggage: {}")))
        _, _, _, manager = run(config, request((b"baggage", BAGGAGE)))
        self.assertEqual(manager.stream_info.filter_state.get_data(DOWNSTREAM_PEER).namespace,
                         "shop")
        config = load_hcm(hcm_yaml(peer_metadata(
            "downstream_discovery:\n- workload_discovery: {}")))
        _, _, _, manager = run(config, request((b"baggage", BAGGAGE)))
        self.assertFalse(manager.stream_info.filter_state.has_data(DOWNSTREAM_PEER))

    def test_istio_headers_are_removed(self) -> None:
        config = load_hcm(hcm_yaml(peer_metadata("downstream_discovery:\n- istio_headers: {}")))
        upstream, _, _, _ = run(config, request((b"x-envoy-peer-metadata", b"abc"),
                                                (b"x-envoy-peer-metadata-id", b"id"),
                                                (b"x-other", b"1")))
        assert upstream.request is not None
        self.assertIsNone(upstream.request.get(b"x-envoy-peer-metadata"))
        self.assertIsNone(upstream.request.get(b"x-envoy-peer-metadata-id"))
        self.assertEqual(upstream.request.get(b"x-other"), b"1")

    def test_upstream_baggage_from_the_response(self) -> None:
        config = load_hcm(hcm_yaml(peer_metadata("upstream_discovery:\n- baggage: {}")))
        response = Headers([(b":status", b"200"),
                            (b"baggage", b"k8s.namespace.name=back,k8s.deployment.name=db")])
        _, _, _, manager = run(config, request(), response)
        peer = manager.stream_info.filter_state.get_data(UPSTREAM_PEER)
        self.assertEqual((peer.namespace, peer.workload), ("back", "db"))
        self.assertFalse(manager.stream_info.filter_state.has_data(DOWNSTREAM_PEER))


def _samples(family: Any, **match: str) -> dict[tuple[str, ...], Any]:
    """The family's series whose labels include ``match``."""
    return {labels: value for labels, value in family.values.items()
            if all(dict(zip(family.labels, labels, strict=True)).get(k) == v
                   for k, v in match.items())}


def _labels(family: Any, labels: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(family.labels, labels, strict=True))


class IstioStatsTests(unittest.TestCase):
    def report(self, filters: str, *extra: tuple[bytes, bytes], namespace: str,
               authority: bytes = b"reviews.shop.svc.cluster.local") -> Any:
        config = load_hcm(hcm_yaml(filters))
        _, _, _, manager = run(config, request(
            (b"baggage", BAGGAGE.replace(b"=shop", b"=" + namespace.encode())), *extra,
            authority=authority))
        report = manager.stream_info.istio_stats
        self.assertIsNotNone(report)
        report(manager, manager.connection_info, 200, "-", "http", 3.0, 11, 22)
        return manager

    def test_waypoint_labels_from_peer_metadata(self) -> None:
        self.report(peer_metadata("downstream_discovery:\n- baggage: {}") + stats(),
                    namespace="ns-labels")
        [(labels, value)] = _samples(istio_metrics.REQUESTS,
                                     source_workload_namespace="ns-labels").items()
        self.assertEqual(value, 1)
        got = _labels(istio_metrics.REQUESTS, labels)
        self.assertEqual({k: got[k] for k in (
            "reporter", "source_workload", "source_canonical_service",
            "source_canonical_revision", "source_app", "source_version", "source_cluster",
            "source_principal", "destination_principal", "destination_workload",
            "destination_service", "destination_service_name",
            "destination_service_namespace", "response_code", "request_protocol",
            "connection_security_policy")}, {
            "reporter": "waypoint", "source_workload": "curl",
            "source_canonical_service": "curl-svc", "source_canonical_revision": "v1",
            "source_app": "curl-app", "source_version": "v2", "source_cluster": "west",
            "source_principal": "spiffe://cluster.local/ns/a/sa/client",
            "destination_principal": "unknown", "destination_workload": "unknown",
            "destination_service": "reviews.shop.svc.cluster.local",
            "destination_service_name": "reviews", "destination_service_namespace": "shop",
            "response_code": "200", "request_protocol": "http",
            "connection_security_policy": "mutual_tls"})
        [(_, histogram)] = _samples(istio_metrics.RESPONSE_BYTES,
                                    source_workload_namespace="ns-labels").items()
        self.assertEqual(histogram[-1], 22)

    def test_peer_principal_filter_state_and_no_host_fallback(self) -> None:
        filters = (peer_metadata("downstream_discovery:\n- baggage: {}") + """\
- name: principal
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config
    on_request_headers:
    - object_key: io.istio.peer_principal
      factory_key: envoy.string
      format_string: {text_format_source: {inline_string: "spiffe://td/ns/x/sa/ztunnel-peer"}}
""" + stats("reporter: UNSPECIFIED\ndisable_host_header_fallback: true"))
        self.report(filters, namespace="ns-principal")
        [labels] = _samples(istio_metrics.REQUESTS, source_workload_namespace="ns-principal")
        got = _labels(istio_metrics.REQUESTS, labels)
        self.assertEqual(got["source_principal"], "spiffe://td/ns/x/sa/ztunnel-peer")
        self.assertEqual(got["reporter"], "destination")
        self.assertEqual(got["destination_service"], "unknown")

    def test_tags_to_remove_and_drop(self) -> None:
        self.report(peer_metadata("downstream_discovery:\n- baggage: {}") + stats("""\
reporter: SERVER_GATEWAY
metrics:
- name: requests_total
  tags_to_remove: [source_cluster, source_app]
- name: request_bytes
  drop: true"""), namespace="ns-tags")
        [labels] = _samples(istio_metrics.REQUESTS, source_workload_namespace="ns-tags")
        got = _labels(istio_metrics.REQUESTS, labels)
        self.assertEqual((got["source_cluster"], got["source_app"], got["source_version"]),
                         ("", "", "v2"))
        [labels] = _samples(istio_metrics.RESPONSE_BYTES, source_workload_namespace="ns-tags")
        self.assertEqual(_labels(istio_metrics.RESPONSE_BYTES, labels)["source_cluster"],
                         "west")
        self.assertEqual(_samples(istio_metrics.REQUEST_BYTES,
                                  source_workload_namespace="ns-tags"), {})

    def test_without_peer_metadata_peers_are_unknown(self) -> None:
        config = load_hcm(hcm_yaml(stats()))
        info = ConnectionInfo("http", "10.0.0.1:5555", "10.0.0.2:80",
                              peerIdentity="spiffe://cluster.local/ns/a/sa/no-peer-md")
        _, _, _, manager = run(config, request(authority=b"plain:8080"), info=info)
        manager.stream_info.istio_stats(manager, info, 503, "UF", "http", 1.0, 0, 0)
        [labels] = _samples(istio_metrics.REQUESTS,
                            source_principal="spiffe://cluster.local/ns/a/sa/no-peer-md")
        got = _labels(istio_metrics.REQUESTS, labels)
        self.assertEqual((got["source_workload"], got["destination_service"],
                          got["response_flags"], got["response_code"]),
                         ("unknown", "plain", "UF", "503"))


class IstioStatsNetworkTests(unittest.TestCase):
    def test_tcp_metrics_with_reporter(self) -> None:
        from hbonex.filters.common.istio_stats_config import StatsConfig
        from hbonex.filters.network.istio_stats import IstioStatsNetworkFilter

        info = ConnectionInfo("tcp", "10.0.0.1:5555", "10.0.0.2:80",
                              peerIdentity="spiffe://cluster.local/ns/a/sa/tcp-stats")

        class Callbacks:
            pass

        callbacks: Any = Callbacks()
        callbacks.info = info
        callbacks.transport = StringTransport()
        f = IstioStatsNetworkFilter(StatsConfig(reporter="waypoint"))
        self.assertTrue(f.onNewConnection(callbacks))
        self.assertTrue(f.onData(b"hello", False))
        callbacks.transport.write(b"hi back!")
        callbacks.transport.writeSequence([b"a", b"bc"])
        self.assertEqual(callbacks.transport.value(), b"hi back!abc")
        f.onClose(None)
        match = {"source_principal": "spiffe://cluster.local/ns/a/sa/tcp-stats",
                 "reporter": "waypoint"}
        self.assertEqual(list(_samples(istio_metrics.TCP_OPENED, **match).values()), [1])
        self.assertEqual(list(_samples(istio_metrics.TCP_CLOSED, **match).values()), [1])
        self.assertEqual(list(_samples(istio_metrics.TCP_RECEIVED, **match).values()), [5])
        self.assertEqual(list(_samples(istio_metrics.TCP_SENT, **match).values()), [11])


GRPC_STATS = """\
- name: envoy.filters.http.grpc_stats
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
"""


def frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class GrpcStatsTests(unittest.TestCase):
    def grpc(self, config_extra: str, path: bytes, status: bytes,
             cluster: str = "backend") -> Any:
        config = load_hcm(hcm_yaml(GRPC_STATS + textwrap.indent(config_extra, "    ")))
        response = Headers([(b":status", b"200"), (b"content-type", b"application/grpc"),
                            (b"grpc-status", status)])
        headers = Headers([(b":method", b"POST"), (b":path", path), (b":authority", b"svc"),
                           (b":scheme", b"http"), (b"content-type", b"application/grpc")])
        return run(config, headers, response)

    def counter(self, name: str) -> int:
        counter = STATS.counters.get(name)
        return counter.value if counter is not None else 0

    def test_per_method_with_stats_for_all_methods(self) -> None:
        before = self.counter("cluster.backend.grpc.pkg_a_Svc.Get.success")
        self.grpc("stats_for_all_methods: true\nreplace_dots_in_grpc_service_name: true\n",
                  b"/pkg.a.Svc/Get", b"0")
        self.assertEqual(self.counter("cluster.backend.grpc.pkg_a_Svc.Get.success"),
                         before + 1)
        failures = self.counter("cluster.backend.grpc.pkg_a_Svc.Get.failure")
        self.grpc("stats_for_all_methods: true\nreplace_dots_in_grpc_service_name: true\n",
                  b"/pkg.a.Svc/Get", b"14")
        self.assertEqual(self.counter("cluster.backend.grpc.pkg_a_Svc.Get.failure"),
                         failures + 1)
        self.assertGreaterEqual(self.counter("cluster.backend.grpc.pkg_a_Svc.Get.total"), 2)

    def test_allowlist_and_the_rest_unprefixed(self) -> None:
        allow = ("individual_method_stats_allowlist:\n"
                 "  services: [{name: shop.Cart, method_names: [Add]}]\n")
        listed = self.counter("cluster.backend.grpc.shop.Cart.Add.total")
        other = self.counter("cluster.backend.grpc.total")
        self.grpc(allow, b"/shop.Cart/Add", b"0")
        self.grpc(allow, b"/shop.Cart/Remove", b"0")
        self.assertEqual(self.counter("cluster.backend.grpc.shop.Cart.Add.total"), listed + 1)
        self.assertEqual(self.counter("cluster.backend.grpc.total"), other + 1)
        self.assertEqual(self.counter("cluster.backend.grpc.shop.Cart.Remove.total"), 0)

    def test_filter_state_message_counts(self) -> None:
        config = load_hcm(hcm_yaml(GRPC_STATS + "    emit_filter_state: true\n"))
        made = [f() for f in config.http_filters]
        headers = Headers([(b":method", b"POST"), (b":path", b"/s.S/M"),
                           (b":authority", b"svc"), (b":scheme", b"http"),
                           (b"content-type", b"application/grpc+proto")])
        _, _, _, manager = run(config, headers, filters=made, end=False)
        grpc = made[0]
        body = frame(b"one") + frame(b"") + frame(b"three")
        grpc.decodeData(body[:4], False)
        grpc.decodeData(body[4:], True)
        grpc.encodeData(frame(b"x" * 70000), False)
        state = manager.stream_info.filter_state.get_data(GRPC_STATS_KEY)
        self.assertEqual(str(state), "3,1")

    def test_not_grpc_is_not_counted(self) -> None:
        config = load_hcm(hcm_yaml(GRPC_STATS))
        before = self.counter("cluster.backend.grpc.total")
        run(config, request())
        self.assertEqual(self.counter("cluster.backend.grpc.total"), before)

    def test_frames_split_anywhere(self) -> None:
        data = frame(b"a" * 10) + frame(b"b") + frame(b"c" * 300)
        for size in (1, 2, 3, 7, len(data)):
            frames = _Frames()
            for i in range(0, len(data), size):
                frames.feed(data[i:i + size])
            self.assertEqual(frames.count, 3, size)


class MetadataExchangeTests(unittest.TestCase):
    def test_passes_everything(self) -> None:
        from hbonex.filters.network.metadata_exchange import MetadataExchangeFilter

        f = MetadataExchangeFilter()
        self.assertTrue(f.onNewConnection(object()))  # type: ignore[arg-type]
        self.assertTrue(f.onData(b"x", True))
        f.onClose(None)
