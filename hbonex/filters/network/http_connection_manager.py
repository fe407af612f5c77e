"""
``envoy.filters.network.http_connection_manager``: terminates HTTP on a connection.  For HBONE
it terminates CONNECT (HTTP/2 streams or HTTP/1.1) and hands each tunnel to the router.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from hbonex.h2.settings import H2Settings
from hbonex.http.connection_manager import DEFAULT_OPTIONS, HttpOptions, HttpStreamFactory
from hbonex.http.routing import ConnectRouter
from hbonex.interfaces import INetworkFilter, INetworkFilterCallbacks
from hbonex.observability.stats import STATS
from hbonex.tunnel.server import H1TunnelServer, H2TunnelServer, SniffingCodec, TunnelLog

log = Logger(namespace="hbonex.hcm")


@attrs.define
class HttpConnectionManagerConfig:
    stat_prefix: str
    router: Any  # ConnectRouter or RouteConfig
    runtime: Any
    codec_type: str = "AUTO"  # AUTO, HTTP1, HTTP2
    h2_settings: H2Settings = H2Settings()
    stream_idle_timeout: float = 300.0
    max_requests_per_connection: int = 0
    access_log: Sequence[Callable[[dict[str, str]], None]] = ()
    #: The configured HTTP filters before the router, one factory each.
    http_filters: Sequence[Callable[[], Any]] = ()
    #: The connection manager's own request handling (request ids, x-forwarded-for, paths).
    http_options: HttpOptions = DEFAULT_OPTIONS
    #: Envoy's access_log_options for tunnels: a record every interval (0: only at the end),
    #: and one when a tunnel is established.
    access_log_flush_interval: float = 0.0
    flush_log_on_tunnel_established: bool = False
    tunnels: TunnelLog = attrs.field(
        default=attrs.Factory(lambda self: TunnelLog(
            self.access_log, self.access_log_flush_interval,
            self.flush_log_on_tunnel_established), takes_self=True)
    )

    def __attrs_post_init__(self) -> None:
        STATS.add_source(self)

    def stats_values(self) -> dict[str, int]:
        t, prefix = self.tunnels, f"http.{self.stat_prefix}"
        return {
            f"{prefix}.downstream_cx_upgrades_total": t.opened,
            f"{prefix}.downstream_cx_upgrades_active": t.active,
            f"{prefix}.tunnels_refused": t.refused,
            f"{prefix}.downstream_cx_rx_bytes_total": t.bytes_in,
            f"{prefix}.downstream_cx_tx_bytes_total": t.bytes_out,
        }


@implementer(INetworkFilter)
class HttpConnectionManagerFilter:
    def __init__(self, config: HttpConnectionManagerConfig) -> None:
        self.config = config

    def onNewConnection(self, callbacks: INetworkFilterCallbacks) -> bool:
        config = self.config
        info = callbacks.info
        reactor = config.runtime.reactor

        # A route table serves ordinary requests through the filter chain; the CLI's
        # ConnectRouter tunnels only (anything else is 405, logged as a refused tunnel).
        http = None if isinstance(config.router, ConnectRouter) else HttpStreamFactory(
            reactor, config.router, config.runtime.http_pool, info,
            filter_factories=config.http_filters,
            access_log=config.tunnels.record if config.access_log else None,
            options=config.http_options,
            max_request_headers=config.h2_settings.max_header_list_size,
            stat_prefix=config.stat_prefix,
            stream_idle_timeout=config.stream_idle_timeout,
            upgrades=config.tunnels,
        )

        def h2() -> H2TunnelServer:
            return H2TunnelServer(
                config.h2_settings, reactor, config.router, info, config.tunnels,
                max_requests_per_connection=config.max_requests_per_connection,
                connections=config.runtime.server_connections, http=http,
            )

        def h1() -> H1TunnelServer:
            return H1TunnelServer(
                reactor, config.router, info, config.tunnels,
                http=http, idle_timeout=config.stream_idle_timeout,
                connections=config.runtime.server_connections,
            )

        alpn = info.negotiatedProtocol
        codec: Any
        if config.codec_type == "HTTP2" or alpn == b"h2":
            codec = h2()
        elif config.codec_type == "HTTP1" or alpn == b"http/1.1":
            codec = h1()
        else:
            codec = SniffingCodec(h2, h1)
        callbacks.takeOver(codec)
        return False

    def onData(self, data: bytes, endStream: bool) -> bool:
        return True

    def onClose(self, reason: object) -> None:
        pass


def http_connection_manager_factory(
    config: HttpConnectionManagerConfig,
) -> Callable[[], HttpConnectionManagerFilter]:
    return lambda: HttpConnectionManagerFilter(config)


__all__ = ["HttpConnectionManagerConfig", "HttpConnectionManagerFilter"]
