"""
Configuration of ``envoy.filters.network.http_connection_manager`` (Envoy's
HttpConnectionManager message) and the ``envoy.filters.http.router`` HTTP filter, as plugins.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.config.route_config import parse_route_config, upgrade_configs
from hbonex.errors import ConfigError
from hbonex.filters.network.http_connection_manager import (
    HttpConnectionManagerConfig,
    HttpConnectionManagerFilter,
    http_connection_manager_factory,
)
from hbonex.http.connection_manager import HttpFilterFactory, HttpOptions
from hbonex.http.path import EscapedSlashes
from hbonex.http.xfcc import ClientCertDetails, ForwardClientCert, XfccPolicy
from hbonex.interfaces import IHTTPFilterExtension, INetworkFilterExtension

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


def parse_http_connection_manager(message: Any, path: str, context: Any
                                  ) -> HttpConnectionManagerConfig:
    if not message.stat_prefix:
        raise context.error(path, "missing required field 'stat_prefix'")
    context.http_stat_prefix = f"http.{message.stat_prefix}."
    codec = message.DESCRIPTOR.fields_by_name["codec_type"].enum_type.values_by_number[
        message.codec_type].name
    if codec not in CODECS:
        raise context.error(path, f"codec_type {codec} is not supported", "codec_type")
    connect_enabled = False
    upgrades = []
    for _, upgrade_kind, enabled in upgrade_configs(message.upgrade_configs,
                                                    f"{path}.upgrade_configs", context):
        if upgrade_kind == "connect":
            connect_enabled = enabled
        else:
            upgrades.append((upgrade_kind, enabled))
    kind = message.WhichOneof("route_specifier")
    if kind is None:
        raise context.error(path, "one of route_config, rds, scoped_routes is required")
    if kind != "route_config":
        raise context.error(path, f"{kind} is not supported; use an inline route_config", kind)
    # Envoy's runtime guard (layered_runtime): for every HCM of the process.
    from hbonex.config.loader import REJECT_EARLY_CONNECT_DATA

    reject_early = bool(getattr(context, "runtime_values", {}).get(REJECT_EARLY_CONNECT_DATA))
    router = parse_route_config(message.route_config, f"{path}.route_config", context,
                                connect_enabled=connect_enabled, reject_early_data=reject_early,
                                upgrades=tuple(upgrades))
    filters = message.http_filters
    if not filters:
        raise context.error(f"{path}.http_filters" if context.has(f"{path}.http_filters")
                            else path, "must not be empty" if context.has(
                                f"{path}.http_filters") else "missing required field "
                            "'http_filters'")
    extra: dict[str, Any] = {}
    http_filters = []
    # HTTP filters name their stats after the connection manager's (Envoy's http.<prefix>.).
    previous_prefix = getattr(context, "http_stat_prefix", "http.")
    context.http_stat_prefix = f"http.{message.stat_prefix}."
    for index, item in enumerate(filters):
        item_path = f"{path}.http_filters[{index}]"
        if item.is_optional and not _known(item, item_path, context):
            continue
        plugin, parsed, _ = context.parse_extension(item, item_path, IHTTPFilterExtension,
                                                    "HTTP filter")
        last = index == len(filters) - 1
        if plugin.name == ROUTER and not last:
            raise context.error(item_path, f"{ROUTER} must be the last HTTP filter")
        if last and plugin.name != ROUTER:
            raise context.error(item_path,
                                f"the last HTTP filter must be {ROUTER}, not {plugin.name}")
        if plugin.name != ROUTER:
            http_filters.append(HttpFilterFactory(
                item.name or plugin.name, plugin.filterFactory(parsed, context),
                disabled=item.disabled))
    context.http_stat_prefix = previous_prefix
    if http_filters:
        if not _has_field("http_filters"):
            raise context.error(
                f"{path}.http_filters[0]", "HTTP filters other than the router are not "
                "supported by this http_connection_manager yet"
            )
        extra["http_filters"] = tuple(http_filters)
    options = message.http2_protocol_options if message.HasField(
        "http2_protocol_options") else None
    h2, _ = context.h2_settings(options, f"{path}.http2_protocol_options", server=True)
    if message.HasField("max_request_headers_kb"):
        kb = message.max_request_headers_kb.value
        if not 1 <= kb <= 8192:
            raise context.error(f"{path}.max_request_headers_kb",
                                f"must be between 1 and 8192, got {kb}")
        h2 = attrs.evolve(h2, max_header_list_size=kb * 1024)
    max_requests = 0
    if message.HasField("common_http_protocol_options"):
        common = message.common_http_protocol_options
        common_path = f"{path}.common_http_protocol_options"
        if common.HasField("idle_timeout"):
            raise context.error(common_path, "idle_timeout is not implemented for "
                                "http_connection_manager (stream_idle_timeout is)",
                                "idle_timeout")
        if common.HasField("max_requests_per_connection"):
            max_requests = common.max_requests_per_connection.value
    if message.access_log:
        if not _has_field("access_log"):
            raise context.error(
                path, "access_log is not supported by this http_connection_manager yet "
                "(tcp_proxy has it)", "access_log",
            )
        from hbonex.observability.access_log import parse_access_logs

        extra["access_log"] = tuple(parse_access_logs(message.access_log, f"{path}.access_log",
                                                      context))
    # access_log_options (or the deprecated access_log_flush_interval): for tunnels, a record
    # every interval while they last, and one when each is established.
    options = message.access_log_options
    where = f"{path}.access_log_options.access_log_flush_interval"
    flush = options.access_log_flush_interval if message.HasField("access_log_options") else None
    if flush is None and message.HasField("access_log_flush_interval"):
        flush, where = message.access_log_flush_interval, f"{path}.access_log_flush_interval"
    if flush is not None:
        extra["access_log_flush_interval"] = flush.seconds + flush.nanos / 1e9
        if 0 < extra["access_log_flush_interval"] < 0.001:
            raise context.error(where, "must be at least 1ms (Envoy's minimum)")
    extra["flush_log_on_tunnel_established"] = (
        options.flush_log_on_tunnel_successfully_established)
    idle = 300.0
    if message.HasField("stream_idle_timeout"):
        idle = message.stream_idle_timeout.seconds + message.stream_idle_timeout.nanos / 1e9
    _request_id_extension(message, path, context)
    extra["http_options"] = _http_options(message)
    return HttpConnectionManagerConfig(
        stat_prefix=message.stat_prefix,
        router=router,
        runtime=context.runtime,
        codec_type=codec,
        h2_settings=h2,
        stream_idle_timeout=idle,
        max_requests_per_connection=max_requests,
        **extra,
    )


def _known(item: Any, path: str, context: Any) -> bool:
    """
    Whether an ``is_optional`` HTTP filter is one hbonex has; if not, Envoy's rule: a proxy
    without that extension skips it (one warning).
    """
    try:
        context.resolve(item, path, IHTTPFilterExtension, "HTTP filter")
    except ConfigError:
        what = item.typed_config.type_url if item.HasField("typed_config") else item.name
        context.warn(path, f"optional HTTP filter {item.name or what!r} skipped: hbonex has "
                     f"no HTTP filter {what!r} (is_optional: true)")
        return False
    return True


def _enum_name(message: Any, field: str) -> str:
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    return descriptor.enum_type.values_by_number[getattr(message, field)].name  # type: ignore


UUID_REQUEST_ID = "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"


def _request_id_extension(message: Any, path: str, context: Any) -> None:
    """
    request_id_extension: Envoy's UUID extension is what hbonex does (its tracing options
    warn, from the support table); any other would generate ids differently.
    """
    if not message.HasField("request_id_extension"):
        return
    typed = message.request_id_extension.typed_config
    if typed.type_url != UUID_REQUEST_ID:
        raise context.error(f"{path}.request_id_extension.typed_config",
                            f"request ID extension {typed.type_url or '(none)'} is not "
                            f"supported; use {UUID_REQUEST_ID}")


def _xfcc(message: Any) -> XfccPolicy:
    mode = ForwardClientCert(_enum_name(message, "forward_client_cert_details"))
    details = ClientCertDetails()
    if message.HasField("set_current_client_cert_details"):
        d = message.set_current_client_cert_details
        details = ClientCertDetails(subject=d.subject.value, cert=d.cert, chain=d.chain,
                                    dns=d.dns, uri=d.uri)
    return XfccPolicy(mode, details)


def _http_options(message: Any) -> HttpOptions:
    """The connection manager's own request handling (Envoy's defaults where unset)."""
    kwargs: dict[str, Any] = {
        "server_header_transformation": _enum_name(message, "server_header_transformation"),
        "always_set_request_id_in_response": message.always_set_request_id_in_response,
        "skip_xff_append": message.skip_xff_append,
        "merge_slashes": message.merge_slashes,
        "escaped_slashes": EscapedSlashes(
            _enum_name(message, "path_with_escaped_slashes_action").replace(
                "IMPLEMENTATION_SPECIFIC_DEFAULT", "KEEP_UNCHANGED")
        ),
    }
    if message.server_name:
        kwargs["server_name"] = message.server_name.encode()
    if message.HasField("generate_request_id"):
        kwargs["generate_request_id"] = message.generate_request_id.value
    if message.HasField("use_remote_address"):
        kwargs["use_remote_address"] = message.use_remote_address.value
    if message.HasField("normalize_path"):
        kwargs["normalize_path"] = message.normalize_path.value
    if message.HasField("common_http_protocol_options"):
        kwargs["headers_with_underscores"] = _enum_name(
            message.common_http_protocol_options, "headers_with_underscores_action")
    kwargs["xfcc"] = _xfcc(message)
    for field in ("request_timeout", "request_headers_timeout"):
        if message.HasField(field):
            value = getattr(message, field)
            kwargs[field] = value.seconds + value.nanos / 1e9
    return HttpOptions(**kwargs)


@implementer(IPlugin, INetworkFilterExtension)
class HttpConnectionManagerExtension:
    name = HCM
    typeUrls = (HCM_TYPE,)
    terminal = True

    def parseConfig(self, config: Any, path: str, context: Any
                    ) -> HttpConnectionManagerConfig:
        return parse_http_connection_manager(config, path, context)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], HttpConnectionManagerFilter]:
        return http_connection_manager_factory(parsed)

    def describe(self, parsed: HttpConnectionManagerConfig) -> list[str]:
        router = parsed.router
        lines = [f"codec {parsed.codec_type}"
                 + (", CONNECT enabled" if getattr(router, "connect_enabled", False) else "")
                 + "".join(f", upgrade {kind} {'enabled' if on else 'disabled'}"
                           for kind, on in getattr(router, "upgrades", ()))]
        filters = [getattr(f, "name", "?") + (" (disabled)" if getattr(f, "disabled", False)
                                              else "") for f in parsed.http_filters]
        lines.append("http filters: " + ", ".join([*filters, ROUTER]))
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
    extra += "".join(f" (upgrade {kind}{'' if on else ' disabled'})"
                     for kind, on in route.upgrades)
    return f"{match} -> cluster {route.cluster.name}{extra}"


@implementer(IPlugin, IHTTPFilterExtension)
class RouterExtension:
    """
    ``envoy.filters.http.router``: the terminal HTTP filter (routing is done by the
    connection manager's route_config).
    """

    name = ROUTER
    typeUrls = (ROUTER_TYPE,)

    def parseConfig(self, config: Any, path: str, context: Any) -> None:
        return None

    def filterFactory(self, parsed: Any, context: Any) -> Callable[[], None]:
        return lambda: None
