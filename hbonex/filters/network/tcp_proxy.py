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
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.errors import status_and_reason
from hbonex.http.stream_info import existing_dynamic_metadata, existing_filter_state
from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks, INetworkFilterExtension
from hbonex.network.relay import Relay
from hbonex.observability.formatter import Template
from hbonex.observability.stats import STATS
from hbonex.upstream.cluster import UpstreamRequest

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
    downstream_paused: int = 0
    upstream_paused: int = 0

    def count_pause(self, end: str) -> None:
        """A relay paused reading from its ``end`` ("downstream" or "upstream")."""
        if end == "downstream":
            self.downstream_paused += 1
        else:
            self.upstream_paused += 1


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
    #: Envoy's access_log_options: a record every interval while the connection lasts
    #: (0: only at the end), and one when the upstream connection is made.
    access_log_flush_interval: float = 0.0
    flush_access_log_on_connected: bool = False
    stats: TcpProxyStats = attrs.Factory(TcpProxyStats)

    def __attrs_post_init__(self) -> None:
        STATS.add_source(self)

    def stats_values(self) -> dict[str, int]:
        s, prefix = self.stats, f"tcp.{self.stat_prefix}"
        return {
            f"{prefix}.downstream_cx_total": s.downstream_cx_total,
            f"{prefix}.downstream_cx_active": s.downstream_cx_active,
            f"{prefix}.downstream_cx_rx_bytes_total": s.bytes_up,
            f"{prefix}.downstream_cx_tx_bytes_total": s.bytes_down,
            f"{prefix}.upstream_connect_fail": s.upstream_connect_fail,
            f"{prefix}.downstream_flow_control_paused_reading_total": s.downstream_paused,
            f"{prefix}.upstream_flow_control_paused_reading_total": s.upstream_paused,
        }

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


def _shared_state(info: Any) -> Any:
    state = existing_filter_state(info)
    return (state.shared_with_upstream() if state is not None and not state.is_empty()
            else None)


def traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


@implementer(INetworkFilter)
class TcpProxyFilter:
    """
    One per downstream connection.
    """

    __slots__ = ("config", "callbacks", "relay", "_attempt", "_pending", "_started",
                 "_duration_call", "_flush_call", "status", "upstream_host", "cluster_name",
                 "target", "__weakref__")

    def __init__(self, config: TcpProxyConfig) -> None:
        self.config = config
        self.callbacks: INetworkFilterCallbacks | None = None
        self.relay: Relay | None = None
        self._attempt = 0
        self._pending: defer.Deferred[Any] | None = None
        self._started = time.monotonic()
        self._duration_call: Any = None
        self._flush_call: Any = None
        self.status = ""
        self.upstream_host = ""
        self.cluster_name = ""

    def onNewConnection(self, callbacks: INetworkFilterCallbacks) -> bool:
        self.callbacks = callbacks
        config = self.config
        config.stats.downstream_cx_total += 1
        config.stats.downstream_cx_active += 1
        relay = self.relay = Relay(config.runtime.reactor, config.idle_timeout, self._done)
        relay.stats = config.stats
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
            filter_state=_shared_state(info),
            downstream_metadata=existing_dynamic_metadata(info) or None,
            downstream_state=existing_filter_state(info),
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
        if self.config.access_log:
            if self.config.flush_access_log_on_connected:
                self._log("TcpUpstreamConnected")
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        interval = self.config.access_log_flush_interval
        if interval > 0:
            self._flush_call = self.config.runtime.reactor.callLater(interval, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if self.relay is not None and not self.relay.done:
            self._log("TcpPeriodic")
            self._schedule_flush()

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
        status, reason = status_and_reason(error)
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
        for call in (self._duration_call, self._flush_call):
            if call is not None and call.active():
                call.cancel()
        self._log("TcpConnectionEnd")

    def _log(self, kind: str) -> None:
        """One access record (Envoy's AccessLogType ``kind``); bytes so far."""
        relay = self.relay
        if not self.config.access_log or self.callbacks is None or relay is None:
            return
        record = self.callbacks.info.substitutions()
        record.update(
            access_log_type=kind,
            upstream_host=self.upstream_host,
            upstream_cluster=self.cluster_name,
            response_code=self.status,
            bytes_received=str(relay.a.bytes_in),
            bytes_sent=str(relay.b.bytes_in),
            duration_ms=str(int((time.monotonic() - self._started) * 1000)),
            termination=relay.close_reason or "",
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
    if getattr(info, "localAddressRestored", False):
        # A listener filter (original_dst) restored where the client meant to go: Envoy's
        # ORIGINAL_DST uses that over anything an earlier hop knew.
        return info.localAddress  # type: ignore[no-any-return]
    upstream = getattr(info, "upstream_request", None)
    if upstream is not None and upstream.original_destination:
        return upstream.original_destination  # type: ignore[no-any-return]
    return info.localAddress  # type: ignore[no-any-return]


def tcp_proxy_factory(config: TcpProxyConfig) -> Callable[[], TcpProxyFilter]:
    return lambda: TcpProxyFilter(config)


# -- configuration (Envoy's TcpProxy message) --------------------------------------------------

TCP_PROXY = "envoy.filters.network.tcp_proxy"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
APPEND_ACTIONS = {
    "APPEND_IF_EXISTS_OR_ADD": True,
    "ADD_IF_ABSENT": False,
    "OVERWRITE_IF_EXISTS_OR_ADD": False,
}


def parse_tcp_proxy(message: Any, path: str, context: Any) -> TcpProxyConfig:
    """
    A TcpProxy message (``typed_config`` at YAML ``path``) -> TcpProxyConfig; ``context`` is
    an hbonex.config.ConfigContext.
    """
    if not message.stat_prefix:
        raise context.error(path, "missing required field 'stat_prefix'")
    kind = message.WhichOneof("cluster_specifier")
    clusters: list[WeightedCluster] = []
    used = []
    if kind == "cluster":
        used.append(context.cluster(message.cluster, path, "cluster"))
        clusters.append(WeightedCluster(used[0].name, 1))
    elif kind == "weighted_clusters":
        where = f"{path}.weighted_clusters"
        if not message.weighted_clusters.clusters:
            raise context.error(where, "missing required field 'clusters'")
        for index, entry in enumerate(message.weighted_clusters.clusters):
            entry_path = f"{where}.clusters[{index}]"
            cluster = context.cluster(entry.name, entry_path, "name")
            if entry.weight < 1:
                raise context.error(entry_path, f"weight must be at least 1, got {entry.weight}",
                                    "weight")
            used.append(cluster)
            clusters.append(WeightedCluster(cluster.name, entry.weight))
    else:
        raise context.error(path, "one of cluster, weighted_clusters is required")
    tunneling = None
    if message.HasField("tunneling_config"):
        tunneling = _tunneling_config(message.tunneling_config, f"{path}.tunneling_config",
                                      context)
        for cluster in used:
            context.use_for_tunneling(cluster, f"{path}.tunneling_config")
    from hbonex.observability.access_log import parse_access_logs

    attempts = message.max_connect_attempts.value if message.HasField(
        "max_connect_attempts") else 1
    if attempts < 1:
        raise context.error(f"{path}.max_connect_attempts", f"must be at least 1, got {attempts}")
    config = TcpProxyConfig(
        stat_prefix=message.stat_prefix,
        clusters=clusters,
        runtime=context.runtime,
        idle_timeout=_seconds(message, "idle_timeout", 3600.0),
        max_connect_attempts=attempts,
        max_downstream_connection_duration=_seconds(
            message, "max_downstream_connection_duration", 0.0),
        tunneling=tunneling,
        access_log=parse_access_logs(message.access_log, f"{path}.access_log", context),
    )
    # access_log_options, or the deprecated fields it replaced.
    options = message.access_log_options
    if message.HasField("access_log_options"):
        config.access_log_flush_interval = _seconds(options, "access_log_flush_interval", 0.0)
        config.flush_access_log_on_connected = options.flush_access_log_on_connected
        where = f"{path}.access_log_options.access_log_flush_interval"
    else:
        config.access_log_flush_interval = _seconds(message, "access_log_flush_interval", 0.0)
        config.flush_access_log_on_connected = message.flush_access_log_on_connected
        where = f"{path}.access_log_flush_interval"
    if 0 < config.access_log_flush_interval < 0.001:
        raise context.error(where, "must be at least 1ms (Envoy's minimum)")
    return config


def _seconds(message: Any, field: str, default: float) -> float:
    if not message.HasField(field):
        return default
    value = getattr(message, field)
    return float(value.seconds + value.nanos / 1e9)


def _tunneling_config(message: Any, path: str, context: Any) -> TunnelingConfig:
    if not message.hostname:
        raise context.error(path, "missing required field 'hostname'")
    hostname = context.template(message.hostname, f"{path}.hostname")
    headers = []
    for index, option in enumerate(message.headers_to_add):
        option_path = f"{path}.headers_to_add[{index}]"
        if not option.HasField("header"):
            raise context.error(option_path, "missing required field 'header'")
        header_path = f"{option_path}.header"
        key = option.header.key
        if not key:
            raise context.error(header_path, "missing required field 'key'")
        if key.startswith(":") or key.lower() == "host":
            raise context.error(header_path, f"header {key!r} cannot be added", "key")
        value = context.template(option.header.value, f"{header_path}.value")
        if option.HasField("append") and context.has(f"{option_path}.append_action"):
            raise context.error(option_path, "only one of append, append_action may be set",
                                "append_action")
        append = option.append.value if option.HasField("append") else True
        if context.has(f"{option_path}.append_action") or option.append_action:
            action = option.DESCRIPTOR.fields_by_name["append_action"].enum_type
            append = APPEND_ACTIONS[action.values_by_number[option.append_action].name]
        headers.append(HeaderToAdd(key.lower(), value, append))
    post_path = message.post_path or None
    if post_path is not None:
        if not message.use_post:
            raise context.error(path, "post_path can only be set with use_post: true",
                                "post_path")
        if not post_path.startswith("/"):
            raise context.error(path, f"post_path must start with '/', got {post_path!r}",
                                "post_path")
    return TunnelingConfig(
        hostname=hostname,
        headers_to_add=tuple(headers),
        use_post=message.use_post,
        post_path=post_path or "/",
        propagate_response_headers=message.propagate_response_headers,
    )


@implementer(IPlugin, INetworkFilterExtension)
class TcpProxyExtension:
    """
    The ``envoy.filters.network.tcp_proxy`` plugin (registered in
    twisted/plugins/hbonex_extensions.py).
    """

    name = TCP_PROXY
    typeUrls = (TCP_PROXY_TYPE,)
    terminal = True

    def parseConfig(self, config: Any, path: str, context: Any) -> TcpProxyConfig:
        return parse_tcp_proxy(config, path, context)

    def filterFactory(self, parsed: Any, context: Any) -> Callable[[], TcpProxyFilter]:
        return tcp_proxy_factory(parsed)

    def describe(self, parsed: TcpProxyConfig) -> list[str]:
        clusters = ", ".join(
            c.name if len(parsed.clusters) == 1 else f"{c.name} (weight {c.weight})"
            for c in parsed.clusters
        )
        if parsed.tunneling is None:
            return [f"-> cluster {clusters}"]
        how = "POST" if parsed.tunneling.use_post else "CONNECT"
        return [f"-> {how} {parsed.tunneling.hostname.text} via cluster {clusters}"]


__all__ = [
    "HeaderToAdd",
    "TcpProxyConfig",
    "TcpProxyExtension",
    "TcpProxyFilter",
    "parse_tcp_proxy",
    "TunnelingConfig",
    "WeightedCluster",
    "tcp_proxy_factory",
]
