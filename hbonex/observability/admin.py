"""
Envoy's admin endpoint, on twisted.web: readiness, stats (Envoy's text and JSON, and
Prometheus), listeners, clusters, server info, and the operator's levers (drain, health check
fail/ok, log level, quit).  Off unless configured (YAML ``admin.address`` or ``--admin``),
loopback-only by default; levers are POST only (a GET gets 405).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.web import resource, server

from hbonex.observability.stats import STATS

log = Logger()

_STARTED = time.time()

#: Envoy's default tag extraction, for Prometheus names: (stat name pattern, tag).
_TAGS = [
    (re.compile(r"^cluster\.((.+?)\.)"), "envoy_cluster_name"),
    (re.compile(r"^listener\.((.+?)\.)(?=ssl\.|[a-z_]+$)"), "envoy_listener_address"),
    (re.compile(r"^http\.((.*?)\.)"), "envoy_http_conn_manager_prefix"),
    (re.compile(r"^tcp\.((.*?)\.)"), "envoy_tcp_prefix"),
    (re.compile(r"^connection_limit\.((.*?)\.)"), "envoy_connection_limit_prefix"),
    # What is left of listener.<addr>.ssl.certificate.<name>.expiration_unix_time_seconds.
    (re.compile(r"^\w+\.ssl\.certificate\.((.+)\.)(?=expiration_unix_time_seconds$)"),
     "envoy_ssl_certificate_name"),
]


def collect(bootstrap: Any) -> dict[str, int]:
    """Every stat: the process store, plus what listeners, clusters and pools count."""
    values = STATS.snapshot()
    limit = bootstrap.runtime.downstream_limit
    values["server.downstream_cx_active"] = limit.active
    values["server.downstream_cx_overflow"] = limit.overflow
    for listener in bootstrap.listeners:
        prefix = f"listener.{listener.name}"
        values[f"{prefix}.downstream_cx_total"] = listener.connections_total
        values[f"{prefix}.downstream_cx_overflow"] = listener.connections_refused
        values[f"{prefix}.downstream_cx_active"] = listener.connections_active
        if any(chain.tls is not None for chain in listener.all_chains):
            values[f"{prefix}.ssl.handshake"] = listener.ssl_handshake
            values[f"{prefix}.ssl.connection_error"] = listener.ssl_connection_error
    for name, cluster in bootstrap.clusters.items():
        s, prefix = cluster.stats, f"cluster.{name}"
        values[f"{prefix}.upstream_cx_total"] = s.upstream_cx_total
        values[f"{prefix}.upstream_cx_active"] = s.upstream_cx_active
        values[f"{prefix}.upstream_cx_connect_fail"] = s.upstream_cx_connect_fail
        values[f"{prefix}.upstream_rq_total"] = s.upstream_rq_total
        if cluster.client_tls is not None:
            values[f"{prefix}.ssl.handshake"] = s.ssl_handshake
            values[f"{prefix}.ssl.connection_error"] = s.ssl_connection_error
        values[f"{prefix}.upstream_cx_connect_timeout"] = s.upstream_cx_connect_timeout
        if cluster.passthrough_metadata:
            values[f"{prefix}.internal_upstream.no_metadata"] = s.internal_upstream_no_metadata
        pools = list(cluster.pools.values())
        values[f"{prefix}.upstream_cx_http2_active"] = sum(len(p.connections) for p in pools)
        # Streams open on the pooled connections, and tunnels waiting for one.
        values[f"{prefix}.upstream_rq_active"] = sum(
            len(c.streams) for p in pools for c in p.connections)
        values[f"{prefix}.upstream_rq_pending_active"] = sum(len(p._waiters) for p in pools)
        values[f"{prefix}.upstream_rq_pending_overflow"] = sum(
            p.stats.pending_overflow for p in pools)
        values[f"{prefix}.upstream_rq_retry"] = s.upstream_rq_retry + sum(
            p.stats.tunnels_retried for p in pools)
    return dict(sorted(values.items()))


def prometheus_text(values: dict[str, Any], families: Iterable[Any] | None = None,
                    is_gauge: Callable[[str], bool] | None = None) -> bytes:
    """
    Envoy's Prometheus exposition: ``envoy_`` names, tags extracted into labels.  The
    families and gauges are this process's unless given (a supervisor's sums of its workers).
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    out: dict[str, Any] = {}
    for name, value in values.items():
        metric, labels = _envoy_name(name)
        gauge = (is_gauge or STATS.is_gauge)(name)
        family = out.get(metric)
        if family is None:
            kind = GaugeMetricFamily if gauge else CounterMetricFamily
            family = out[metric] = kind(metric, name, labels=sorted(labels))
        family.add_metric([labels[k] for k in sorted(labels)], value)

    class Snapshot:
        def collect(self) -> Iterable[Any]:
            return out.values()

    from prometheus_client.core import HistogramMetricFamily

    for family in STATS.families.values() if families is None else families:
        # Istio's metrics keep their names; Envoy-named ones get envoy_ and their tags.
        fixed: dict[str, str] = {}
        if family.name.startswith("istio_"):
            metric = family.name
        else:
            metric, fixed = _envoy_name(family.name)
        label_names = list(fixed) + list(family.labels)
        if family.kind == "histogram":
            histogram = HistogramMetricFamily(metric, family.doc, labels=label_names)
            for key in family.values:
                counts, total, value_sum = family.histogram(key)
                buckets = [(str(bound), count) for bound, count in zip(family.buckets, counts,
                                                                        strict=True)]
                buckets.append(("+Inf", total))
                histogram.add_metric(list(fixed.values()) + list(key), buckets, value_sum)
            out[metric] = histogram
        else:
            counter = CounterMetricFamily(metric, family.doc, labels=label_names)
            for key, value in family.values.items():
                counter.add_metric(list(fixed.values()) + list(key), value)
            out[metric] = counter

    registry = CollectorRegistry()
    registry.register(Snapshot())
    return generate_latest(registry)  # type: ignore[no-any-return]


def _envoy_name(name: str) -> tuple[str, dict[str, str]]:
    """``cluster.backend.upstream_cx_total`` -> (envoy_cluster_upstream_cx_total, tags)."""
    labels: dict[str, str] = {}
    rest = name
    for pattern, tag in _TAGS:
        match = pattern.match(rest)
        if match:
            labels[tag] = match.group(2)
            rest = rest[: match.start(1)] + rest[match.end(1):]
    return "envoy_" + re.sub(r"[^a-zA-Z0-9_]", "_", rest), dict(sorted(labels.items()))


def _later(request: Any, body: defer.Deferred[bytes]) -> Any:
    """A body that is not ready yet (a supervisor asking its workers): written when it is."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def write(data: bytes) -> None:
        if not gone:
            request.write(data)
            request.finish()

    def fail(failure: Any) -> None:
        log.failure("admin request failed", failure)
        if not gone:
            request.setResponseCode(500)
            write(b"internal error\n")

    body.addCallback(write).addErrback(fail)
    return server.NOT_DONE_YET


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, get: Callable[[Any], Any] | None = None,
                 post: Callable[[Any], bytes] | None = None) -> None:
        super().__init__()
        self._get = get
        self._post = post

    def render_GET(self, request: Any) -> Any:
        if self._get is None:
            request.setResponseCode(405)
            request.setHeader(b"allow", b"POST")
            return b"method not allowed: use POST\n"
        body = self._get(request)
        return _later(request, body) if isinstance(body, defer.Deferred) else body

    def render_POST(self, request: Any) -> bytes:
        if self._post is None:
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET")
            return b"method not allowed: use GET\n"
        return self._post(request)


class Admin:
    """
    The admin endpoint of one ProxyService (``service``: started listeners, drain, stop).
    """

    def __init__(self, service: Any) -> None:
        self.service = service
        self.healthy = True
        root = resource.Resource()
        leaves = {
            b"ready": _Leaf(get=self.ready),
            b"stats": _Leaf(get=self.stats),
            b"server_info": _Leaf(get=self.server_info),
            b"listeners": _Leaf(get=self.listeners),
            b"clusters": _Leaf(get=self.clusters),
            b"config_dump": _Leaf(get=self.config_dump),
            b"certs": _Leaf(get=self.certs),
            b"drain_listeners": _Leaf(post=self.drain_listeners),
            b"logging": _Leaf(post=self.logging),
            b"quitquitquit": _Leaf(post=self.quit),
        }
        for name, leaf in leaves.items():
            root.putChild(name, leaf)
        stats = leaves[b"stats"]
        stats.isLeaf = False
        stats.putChild(b"prometheus", _Leaf(get=self.prometheus))
        health = resource.Resource()
        health.putChild(b"fail", _Leaf(post=self.health(False)))
        health.putChild(b"ok", _Leaf(post=self.health(True)))
        root.putChild(b"healthcheck", health)
        self.site = _QuietSite(root)
        self.site.noisy = False
        self.site.displayTracebacks = False

    @property
    def bootstrap(self) -> Any:
        return self.service.bootstrap

    def ready(self, request: Any) -> bytes:
        state = self.service.state
        live = state == "LIVE" and self.healthy
        request.setResponseCode(200 if live else 503)
        return (state if self.healthy else "UNHEALTHY").encode() + b"\n"

    def stats(self, request: Any) -> Any:
        gather = getattr(self.service, "gather_stats", None)
        if gather is not None:  # a supervisor: its workers' stats, summed
            return gather().addCallback(lambda merged: self._stats(request, merged.values))
        return self._stats(request, collect(self.bootstrap))

    def _stats(self, request: Any, values: dict[str, Any]) -> bytes:
        pattern = _arg(request, b"filter")
        if pattern:
            try:
                regex = re.compile(pattern)
            except re.error as e:
                request.setResponseCode(400)
                return f"bad filter regex: {e}\n".encode()
            values = {k: v for k, v in values.items() if regex.search(k)}
        if _arg(request, b"usedonly") is not None:
            values = {k: v for k, v in values.items() if v}
        if _arg(request, b"format") == "json":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"stats": [{"name": k, "value": v}
                                         for k, v in values.items()]}).encode()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return "".join(f"{k}: {v}\n" for k, v in values.items()).encode()

    def prometheus(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        gather = getattr(self.service, "gather_stats", None)
        if gather is not None:
            return gather().addCallback(lambda merged: prometheus_text(
                merged.values, merged.families.values(), merged.is_gauge))
        return prometheus_text(collect(self.bootstrap))

    def server_info(self, request: Any) -> bytes:
        from hbonex import __version__

        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "version": f"hbonex/{__version__}",
            "state": self.service.state,
            "uptime_current_epoch": f"{int(time.time() - _STARTED)}s",
            "pid": os.getpid(),
            "command_line_options": {"source": getattr(self.service, "source", "")},
        }, indent=2).encode()

    def listeners(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        out = []
        for listener in self.bootstrap.listeners:
            port = self.service.ports.get(listener.name)
            address = port.getHost() if port is not None else None
            out.append({
                "name": listener.name,
                "internal": listener.internal,
                "address": f"{address.host}:{address.port}" if address is not None else None,
                "downstream_cx_total": listener.connections_total,
            })
        return json.dumps({"listener_statuses": out}, indent=2).encode()

    def clusters(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        out = []
        for name, cluster in self.bootstrap.clusters.items():
            out.append({
                "name": name,
                "type": cluster.type,
                "hosts": [str(a) for a in cluster.endpoints],
                "upstream_cx_active": cluster.stats.upstream_cx_active,
                "pools": [
                    {"address": key.address,
                     "connections": [{"streams": len(c.streams), "state": c.state.value}
                                     for c in pool.connections]}
                    for key, pool in cluster.pools.items()
                ],
            })
        return json.dumps({"cluster_statuses": out}, indent=2).encode()

    def config_dump(self, request: Any) -> bytes:
        """The effective configuration, private keys and inline secrets redacted."""
        request.setHeader(b"content-type", b"application/json")
        message = self.bootstrap.message
        if message is None:
            dump: Any = {"note": "configured by command-line flags; "
                                 "`hbonex config render` prints the equivalent YAML",
                         "listeners": [x.name for x in self.bootstrap.listeners],
                         "clusters": sorted(self.bootstrap.clusters)}
        else:
            from google.protobuf import json_format

            dump = redact(json_format.MessageToDict(message, preserving_proto_field_name=True))
        return json.dumps({"configs": [dump]}, indent=2).encode()

    def certs(self, request: Any) -> bytes:
        """Every certificate in use: SANs, serial, expiry, where it is used."""
        request.setHeader(b"content-type", b"application/json")
        seen: dict[tuple[int, str], dict[str, Any]] = {}

        def add(cert: Any, where: str, kind: str) -> None:
            key = (cert.serial_number, kind)
            entry = seen.get(key)
            if entry is None:
                entry = seen[key] = _cert_info(cert, kind)
            entry["used_by"].append(where)

        for listener in self.bootstrap.listeners:
            for chain in listener.all_chains:
                settings = getattr(chain.tls, "settings", None)
                if settings is not None:
                    add(settings.certificate, f"listener {listener.name}", "certificate")
                    for ca in settings.ca_certificates:
                        add(ca, f"listener {listener.name}", "ca")
        for name, cluster in self.bootstrap.clusters.items():
            settings = cluster.tls
            if settings is not None:
                add(settings.certificate, f"cluster {name}", "certificate")
                for ca in settings.ca_certificates:
                    add(ca, f"cluster {name}", "ca")
        return json.dumps({"certificates": list(seen.values())}, indent=2).encode()

    def drain_listeners(self, request: Any) -> bytes:
        graceful = _arg(request, b"graceful") is not None
        self.service.drain(graceful=graceful)
        return b"OK\n"

    def health(self, ok: bool) -> Callable[[Any], bytes]:
        def set_health(request: Any) -> bytes:
            self.healthy = ok
            log.info("health check set to {state} through the admin endpoint",
                     state="ok" if ok else "fail")
            return b"OK\n"

        return set_health

    def logging(self, request: Any) -> bytes:
        """
        Envoy's forms: ``?level=L`` (every namespace), ``?paths=NS:L,NS:L`` and ``?NS=L``,
        where NS is a twisted.logger namespace (``hbonex.network.listener``) covering its children.
        """
        names = {lvl.name: lvl for lvl in LogLevel.iterconstants()}
        settings: list[tuple[str, str]] = []
        for key, values in sorted(request.args.items()):
            key = key.decode("utf-8", "replace")
            for value in values:
                value = value.decode("utf-8", "replace")
                if key == "level":
                    settings.append(("", value))
                elif key == "paths":
                    for item in filter(None, value.split(",")):
                        namespace, _, level = item.rpartition(":")
                        settings.append((namespace, level))
                else:
                    settings.append((key, value))
        bad = [level for _, level in settings if level not in names]
        if not settings or bad:
            request.setResponseCode(400)
            return (f"usage: POST /logging?level=L, ?paths=NAMESPACE:L,... or ?NAMESPACE=L; "
                    f"L is one of {', '.join(sorted(names))}\n").encode()
        for namespace, level in settings:
            self.service.set_log_level(names[level], namespace)
        return "".join(f"{namespace or '*'}: {level}\n"
                       for namespace, level in settings).encode()

    def quit(self, request: Any) -> bytes:
        from twisted.internet import reactor

        log.info("quitquitquit through the admin endpoint")
        reactor.callLater(0, reactor.stop)  # type: ignore[attr-defined]
        return b"OK\n"


_SECRET_KEYS = ("private_key", "password", "secret", "session_ticket_keys")


def redact(value: Any, key: str = "") -> Any:
    """Inline private keys and secrets replaced by "[redacted]" (file names stay)."""
    if isinstance(value, dict):
        secret = any(word in key for word in _SECRET_KEYS)
        out = {}
        for k, v in value.items():
            if secret and k in ("inline_string", "inline_bytes", "environment_variable"):
                out[k] = "[redacted]"
            else:
                out[k] = redact(v, k if not secret else key)
        return out
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return value


def _cert_info(cert: Any, kind: str) -> dict[str, Any]:
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        uris, ips, dns = [], [], []
    expires = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
    days = (expires.timestamp() - time.time()) / 86400
    return {
        "kind": kind,
        "subject": cert.subject.rfc4514_string(),
        "serial_number": format(cert.serial_number, "x"),
        "subject_alt_names": {"uri": uris, "ip": ips, "dns": dns},
        "expiration_time": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_until_expiration": int(days),
        "used_by": [],
    }


class _QuietSite(server.Site):
    """No line per admin request: probes every few seconds would bury the process log."""

    def log(self, request: Any) -> None:
        pass


def _arg(request: Any, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    return values[0].decode("utf-8", "replace")  # type: ignore[no-any-return]


__all__ = ["Admin", "collect", "prometheus_text"]
