"""
The admin endpoint's resources (hbonex.observability.admin) over twisted.web's in-memory request:
stats in
Envoy's text, JSON and Prometheus forms, readiness, and POST-only levers.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from hbonex.bootstrap import Bootstrap
from hbonex.network.listener import FilterChain, Listener
from hbonex.observability.admin import Admin, collect, prometheus_text
from hbonex.observability.stats import STATS
from hbonex.upstream.cluster import Cluster, SocketAddress


class FakeService:
    def __init__(self, bootstrap: Bootstrap) -> None:
        self.bootstrap = bootstrap
        self.state = "LIVE"
        self.ports: dict[str, Any] = {}
        self.drained: list[bool] = []
        self.levels: list[Any] = []

    def drain(self, graceful: bool) -> None:
        self.drained.append(graceful)
        self.state = "DRAINING"

    def set_log_level(self, level: Any, namespace: str = "") -> None:
        self.levels.append((namespace, level))


def bootstrap() -> Bootstrap:
    b = Bootstrap(Clock())
    listener = Listener("ingress", b.reactor, [FilterChain([])])
    listener.connections_total = 7
    b.add_listener(listener)
    cluster = b.add_cluster(Cluster("backend", b.runtime,
                                    endpoints=(SocketAddress("127.0.0.1", 1),)))
    cluster.stats.upstream_cx_total = 3
    cluster.stats.upstream_cx_active = 2
    return b


def request(admin: Admin, method: bytes, path: str, **args: str) -> tuple[int, bytes]:
    segments = [s.encode() for s in path.strip("/").split("/")]
    req = DummyRequest(segments)
    req.method = method
    req.args = {k.encode(): [v.encode()] for k, v in args.items()}
    resource = admin.site.resource
    while segments and not getattr(resource, "isLeaf", False):
        resource = resource.getChildWithDefault(segments.pop(0), req)
    body = resource.render(req)
    return (req.responseCode or 200), body


class AdminTests(unittest.TestCase):
    def setUp(self) -> None:
        self.service = FakeService(bootstrap())
        self.admin = Admin(self.service)

    def test_stats_text_json_filter_usedonly(self) -> None:
        STATS.counter("http2.tx_reset").inc(0)
        code, body = request(self.admin, b"GET", "/stats")
        self.assertEqual(code, 200)
        lines = body.decode().splitlines()
        self.assertIn("listener.ingress.downstream_cx_total: 7", lines)
        self.assertIn("cluster.backend.upstream_cx_total: 3", lines)
        self.assertEqual(lines, sorted(lines))
        _, body = request(self.admin, b"GET", "/stats", filter="^cluster\\.", format="json")
        names = [s["name"] for s in json.loads(body)["stats"]]
        self.assertTrue(names and all(n.startswith("cluster.") for n in names), names)
        _, body = request(self.admin, b"GET", "/stats", usedonly="")
        self.assertNotIn(b": 0\n", body)
        code, _ = request(self.admin, b"GET", "/stats", filter="(")
        self.assertEqual(code, 400)

    def test_prometheus_parses_with_envoys_names_and_tags(self) -> None:
        text = prometheus_text(collect(self.service.bootstrap)).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        cx = families["envoy_cluster_upstream_cx"]  # counters lose the _total suffix
        self.assertEqual(cx.type, "counter")
        [sample] = [s for s in cx.samples if s.name.endswith("_total")]
        self.assertEqual((sample.labels, sample.value),
                         ({"envoy_cluster_name": "backend"}, 3.0))
        active = families["envoy_cluster_upstream_cx_active"]
        self.assertEqual(active.type, "gauge")
        self.assertEqual(active.samples[0].value, 2.0)
        code, body = request(self.admin, b"GET", "/stats/prometheus")
        self.assertEqual(code, 200)
        self.assertIn(b"envoy_listener_downstream_cx_total", body)
        # The pool's families, as gauges or counters by Envoy's naming.
        for name, kind in (("envoy_cluster_upstream_rq_active", "gauge"),
                           ("envoy_cluster_upstream_rq_pending_active", "gauge"),
                           ("envoy_cluster_upstream_rq_pending_overflow", "counter"),
                           ("envoy_cluster_upstream_rq_retry", "counter"),
                           ("envoy_cluster_upstream_cx_connect_timeout", "counter")):
            self.assertEqual(families[name].type, kind, name)

    def test_ready_and_health_check(self) -> None:
        self.assertEqual(request(self.admin, b"GET", "/ready"), (200, b"LIVE\n"))
        self.assertEqual(request(self.admin, b"POST", "/healthcheck/fail")[0], 200)
        self.assertEqual(request(self.admin, b"GET", "/ready"), (503, b"UNHEALTHY\n"))
        request(self.admin, b"POST", "/healthcheck/ok")
        self.assertEqual(request(self.admin, b"POST", "/drain_listeners", graceful="")[0], 200)
        self.assertEqual(self.service.drained, [True])
        self.assertEqual(request(self.admin, b"GET", "/ready"), (503, b"DRAINING\n"))

    def test_levers_are_post_only(self) -> None:
        for path in ("/drain_listeners", "/healthcheck/fail", "/logging", "/quitquitquit"):
            code, _ = request(self.admin, b"GET", path)
            self.assertEqual(code, 405, path)
        self.assertEqual(self.service.drained, [])

    def test_logging_level(self) -> None:
        code, _ = request(self.admin, b"POST", "/logging", level="debug")
        self.assertEqual(code, 200)
        self.assertEqual([(ns, lvl.name) for ns, lvl in self.service.levels], [("", "debug")])
        code, body = request(self.admin, b"POST", "/logging", level="loud")
        self.assertEqual(code, 400)
        self.assertIn(b"debug", body)
        # Per namespace: Envoy's ?paths= list, and ?NAMESPACE=LEVEL.
        del self.service.levels[:]
        code, body = request(self.admin, b"POST", "/logging",
                             paths="hbonex.network.listener:warn,hbonex.upstream.tunnel_pool:error")
        self.assertEqual((code, body), (200, b"hbonex.network.listener: warn\n"
                                           b"hbonex.upstream.tunnel_pool: error\n"))
        code, _ = request(self.admin, b"POST", "/logging", **{"hbonex.h2.connection": "debug"})
        self.assertEqual(code, 200)
        self.assertEqual([(ns, lvl.name) for ns, lvl in self.service.levels],
                         [("hbonex.network.listener", "warn"),
                          ("hbonex.upstream.tunnel_pool", "error"),
                          ("hbonex.h2.connection", "debug")])
        # Nothing given, or one bad level among good ones: 400 and nothing changes.
        del self.service.levels[:]
        self.assertEqual(request(self.admin, b"POST", "/logging")[0], 400)
        code, _ = request(self.admin, b"POST", "/logging", paths="a:info,b:loud")
        self.assertEqual((code, self.service.levels), (400, []))

    def test_listeners_clusters_server_info(self) -> None:
        _, body = request(self.admin, b"GET", "/listeners")
        self.assertEqual(json.loads(body)["listener_statuses"][0]["name"], "ingress")
        _, body = request(self.admin, b"GET", "/clusters")
        cluster = json.loads(body)["cluster_statuses"][0]
        self.assertEqual((cluster["name"], cluster["hosts"]), ("backend", ["127.0.0.1:1"]))
        _, body = request(self.admin, b"GET", "/server_info")
        self.assertEqual(json.loads(body)["state"], "LIVE")


class DumpAndCertsTests(unittest.TestCase):
    def test_config_dump_redacts_inline_keys(self) -> None:
        from hbonex.observability.admin import redact

        dump = redact({"tls_certificates": [{
            "certificate_chain": {"filename": "/etc/cert.pem"},
            "private_key": {"inline_string": "-----BEGIN PRIVATE KEY-----..."},
        }], "other": {"inline_string": "kept"}})
        cert = dump["tls_certificates"][0]
        self.assertEqual(cert["private_key"], {"inline_string": "[redacted]"})
        self.assertEqual(cert["certificate_chain"], {"filename": "/etc/cert.pem"})
        self.assertEqual(dump["other"], {"inline_string": "kept"})

    def test_flags_config_dump_and_certs(self) -> None:
        from hbonex.tls import pki
        from hbonex.tls.context import PeerPolicy, ServerTLS, tls_settings_from_material
        from tests.support import make_pki

        service = FakeService(bootstrap())
        test_pki = make_pki(self)
        material = pki.load_pki_dir(test_pki.root / "server", str(test_pki.ca))
        settings = tls_settings_from_material(material, peer_policy=PeerPolicy())
        service.bootstrap.listeners[0].filter_chains[0].tls = ServerTLS(settings)
        admin = Admin(service)
        _, body = request(admin, b"GET", "/config_dump")
        self.assertIn("configured by command-line flags", json.loads(body)["configs"][0]["note"])
        _, body = request(admin, b"GET", "/certs")
        certs = json.loads(body)["certificates"]
        leaf = [c for c in certs if c["kind"] == "certificate"][0]
        self.assertEqual(leaf["subject_alt_names"]["uri"],
                         ["spiffe://cluster.local/ns/default/sa/server"])
        self.assertGreater(leaf["days_until_expiration"], 0)
        self.assertEqual(leaf["used_by"], ["listener ingress"])
        self.assertIn("ca", {c["kind"] for c in certs})


class TagExtractionTests(unittest.TestCase):
    def test_envoy_names_and_tags(self) -> None:
        from hbonex.observability.admin import _envoy_name

        cases = {
            "listener.0.0.0.0_15008.downstream_cx_total": (
                "envoy_listener_downstream_cx_total",
                {"envoy_listener_address": "0.0.0.0_15008"}),
            "listener.0.0.0.0_15008.ssl.handshake": (
                "envoy_listener_ssl_handshake", {"envoy_listener_address": "0.0.0.0_15008"}),
            "listener.hbone.ssl.certificate.default.expiration_unix_time_seconds": (
                "envoy_listener_ssl_certificate_expiration_unix_time_seconds",
                {"envoy_listener_address": "hbone", "envoy_ssl_certificate_name": "default"}),
            "cluster.hbone.ssl.certificate.spire.leaf.expiration_unix_time_seconds": (
                "envoy_cluster_ssl_certificate_expiration_unix_time_seconds",
                {"envoy_cluster_name": "hbone", "envoy_ssl_certificate_name": "spire.leaf"}),
            "server.days_until_first_cert_expiring": (
                "envoy_server_days_until_first_cert_expiring", {}),
        }
        for name, expected in cases.items():
            self.assertEqual(_envoy_name(name), expected, name)


class HistogramTests(unittest.TestCase):
    def test_buckets_are_cumulative_with_prometheus_le(self) -> None:
        from hbonex.observability.stats import Family

        family = Family("t", "histogram", ("code",), buckets=(1.0, 5.0, 10.0))
        for value in (0.5, 1.0, 3.0, 5.0, 7.0, 100.0):
            family.observe(("200",), value)
        # le: a value on a bound is in that bucket; 100 is only in +Inf.
        self.assertEqual(family.histogram(("200",)), ([2, 4, 5], 6, 116.5))
        family.observe(("503",), 11.0)
        self.assertEqual(family.histogram(("503",)), ([0, 0, 0], 1, 11.0))
