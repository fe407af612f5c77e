"""
Configuration of ``envoy.filters.network.http_connection_manager`` (Envoy's
HttpConnectionManager message) and the ``envoy.filters.http.router`` HTTP filter, as plugins.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.http_connection_manager import (
    HttpConnectionManagerConfig,
    HttpConnectionManagerFilter,
    http_connection_manager_factory,
)
from hbonex.interfaces import IHTTPFilterExtension, INetworkFilterExtension
from hbonex.route_config import parse_route_config
from hbonex.yamlpath import Node

__all__ = ["HttpConnectionManagerExtension", "RouterExtension", "parse_http_connection_manager"]

HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = "envoy.filters.http.router"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
CODECS = ("AUTO", "HTTP1", "HTTP2")


def _has_field(name: str) -> bool:
    return any(f.name == name for f in attrs.fields(HttpConnectionManagerConfig))


def parse_http_connection_manager(node: Node, context: Any) -> HttpConnectionManagerConfig:
    node.expect_map()
    stat_prefix = node.str_field("stat_prefix", required=True)
    codec = node.str_field("codec_type", "AUTO", choices=(*CODECS, "HTTP3"))
    if codec == "HTTP3":
        raise node.error("codec_type HTTP3 is not supported", "codec_type")
    connect_enabled = False
    for upgrade in node.list_field("upgrade_configs"):
        upgrade.expect_map()
        kind = upgrade.str_field("upgrade_type", required=True)
        if kind.upper() != "CONNECT":
            raise upgrade.error(
                f"upgrade_type {kind!r} is not supported; accepted: CONNECT", "upgrade_type"
            )
        connect_enabled = upgrade.bool_field("enabled", True)
        upgrade.finish()
    kind, value = node.oneof("route_config", "rds", "scoped_routes")  # type: ignore[misc]
    if kind != "route_config":
        raise node.error(f"{kind} is not supported; use an inline route_config", kind)
    router = parse_route_config(value, context, connect_enabled=connect_enabled)
    filters = node.list_field("http_filters", required=True)
    extra: dict[str, Any] = {}
    http_filters = []
    for index, item in enumerate(filters):
        plugin, parsed, _ = context.parse_extension(item, IHTTPFilterExtension, "HTTP filter")
        last = index == len(filters) - 1
        if plugin.name == ROUTER and not last:
            raise item.error(f"{ROUTER} must be the last HTTP filter")
        if last and plugin.name != ROUTER:
            raise item.error(f"the last HTTP filter must be {ROUTER}, not {plugin.name}")
        if plugin.name != ROUTER:
            http_filters.append(plugin.filterFactory(parsed, context))
    if http_filters:
        if not _has_field("http_filters"):
            raise filters[0].error(
                "HTTP filters other than the router are not supported by this "
                "http_connection_manager yet"
            )
        extra["http_filters"] = tuple(http_filters)
    h2, _ = context.h2_settings(node.map_field("http2_protocol_options"), server=True)
    max_requests = 0
    common = node.map_field("common_http_protocol_options")
    if common is not None:
        max_requests = common.int_field("max_requests_per_connection", 0, minimum=0)
        common.finish()
    logs = node.list_field("access_log")
    if logs:
        if not _has_field("access_log"):
            raise node.error(
                "access_log is not supported by this http_connection_manager yet "
                "(tcp_proxy has it)", "access_log",
            )
        from hbonex.access_log import parse_access_logs

        extra["access_log"] = tuple(parse_access_logs(logs, context))
    config = HttpConnectionManagerConfig(
        stat_prefix=stat_prefix,
        router=router,
        runtime=context.runtime,
        codec_type=codec,
        h2_settings=h2,
        stream_idle_timeout=node.duration_field("stream_idle_timeout", 300.0),
        max_requests_per_connection=max_requests,
        **extra,
    )
    node.finish()
    return config


@implementer(IPlugin, INetworkFilterExtension)
class HttpConnectionManagerExtension:
    name = HCM
    typeUrls = (HCM_TYPE,)
    terminal = True

    def parseConfig(self, config: dict[str, Any], path: str, context: Any
                    ) -> HttpConnectionManagerConfig:
        return parse_http_connection_manager(context.node(config, path), context)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], HttpConnectionManagerFilter]:
        return http_connection_manager_factory(parsed)

    def describe(self, parsed: HttpConnectionManagerConfig) -> list[str]:
        router = parsed.router
        lines = [f"codec {parsed.codec_type}"
                 + (", CONNECT enabled" if getattr(router, "connect_enabled", False) else "")]
        for vhost in getattr(router, "virtual_hosts", ()):
            lines.append(f"virtual host {vhost.name} [{', '.join(vhost.domains)}]")
            for route in vhost.routes:
                lines.append(f"  {_describe_route(route)}")
        return lines


def _describe_route(route: Any) -> str:
    if route.connect_matcher:
        match = "CONNECT"
    elif route.prefix is not None:
        match = f"prefix {route.prefix}"
    elif route.path is not None:
        match = f"path {route.path}"
    else:
        match = f"regex {route.safe_regex}"
    if route.headers:
        match += " + " + ", ".join(f"header {h.name}" for h in route.headers)
    if route.direct_status is not None:
        return f"{match} -> direct response {route.direct_status}"
    extra = " (upgrade CONNECT)" if route.connect_enabled else ""
    return f"{match} -> cluster {route.cluster.name}{extra}"


@implementer(IPlugin, IHTTPFilterExtension)
class RouterExtension:
    """
    ``envoy.filters.http.router``: the terminal HTTP filter (routing is done by the
    connection manager's route_config).
    """

    name = ROUTER
    typeUrls = (ROUTER_TYPE,)

    def parseConfig(self, config: dict[str, Any], path: str, context: Any) -> None:
        context.node(config, path).finish()
        return None

    def filterFactory(self, parsed: Any, context: Any) -> Callable[[], None]:
        return lambda: None
