"""
Istio's standard metrics, with Istio's names and labels (what its stats filter reports, and
what Istio's dashboards query): TCP for tunnels, requests for HTTP through the connection
manager.  Recorded from the connection's facts (SPIFFE identities both ways) when a tunnel
opens and closes and when a request ends.
"""

from __future__ import annotations

from typing import Any

from hbonex.observability.stats import STATS

_LABELS = ("reporter", "source_principal", "destination_principal",
           "connection_security_policy", "response_flags", "request_protocol")
_HTTP_LABELS = _LABELS + ("response_code",)
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


def tcp_opened(info: Any, reporter: str = "destination") -> None:
    TCP_OPENED.inc(_labels(info, "-", "tcp", reporter))


def tcp_closed(info: Any, sent: int, received: int, flags: str = "-",
               reporter: str = "destination") -> None:
    labels = _labels(info, flags, "tcp", reporter)
    TCP_CLOSED.inc(labels)
    TCP_SENT.inc(labels, sent)
    TCP_RECEIVED.inc(labels, received)


def request_done(info: Any, code: int, flags: str, protocol: str, duration_ms: float,
                 request_bytes: int, response_bytes: int,
                 reporter: str = "destination") -> None:
    labels = _labels(info, flags, protocol, reporter) + (str(code),)
    REQUESTS.inc(labels)
    DURATION.observe(labels, duration_ms)
    REQUEST_BYTES.observe(labels, request_bytes)
    RESPONSE_BYTES.observe(labels, response_bytes)


__all__ = ["request_done", "tcp_closed", "tcp_opened"]
