"""
``envoy.filters.network.tcp_proxy``: relay a downstream connection to a cluster, directly or
(with ``tunneling_config``) through an HTTP CONNECT tunnel.

The downstream is paused until the upstream answers; bytes that were already on their way are
held (bounded by one read) and delivered in order once the tunnel is up.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Sequence

import attrs
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.cluster import UpstreamRequest
from hbonex.errors import UpstreamError
from hbonex.formatter import Template
from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks
from hbonex.relay import Relay

log = Logger(namespace="hbonex.tcp_proxy")


@attrs.frozen
class HeaderToAdd:
    key: str
    value: Template
    append: bool = True


@attrs.frozen
class TunnelingConfig:
    hostname: Template
    headers_to_add: tuple[HeaderToAdd, ...] = ()
    use_post: bool = False
    post_path: str = "/"
    propagate_response_headers: bool = False
    #: hbonex: add a W3C traceparent to each CONNECT (ztunnel does) unless one is configured.
    traceparent: bool = True


@attrs.frozen
class WeightedCluster:
    name: str
    weight: int


@attrs.define
class TcpProxyStats:
    downstream_cx_total: int = 0
    downstream_cx_active: int = 0
    upstream_connect_fail: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@attrs.define
class TcpProxyConfig:
    stat_prefix: str
    clusters: Sequence[WeightedCluster]
    runtime: Any
    idle_timeout: float = 3600.0
    max_connect_attempts: int = 1
    max_downstream_connection_duration: float = 0.0
    tunneling: TunnelingConfig | None = None
    access_log: Sequence[Callable[[dict[str, str]], None]] = ()
    stats: TcpProxyStats = attrs.Factory(TcpProxyStats)

    def pick_cluster(self) -> str:
        if len(self.clusters) == 1:
            return self.clusters[0].name
        total = sum(c.weight for c in self.clusters)
        point = random.uniform(0, total)
        for c in self.clusters:
            point -= c.weight
            if point <= 0:
                return c.name
        return self.clusters[-1].name


def traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


@implementer(INetworkFilter)
class TcpProxyFilter:
    """
    One per downstream connection.
    """

    def __init__(self, config: TcpProxyConfig) -> None:
        self.config = config
        self.callbacks: INetworkFilterCallbacks | None = None
        self.relay: Relay | None = None
        self._attempt = 0
        self._pending: defer.Deferred[Any] | None = None
        self._started = time.monotonic()
        self._duration_call: Any = None
        self.status = ""
        self.upstream_host = ""
        self.cluster_name = ""

    def onNewConnection(self, callbacks: INetworkFilterCallbacks) -> bool:
        self.callbacks = callbacks
        config = self.config
        config.stats.downstream_cx_total += 1
        config.stats.downstream_cx_active += 1
        relay = self.relay = Relay(config.runtime.reactor, config.idle_timeout, self._done)
        callbacks.takeOver(relay.a)
        # Nothing is read from downstream until the upstream answered.
        callbacks.transport.pauseProducing()
        self._connect()
        if config.max_downstream_connection_duration > 0:
            self._duration_call = config.runtime.reactor.callLater(
                config.max_downstream_connection_duration, self._too_long
            )
        return False

    def _connect(self) -> None:
        assert self.callbacks is not None and self.relay is not None
        config = self.config
        info = self.callbacks.info
        self._attempt += 1
        self.cluster_name = config.pick_cluster()
        cluster = config.runtime.clusters[self.cluster_name]
        subs = info.substitutions()
        request = UpstreamRequest(
            original_destination=_original_destination(info),
            downstream_remote=info.remoteAddress,
            downstream_local=info.localAddress,
            peer_identity=info.peerIdentity,
        )
        tunneling = config.tunneling
        if tunneling is None:
            d = cluster.connect_stream(self.relay.b, request)
        else:
            authority = tunneling.hostname.render(subs)
            headers = [(h.key, h.value.render(subs)) for h in tunneling.headers_to_add]
            if tunneling.traceparent and not any(k.lower() == "traceparent" for k, _ in headers):
                headers.append(("traceparent", traceparent()))
            self.target = authority
            d = cluster.open_tunnel(
                self.relay.b, authority, headers, request,
                post_path=tunneling.post_path if tunneling.use_post else None,
            )
        self._pending = d
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, result: Any) -> None:
        self._pending = None
        assert self.relay is not None and self.callbacks is not None
        address = result[0] if isinstance(result, tuple) else result
        self.upstream_host = str(address)
        self.status = "200"
        if self.relay.a.lost:
            # Downstream went away while we were connecting.
            if self.relay.b.transport is not None:
                self.relay.b.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.relay.start()
        self.callbacks.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        assert self.relay is not None and self.callbacks is not None
        if failure.check(defer.CancelledError):
            return
        error = failure.value
        self.config.stats.upstream_connect_fail += 1
        if self._attempt < self.config.max_connect_attempts and not self.relay.a.lost:
            self._connect()
            return
        status = error.status if isinstance(error, UpstreamError) else 503
        reason = error.reason if isinstance(error, UpstreamError) else str(error)
        self.status = str(status)
        info = self.callbacks.info
        log.warn(
            "{prefix}: tunnel for {peer} to {target} via cluster {cluster} failed: "
            "{status} {reason}; closing the downstream connection",
            prefix=self.config.stat_prefix, peer=info.remoteAddress,
            target=getattr(self, "target", "-"), cluster=self.cluster_name, status=status,
            reason=reason,
        )
        self.relay.close_reason = f"upstream failed: {status} {reason}"
        if not self.relay.a.lost:
            self.callbacks.transport.loseConnection()

    def _too_long(self) -> None:
        self._duration_call = None
        if self.relay is not None and not self.relay.done:
            self.relay.close_reason = "max_downstream_connection_duration reached"
            self.relay.abort()

    def _done(self, relay: Relay) -> None:
        stats = self.config.stats
        stats.downstream_cx_active -= 1
        stats.bytes_up += relay.a.bytes_in
        stats.bytes_down += relay.b.bytes_in
        if self._duration_call is not None and self._duration_call.active():
            self._duration_call.cancel()
        if self.config.access_log and self.callbacks is not None:
            record = self.callbacks.info.substitutions()
            record.update(
                upstream_host=self.upstream_host,
                upstream_cluster=self.cluster_name,
                response_code=self.status,
                bytes_received=str(relay.a.bytes_in),
                bytes_sent=str(relay.b.bytes_in),
                duration_ms=str(int((time.monotonic() - self._started) * 1000)),
                termination=relay.close_reason,
            )
            for sink in self.config.access_log:
                sink(record)

    def onData(self, data: bytes, endStream: bool) -> bool:
        # Only reached before takeOver (never, for this filter).
        return True

    def onClose(self, reason: object) -> None:
        # The relay's downstream end hears of it from the listener connection itself.
        if self._pending is not None:
            self._pending.cancel()


def _original_destination(info: Any) -> str | None:
    upstream = getattr(info, "upstream_request", None)
    if upstream is not None and upstream.original_destination:
        return upstream.original_destination  # type: ignore[no-any-return]
    return info.localAddress  # type: ignore[no-any-return]


def tcp_proxy_factory(config: TcpProxyConfig) -> Callable[[], TcpProxyFilter]:
    return lambda: TcpProxyFilter(config)


__all__ = [
    "HeaderToAdd",
    "TcpProxyConfig",
    "TcpProxyFilter",
    "TunnelingConfig",
    "WeightedCluster",
    "tcp_proxy_factory",
    "ierror",
]
