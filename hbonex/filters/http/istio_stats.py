"""
``istio.stats`` (Istio's ``stats.PluginConfig``, as a TypedStruct): Istio's standard request
metrics (``istio_requests_total``, durations and sizes) with Istio's labels for this proxy's
role (``reporter``: ``waypoint`` for SERVER_GATEWAY) and the peers' workloads, which
``istio.peer_metadata`` left in filter state (``downstream_peer`` / ``upstream_peer``).

Without this filter the connection manager still records the metrics, as an inbound
(``destination``) reporter with unknown peers.  Placed in a chain, it replaces that record for
every request the chain sees, local replies included.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.common.istio_stats_config import TYPE_URL, StatsConfig, parse_stats_config
from hbonex.filters.common.peer_metadata import (
    DOWNSTREAM_PEER,
    PEER_PRINCIPAL,
    UPSTREAM_PEER,
    PeerMetadata,
)
from hbonex.http.headers import Headers
from hbonex.http.pass_through import PassThroughDecoderFilter
from hbonex.interfaces import IHTTPFilterExtension, IStreamDecoderFilter
from hbonex.observability import istio_metrics

NAME = "istio.stats"
_HTTP_FAMILIES = ("istio_requests", "istio_request_duration_milliseconds",
                  "istio_request_bytes", "istio_response_bytes")


def _state(key: str, *states: Any) -> Any:
    for state in states:
        if state is not None and state.has_data(key):
            return state.get_data(key)
    return None


def _peer_labels(side: str, peer: Any) -> dict[str, str]:
    if not isinstance(peer, PeerMetadata):
        return {}
    values = {
        "workload": peer.workload, "workload_namespace": peer.namespace,
        "canonical_service": peer.canonical_service,
        "canonical_revision": peer.canonical_revision,
        "app": peer.app or peer.canonical_service, "version": peer.version or
        peer.canonical_revision, "cluster": peer.cluster,
    }
    return {f"{side}_{k}": v for k, v in values.items() if v}


def _service(authority: str) -> dict[str, str]:
    """destination_service* from the Host header (Istio's fallback)."""
    host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
    if not host:
        return {}
    labels = {"destination_service": host, "destination_service_name": host}
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        labels.update(destination_service_name=parts[0], destination_service_namespace=parts[1])
    return labels


class RequestReport:
    """What the connection manager calls when the request is over (StreamInfo.istio_stats)."""

    def __init__(self, config: StatsConfig, connection: Any) -> None:
        self.config = config
        self.connection = connection

    def labels(self, manager: Any) -> dict[str, str]:
        info = manager.stream_info
        connection_state = getattr(self.connection, "filter_state", None)
        headers = manager.decoding.headers or Headers()
        extra = _peer_labels("source", _state(DOWNSTREAM_PEER, info.filter_state,
                                              connection_state))
        extra.update(_peer_labels("destination", _state(UPSTREAM_PEER, info.filter_state)))
        principal = _state(PEER_PRINCIPAL, info.filter_state, connection_state)
        if principal:
            extra["source_principal"] = str(principal)
            extra["connection_security_policy"] = "mutual_tls"
        if self.config.reporter == "waypoint":
            # The waypoint's own identity is not the destination's; hbonex does not see the
            # upstream workload's certificate.
            extra["destination_principal"] = "unknown"
        if not self.config.disable_host_header_fallback:
            authority = (headers.get(b":authority") or b"").decode("latin-1")
            for key, value in _service(authority).items():
                extra.setdefault(key, value)
        return extra

    def __call__(self, manager: Any, info: Any, code: int, flags: str, protocol: str,
                 duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        args = (info, code, flags, protocol, duration_ms, request_bytes, response_bytes)
        extra = self.labels(manager)
        drop = self.config.drop
        if not self.config.tags_to_remove:
            istio_metrics.request_done(*args, reporter=self.config.reporter, extra=extra,
                                       drop=drop)
            return
        # Families that remove different tags are recorded separately.
        groups: dict[frozenset[str], set[str]] = {}
        for family in _HTTP_FAMILIES:
            groups.setdefault(self.config.removed(family), set()).add(family)
        for removed, families in groups.items():
            istio_metrics.request_done(
                *args, reporter=self.config.reporter,
                extra={**extra, **{tag: "" for tag in removed}},
                drop=drop | (set(_HTTP_FAMILIES) - families))


@implementer(IStreamDecoderFilter)
class IstioStatsFilter(PassThroughDecoderFilter):
    """One per request: it only hands the connection manager its report."""

    def __init__(self, config: StatsConfig) -> None:
        self.config = config

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        # Now, not in decodeHeaders: requests an earlier filter answers are reported too.
        callbacks.streamInfo().istio_stats = RequestReport(self.config, callbacks.connection())


@implementer(IPlugin, IHTTPFilterExtension)
class IstioStatsExtension:
    name = NAME
    typeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> StatsConfig:
        return parse_stats_config(config, path, context, NAME)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], IstioStatsFilter]:
        return lambda: IstioStatsFilter(parsed)


__all__ = ["IstioStatsExtension", "IstioStatsFilter", "RequestReport"]
