"""
Istio's standard metrics, with Istio's names and labels (what its stats filter reports, and
what Istio's dashboards query): TCP for tunnels, requests for HTTP through the connection
manager.  Recorded from the connection's facts (SPIFFE identities both ways) when a tunnel
opens and closes and when a request ends.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

from hbonex.observability.stats import STATS

_LABELS = ("reporter", "source_principal", "destination_principal",
           "connection_security_policy", "response_flags", "request_protocol")
#: Istio's label set for requests: the peers' workloads come from the istio.stats filter
#: (hbonex.filters.http.istio_stats); without it they are "unknown", as in Istio.
_HTTP_LABELS = _LABELS + (
    "response_code", "grpc_response_status",
    "source_workload", "source_workload_namespace", "source_canonical_service",
    "source_canonical_revision", "source_app", "source_version", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_canonical_service",
    "destination_canonical_revision", "destination_app", "destination_version",
    "destination_cluster", "destination_service", "destination_service_name",
    "destination_service_namespace",
)
#: The peer labels without the istio.stats filter: "unknown", as in Istio.
_UNKNOWN_PEERS = ("unknown",) * (len(_HTTP_LABELS) - len(_LABELS) - 2)
#: The names Istio's stats config (``metrics[].name``) gives these series.
METRIC_NAMES = {
    "requests_total": "istio_requests", "request_duration_milliseconds":
    "istio_request_duration_milliseconds", "request_bytes": "istio_request_bytes",
    "response_bytes": "istio_response_bytes",
    "tcp_connections_opened_total": "istio_tcp_connections_opened",
    "tcp_connections_closed_total": "istio_tcp_connections_closed",
    "tcp_sent_bytes_total": "istio_tcp_sent_bytes",
    "tcp_received_bytes_total": "istio_tcp_received_bytes",
}
#: Istio's buckets: milliseconds, and bytes.
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                    60000, 300000, 600000, 1800000, 3600000)
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)

TCP_OPENED = STATS.family("istio_tcp_connections_opened", "counter", _LABELS)
TCP_CLOSED = STATS.family("istio_tcp_connections_closed", "counter", _LABELS)
TCP_SENT = STATS.family("istio_tcp_sent_bytes", "counter", _LABELS)
TCP_RECEIVED = STATS.family("istio_tcp_received_bytes", "counter", _LABELS)
REQUESTS = STATS.family("istio_requests", "counter", _HTTP_LABELS)
DURATION = STATS.family("istio_request_duration_milliseconds", "histogram", _HTTP_LABELS,
                        DURATION_BUCKETS)
REQUEST_BYTES = STATS.family("istio_request_bytes", "histogram", _HTTP_LABELS, BYTES_BUCKETS)
RESPONSE_BYTES = STATS.family("istio_response_bytes", "histogram", _HTTP_LABELS,
                              BYTES_BUCKETS)


def _labels(info: Any, flags: str, protocol: str, reporter: str) -> tuple[str, ...]:
    peer = getattr(info, "peerIdentity", "") or ""
    return (
        reporter,
        peer or "unknown",
        getattr(info, "localIdentity", "") or "unknown",
        "mutual_tls" if peer else "none",
        flags or "-",
        protocol,
    )


def tcp_opened(info: Any, reporter: str = "destination",
               drop: Collection[str] = ()) -> None:
    if TCP_OPENED.name not in drop:
        TCP_OPENED.inc(_labels(info, "-", "tcp", reporter))


def tcp_closed(info: Any, sent: int, received: int, flags: str = "-",
               reporter: str = "destination", drop: Collection[str] = ()) -> None:
    """``drop``: family names not to record (Istio's ``metrics: [{drop: true}]``)."""
    labels = _labels(info, flags, "tcp", reporter)
    for family, amount in ((TCP_CLOSED, 1), (TCP_SENT, sent), (TCP_RECEIVED, received)):
        if family.name not in drop:
            family.inc(labels, amount)


def request_done(info: Any, code: int, flags: str, protocol: str, duration_ms: float,
                 request_bytes: int, response_bytes: int,
                 reporter: str = "destination", extra: Mapping[str, str] | None = None,
                 drop: Collection[str] = ()) -> None:
    """
    ``extra``: label values that replace the defaults (the istio.stats filter's peers);
    ``drop``: family names not to record.
    """
    base = _labels(info, flags, protocol, reporter) + (str(code), "")
    if extra:
        values = dict(zip(_HTTP_LABELS, base + _UNKNOWN_PEERS, strict=True))
        values.update(extra)
        labels = tuple(values[name] for name in _HTTP_LABELS)
    else:
        labels = base + _UNKNOWN_PEERS  # the common case: no label lookups per request
    if REQUESTS.name not in drop:
        REQUESTS.inc(labels)
    for family, value in ((DURATION, duration_ms), (REQUEST_BYTES, request_bytes),
                          (RESPONSE_BYTES, response_bytes)):
        if family.name not in drop:
            family.observe(labels, value)


__all__ = ["METRIC_NAMES", "request_done", "tcp_closed", "tcp_opened"]
