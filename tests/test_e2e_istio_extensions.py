"""
Istio's extensions in a real hbone-server: a request carrying ztunnel's ``baggage`` through
istio.peer_metadata → envoy.filters.http.grpc_stats → istio.stats → router, then Istio's
``istio_requests_total`` on the admin endpoint with the source labels from the baggage and
the waypoint reporter.
"""

from __future__ import annotations

import os

from tests.support import e2e
from tests.test_e2e_hcm import HcmCase

ISTIO_FILTERS = """\
http_filters:
- name: waypoint_downstream_peer_metadata
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/io.istio.http.peer_metadata.Config
    value:
      downstream_discovery:
      - workload_discovery: {}
      - baggage: {}
      shared_with_upstream: true
- name: envoy.filters.http.grpc_stats
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
    emit_filter_state: true
    stats_for_all_methods: false
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

BAGGAGE = ("baggage: k8s.cluster.name=Kubernetes,k8s.namespace.name=e2e-ns,"
           "k8s.deployment.name=sleep,service.name=sleep,service.version=v7")


class IstioExtensionsE2ETests(HcmCase):
    @e2e
    async def test_istio_requests_total_with_baggage_peer(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        proxy = await self.setup_hcm(http_filters=ISTIO_FILTERS,
                                     extra_args=["--admin", "127.0.0.1:0"])
        [m] = await proxy.wait_for_count(r"admin listening on 127\.0\.0\.1:(?P<port>\d+)", 1)
        # The workload-discovery method is warned about once, naming its path.
        await proxy.wait_for_count(
            r"downstream_discovery\[0\]\.workload_discovery.*no workload xDS \(WDS\)", 1)
        base = f"http://127.0.0.1:{proxy.port}"
        for _ in range(2):
            await self.curl("-o", os.devnull, "-H", BAGGAGE, "-H", "Host: reviews.bookinfo",
                            f"{base}/api/n?size=10")
        await self.curl("-o", os.devnull, f"{base}/api/n?size=10")  # no baggage
        text = await self.curl(f"http://127.0.0.1:{m['port']}/stats/prometheus")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = [s for s in families["istio_requests"].samples
                   if s.name == "istio_requests_total"]
        by_namespace = {s.labels["source_workload_namespace"]: s for s in samples}
        self.assertEqual(set(by_namespace), {"e2e-ns", "unknown"})
        peer = by_namespace["e2e-ns"]
        self.assertEqual(peer.value, 2.0)
        self.assertEqual({k: peer.labels[k] for k in (
            "reporter", "source_workload", "source_canonical_service",
            "source_canonical_revision", "source_cluster", "destination_service",
            "response_code", "request_protocol")}, {
            "reporter": "waypoint", "source_workload": "sleep",
            "source_canonical_service": "sleep", "source_canonical_revision": "v7",
            "source_cluster": "Kubernetes", "destination_service": "reviews.bookinfo",
            "response_code": "200", "request_protocol": "http"})
        anonymous = by_namespace["unknown"]
        self.assertEqual((anonymous.value, anonymous.labels["reporter"],
                          anonymous.labels["source_workload"]), (1.0, "waypoint", "unknown"))
