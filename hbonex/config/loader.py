"""
Envoy's v3 ``Bootstrap`` message -> ``hbonex.bootstrap.Bootstrap``.

The YAML becomes Envoy's own messages first (hbonex.config.schema), is checked against the
table of what hbonex implements (hbonex.config.support), and only then are listeners, chains,
filters and clusters built, from the messages.  Network filters, HTTP filters, cluster types
and transport sockets are Twisted plugins (hbonex.extensions) found by ``@type`` or name.
Nothing below ``build_bootstrap`` knows the YAML: a control plane's messages go the same way
(positions are then simply unknown).

Relative file names (certificates, access logs) are relative to the process working directory,
as in Envoy, unless ``base_dir`` is given.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap as BootstrapMessage
from google.protobuf import json_format
from google.protobuf.message import Message
from twisted.logger import Logger

from hbonex import extensions
from hbonex.bootstrap import Bootstrap
from hbonex.config import support
from hbonex.config.matcher_config import MatcherBuilder, listener_predicate
from hbonex.config.schema import TYPED_STRUCTS, Positions, message_class, to_message, type_name
from hbonex.config.yamlpath import MarkedDict, Node, child_path, load_yaml
from hbonex.errors import ConfigError
from hbonex.h2.settings import H2Settings
from hbonex.interfaces import (
    IClusterTypeExtension,
    IHTTPFilterExtension,
    IListenerFilterExtension,
    INetworkFilterExtension,
    ITransportSocketExtension,
)
from hbonex.network.listener import (
    FilterChain,
    FilterChainMatch,
    Listener,
    ListenerFilterEntry,
)
from hbonex.observability.formatter import Template
from hbonex.tls.context import ClientTLS, ServerTLS, TLSSettings
from hbonex.upstream.auto_pool import AUTO_ALPN
from hbonex.upstream.cluster import (
    Address,
    CircuitBreakers,
    Cluster,
    InternalAddress,
    SocketAddress,
)

__all__ = [
    "ConfigContext",
    "LoadedConfig",
    "build_bootstrap",
    "load_bootstrap",
    "load_config",
    "load_message",
]

log = Logger(namespace="hbonex.config")

INTERNAL_LISTENER = "envoy.bootstrap.internal_listener"
INTERNAL_LISTENER_TYPE = (
    "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
)
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = f"type.googleapis.com/{HTTP_OPTIONS}"
DOWNSTREAM_CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"
DOWNSTREAM_CONNECTIONS_TYPE = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
    "DownstreamConnectionsConfig"
)
REJECT_EARLY_CONNECT_DATA = "envoy.reloadable_features.reject_early_connect_data"
GLOBAL_MAX_CONNECTIONS = "overload.global_downstream_max_connections"
#: Worker processes (Envoy's --concurrency is a command-line flag, not in the Bootstrap).
WORKERS = "hbonex.workers"
#: The runtime keys (``layered_runtime`` static layers) hbonex reads, with their types; any
#: other key is a warning.
RUNTIME_KEYS: dict[str, type] = {REJECT_EARLY_CONNECT_DATA: bool, GLOBAL_MAX_CONNECTIONS: int,
                                 WORKERS: int}
DEFAULT_CONNECT_TIMEOUT = 5.0
LB_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "CLUSTER_PROVIDED")

#: Where an Any is an extension of a kind hbonex finds as plugins: (interface, what).
SLOTS: dict[str, tuple[Any, str]] = {
    "envoy.config.listener.v3.Filter": (INetworkFilterExtension, "network filter"),
    "envoy.config.listener.v3.ListenerFilter": (IListenerFilterExtension, "listener filter"),
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter": (
        IHTTPFilterExtension, "HTTP filter"),
    "envoy.config.core.v3.TransportSocket": (ITransportSocketExtension, "transport socket"),
    "envoy.config.cluster.v3.Cluster.CustomClusterType": (IClusterTypeExtension, "cluster type"),
}


def out_of_range(value: int, low: int, high: int) -> Optional[str]:
    """
    The error for ``value`` outside [low, high], or None.
    """
    if value < low:
        return f"must be at least {low}, got {value}"
    if value > high:
        return f"must be at most {high}, got {value}"
    return None


def seconds(duration: Any) -> float:
    """
    A google.protobuf.Duration in seconds.
    """
    return float(duration.seconds + duration.nanos / 1e9)


def wrapped(message: Any, field: str, default: Any) -> Any:
    """
    The value of a wrapper field (``google.protobuf.UInt32Value`` ...), or ``default`` unset.
    """
    return getattr(message, field).value if message.HasField(field) else default


@attrs.define
class FilterInfo:
    """
    One configured network filter: its plugin and parsed configuration.
    """

    name: str
    plugin: Any
    parsed: Any
    path: str


@attrs.define
class ChainInfo:
    chain: FilterChain
    filters: list[FilterInfo]
    path: str
    tls: Optional[TLSSettings] = None


@attrs.define
class ListenerInfo:
    listener: Listener
    chains: list[ChainInfo]
    path: str
    address: str  # "127.0.0.1:9000", "[::1]:9000" or "internal"


@attrs.define
class ClusterInfo:
    cluster: Cluster
    path: str
    alpn_explicit: bool = True


@attrs.define
class LoadedConfig:
    """
    A Bootstrap plus what it was made of (for ``hbonex config check`` and tests).
    """

    bootstrap: Bootstrap
    source: str
    listeners: list[ListenerInfo] = attrs.Factory(list)
    clusters: dict[str, ClusterInfo] = attrs.Factory(dict)
    #: The Envoy Bootstrap message everything was built from.
    message: Optional[BootstrapMessage] = None
    #: Set fields hbonex does not implement but can run without: (path, text with line).
    warnings: list[tuple[str, str]] = attrs.Factory(list)


class ConfigContext:
    """
    What extensions get while building: the reactor and runtime, the clusters declared so far,
    where relative files are, positions for errors, and helpers for the common Envoy types.
    """

    def __init__(
        self, reactor: Any, *, base_dir: Any = None, source: str = "<config>",
        positions: Optional[Positions] = None,
    ) -> None:
        self.reactor = reactor
        self.bootstrap = Bootstrap(reactor)
        self.runtime = self.bootstrap.runtime
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.source = source
        self.positions = positions if positions is not None else Positions()
        self.loaded = LoadedConfig(self.bootstrap, source)
        self.internal_listener_enabled = False
        #: Every listener name in the file -> (path, internal?), known before clusters build.
        self.listener_names: dict[str, tuple[str, bool]] = {}
        #: Runtime values from ``layered_runtime`` static layers (keys in RUNTIME_KEYS).
        self.runtime_values: dict[str, Any] = {}
        #: typed_config '@type' of the extension being parsed (one plugin, several messages).
        self.type_url: Optional[str] = None
        #: The stat prefix of the http_connection_manager whose HTTP filters are being parsed
        #: (``http.<stat_prefix>.``, where Envoy's HTTP filters put their stats).
        self.http_stat_prefix = "http."
        self._nodes: dict[int, Node] = {}
        self._checks: list[Callable[[], None]] = []

    # -- errors and positions -------------------------------------------------------------------

    def error(self, path: str, message: str, key: Optional[str] = None) -> ConfigError:
        """
        A ConfigError at ``path`` (or ``path.key``) with its YAML line when known.
        """
        return self.positions.error(path, message, key)

    def wrap(self, path: str, error: ConfigError) -> ConfigError:
        """
        ``error`` (raised by code that only knew a path) with the line of its path added.
        """
        if "(line " in error.message:
            return error
        where = error.path or path
        line = self.positions.line(where)
        if line is None:
            return ConfigError(where, error.message)
        return ConfigError(where, f"{error.message} (line {line})")

    def has(self, path: str) -> bool:
        """
        Whether the configuration set ``path`` explicitly (for proto3 scalars).
        """
        return self.positions.has(path)

    def warn(self, path: str, text: str) -> None:
        line = self.positions.line(path, key=True)
        message = f"{text} (line {line})" if line is not None else text
        self.loaded.warnings.append((path, message))

    def node(self, config: Any, path: str) -> Node:
        """
        The YAML walker for a plugin's plain config (a TypedStruct's value): the same Node
        each time, so fields read by one parser are known to ``finish()``.
        """
        key = id(config)
        node = self._nodes.get(key)
        if node is None or node.value is not config:
            node = Node(config, path)
            self._nodes[key] = node
        return node

    def later(self, check: Callable[[], None]) -> None:
        """
        Run ``check`` once everything is built (cross references).
        """
        self._checks.append(check)

    def template(self, text: str, path: str) -> Template:
        """
        A string with substitution operators, checked now.
        """
        try:
            return Template(text, path)
        except ConfigError as e:
            raise self.wrap(path, e)

    # -- files ----------------------------------------------------------------------------------

    def file_path(self, name: str) -> Path:
        path = Path(os.path.expanduser(name))
        if self.base_dir is not None and not path.is_absolute():
            return self.base_dir / path
        return path

    def data_source(self, source: Any, path: str) -> tuple[Optional[Path], bytes]:
        """
        An Envoy DataSource: (file path or None, contents); a file is not read here.
        """
        kind = source.WhichOneof("specifier")
        if kind == "filename":
            return self.file_path(source.filename), b""
        if kind == "inline_string":
            return None, source.inline_string.encode()
        if kind == "inline_bytes":
            return None, bytes(source.inline_bytes)
        if kind == "environment_variable":
            name = source.environment_variable
            if name not in os.environ:
                raise self.error(path, f"environment variable {name} is not set",
                                 "environment_variable")
            return None, os.environ[name].encode()
        raise self.error(path, "one of filename, inline_string, inline_bytes, "
                         "environment_variable is required")

    # -- extensions -----------------------------------------------------------------------------

    def resolve(self, extension: Any, path: str, interface: Any, what: str
                ) -> tuple[Any, Any, Optional[str], str]:
        """
        The plugin for an Envoy ``{name, typed_config}`` and its config: the unpacked message,
        or for a TypedStruct its value as YAML (a plain struct).  Returns (plugin, config,
        type URL, config path).
        """
        name = extension.name or None
        config_path = child_path(path, "typed_config")
        if not extension.HasField("typed_config"):
            if name is None:
                raise self.error(path, f"a {what} needs a name or a typed_config")
            try:
                plugin = extensions.resolve(interface, path, name=name, what=what)
            except ConfigError as e:
                raise self.wrap(child_path(path, "name"), e)
            config: Any = plugin_default(plugin)
            return plugin, config, None, config_path
        any_ = extension.typed_config
        type_url = any_.type_url
        full = type_name(type_url)
        if full in TYPED_STRUCTS:
            cls = message_class(full)
            assert cls is not None
            struct = cls()
            any_.Unpack(struct)
            type_url = struct.type_url  # type: ignore[attr-defined]
            value_path = child_path(config_path, "value")
            config = self.positions.raw.get(value_path)
            if not isinstance(config, dict):
                config = MarkedDict(json_format.MessageToDict(struct.value))  # type: ignore
            try:
                plugin = extensions.resolve(interface, path, type_url=type_url, what=what)
            except ConfigError as e:
                raise self.wrap(child_path(config_path, "type_url"), ConfigError(
                    child_path(config_path, "type_url"), e.message))
            return plugin, config, type_url, value_path
        try:
            plugin = extensions.resolve(interface, path, type_url=type_url, what=what)
        except ConfigError as e:
            raise self.wrap(e.path, ConfigError(e.path, e.message))
        cls = message_class(full)
        if cls is None:
            # A plugin's type written without its TypedStruct (the schema step refuses it,
            # but an is_optional HTTP filter is resolved before that).
            raise self.error(config_path, f"{type_url!r} has no compiled Envoy message; put "
                             "its config in a TypedStruct")
        config = cls()
        any_.Unpack(config)
        return plugin, config, type_url, config_path

    def parse_extension(self, extension: Any, path: str, interface: Any, what: str
                        ) -> tuple[Any, Any, str]:
        """
        Resolve and parse an extension; returns (plugin, parsed, config path).
        """
        plugin, config, type_url, config_path = self.resolve(extension, path, interface, what)
        previous, self.type_url = self.type_url, type_url
        try:
            parsed = plugin.parseConfig(config, config_path, self)
        except ConfigError as e:
            raise self.wrap(config_path, e)
        finally:
            self.type_url = previous
        if isinstance(config, dict):
            self.node(config, config_path).finish()
        return plugin, parsed, config_path

    def transport_socket(self, socket: Any, path: str, upstream: bool
                         ) -> tuple[Optional[TLSSettings], Any]:
        """
        A ``transport_socket``: (TLSSettings or None for raw TCP, the parsed config).
        """
        plugin, parsed, config_path = self.parse_extension(
            socket, path, ITransportSocketExtension, "transport socket"
        )
        try:
            settings = plugin.buildTransport(parsed, upstream, self)
        except ConfigError as e:
            raise self.wrap(config_path, e)
        return settings, parsed

    # -- common Envoy types ---------------------------------------------------------------------

    def socket_address(self, address: Any, path: str, *, hostnames: bool,
                       listener: bool = False) -> SocketAddress:
        host = address.address
        if not host:
            raise self.error(path, "missing required field 'address'")
        if address.protocol != 0:  # TCP
            raise self.error(path, "only protocol TCP is supported", "protocol")
        if address.WhichOneof("port_specifier") == "named_port":
            raise self.error(path, "named_port is not supported; use port_value", "named_port")
        port = address.port_value
        if port > 65535:
            raise self.error(child_path(path, "port_value"),
                             f"must be at most 65535, got {port}")
        if not listener and port < 1:
            what = ("missing required field 'port_value'" if not self.has(
                child_path(path, "port_value")) else "must be at least 1, got 0")
            raise self.error(path if "missing" in what else child_path(path, "port_value"),
                             what)
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if not hostnames:
                raise self.error(
                    path,
                    f"malformed IP address {host!r} (a hostname needs a STRICT_DNS or "
                    "LOGICAL_DNS cluster)" if not listener else
                    f"malformed IP address {host!r}", "address",
                )
            if any(c in host for c in " /:@[]"):
                raise self.error(path, f"malformed hostname {host!r}", "address")
        return SocketAddress(host, port)

    def h2_settings(self, options: Any, path: str, *, server: bool
                    ) -> tuple[H2Settings, Optional[int]]:
        """
        ``Http2ProtocolOptions`` (or None) -> (H2Settings, max_concurrent_streams if set).  For
        an upstream (``server=False``) max_concurrent_streams limits streams per pooled
        connection.
        """
        if options is None:
            return H2Settings(), None
        kwargs: dict[str, Any] = {}
        streams = wrapped(options, "max_concurrent_streams", None)
        if streams is not None:
            problem = out_of_range(streams, 1, 2**31 - 1)
            if problem:
                raise self.error(child_path(path, "max_concurrent_streams"), problem)
            if server:
                kwargs["max_concurrent_streams"] = streams
        for key in ("initial_stream_window_size", "initial_connection_window_size"):
            value = wrapped(options, key, None)
            if value is not None:
                problem = out_of_range(value, 65535, 2**31 - 1)
                if problem:
                    raise self.error(child_path(path, key), problem)
                kwargs[key] = value
        for key in (
            "max_outbound_frames", "max_outbound_control_frames",
            "max_consecutive_inbound_frames_with_empty_payload",
            "max_inbound_priority_frames_per_stream",
            "max_inbound_window_update_frames_per_data_frame_sent",
        ):
            value = wrapped(options, key, None)
            if value is not None:
                problem = out_of_range(value, 0 if "consecutive" in key else 1, 2**31 - 1)
                if problem:
                    raise self.error(child_path(path, key), problem)
                kwargs[key] = value
        if options.HasField("connection_keepalive"):
            keepalive = options.connection_keepalive
            where = child_path(path, "connection_keepalive")
            for key in ("interval", "timeout"):
                if not keepalive.HasField(key):
                    raise self.error(where, f"missing required field '{key}'")
            kwargs["keepalive_interval"] = seconds(keepalive.interval)
            kwargs["keepalive_timeout"] = seconds(keepalive.timeout)
        try:
            return H2Settings(**kwargs), streams
        except ValueError as e:
            raise self.error(path, str(e))

    # -- clusters -------------------------------------------------------------------------------

    @property
    def clusters(self) -> dict[str, Cluster]:
        return self.runtime.clusters

    def cluster(self, name: str, path: str, key: str = "cluster") -> Cluster:
        """
        The cluster called ``name``, configured at ``path.key`` (which must exist).
        """
        if not name:
            raise self.error(path, f"missing required field '{key}'")
        cluster = self.clusters.get(name)
        if cluster is None:
            defined = ", ".join(sorted(self.clusters)) or "none"
            raise self.error(path, f"undefined cluster {name!r}; defined clusters: {defined}",
                             key)
        return cluster

    def use_for_tunneling(self, cluster: Cluster, path: str = "") -> None:
        """
        ``cluster`` carries CONNECT tunnels: without HTTP protocol options it speaks HTTP/1.1,
        as Envoy does, and its TLS (unless configured) offers ALPN http/1.1.
        """
        if cluster.upstream_protocol in ("auto", "downstream"):
            info = self.loaded.clusters.get(cluster.name)
            what = ("auto_config" if cluster.upstream_protocol == "auto"
                    else "use_downstream_protocol_config")
            raise self.error(
                path, f"cluster {cluster.name!r} has {what} ({info.path if info else ''}"
                "): hbonex tunnels with one protocol per cluster; give it explicit_http_config "
                "(http2_protocol_options or http_protocol_options)")
        if cluster.upstream_protocol is not None:
            return
        cluster.upstream_protocol = "http1"
        info = self.loaded.clusters.get(cluster.name)
        if cluster.tls is not None and info is not None and not info.alpn_explicit:
            cluster.tls = attrs.evolve(cluster.tls, alpn=(b"http/1.1",))
            cluster.client_tls = ClientTLS(cluster.tls)

    def load_assignment(self, cluster: Any, path: str, *, hostnames: bool
                        ) -> tuple[Address, ...]:
        """
        ``load_assignment.endpoints[].lb_endpoints[].endpoint.address`` of a cluster.
        """
        if not cluster.HasField("load_assignment"):
            return ()
        where = child_path(path, "load_assignment")
        result: list[Address] = []
        for g, group in enumerate(cluster.load_assignment.endpoints):
            for i, lb in enumerate(group.lb_endpoints):
                lb_path = f"{where}.endpoints[{g}].lb_endpoints[{i}]"
                if lb.WhichOneof("host_identifier") != "endpoint":
                    raise self.error(lb_path, "missing required field 'endpoint'")
                endpoint_path = f"{lb_path}.endpoint"
                if not lb.endpoint.HasField("address"):
                    raise self.error(endpoint_path, "missing required field 'address'")
                address = self.address(lb.endpoint.address, f"{endpoint_path}.address",
                                       hostnames=hostnames)
                if lb.HasField("metadata") and lb.metadata.filter_metadata:
                    address = attrs.evolve(address, metadata=filter_metadata(lb.metadata))
                result.append(address)
        return tuple(result)

    def address(self, address: Any, path: str, *, hostnames: bool) -> Address:
        kind = address.WhichOneof("address")
        if kind == "socket_address":
            return self.socket_address(address.socket_address, f"{path}.socket_address",
                                       hostnames=hostnames)
        if kind == "envoy_internal_address":
            return self._internal_address(address.envoy_internal_address,
                                          f"{path}.envoy_internal_address")
        if kind is None:
            raise self.error(path, "one of socket_address, envoy_internal_address is required")
        raise self.error(path, f"{kind} addresses are not supported", kind)

    def _internal_address(self, address: Any, path: str) -> InternalAddress:
        name = address.server_listener_name
        if not name:
            raise self.error(path, "missing required field 'server_listener_name'")

        def check() -> None:
            internal = sorted(n for n, (_, i) in self.listener_names.items() if i)
            known = ", ".join(internal) or "none"
            found = self.listener_names.get(name)
            if found is None:
                raise self.error(
                    path, f"no internal listener named {name!r}; internal listeners: {known}",
                    "server_listener_name",
                )
            if not found[1]:
                raise self.error(
                    path, f"listener {name!r} ({found[0]}) is not an internal listener; "
                    f"internal listeners: {known}", "server_listener_name",
                )

        self.later(check)
        return InternalAddress(name, address.endpoint_id)


def filter_metadata(metadata: Any) -> dict[str, dict[str, Any]]:
    """
    An envoy.config.core.v3.Metadata's ``filter_metadata`` as plain values by namespace.
    """
    return {namespace: json_format.MessageToDict(value)
            for namespace, value in metadata.filter_metadata.items()}


def plugin_default(plugin: Any) -> Any:
    """
    The config of an extension named without typed_config: its message's defaults when the
    plugin names one, else an empty struct.
    """
    for url in plugin.typeUrls:
        cls = message_class(type_name(url))
        if cls is not None:
            return cls()
    return MarkedDict()


# -- loading ------------------------------------------------------------------------------------


def load_bootstrap(path_or_text: Any, reactor: Any, *, base_dir: Any = None) -> Bootstrap:
    """
    The Bootstrap an Envoy v3 bootstrap YAML file or text describes: a ``Path`` or a string
    without a newline is a file name, any other string is the YAML itself.  Raises ConfigError.
    """
    return load_config(path_or_text, reactor, base_dir=base_dir).bootstrap


def read_source(path_or_text: Any) -> tuple[str, str]:
    """
    (source name, YAML text) of a file name or YAML text.
    """
    if isinstance(path_or_text, Path) or (
        isinstance(path_or_text, str) and "\n" not in path_or_text
    ):
        source = str(path_or_text)
        try:
            return source, Path(path_or_text).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("", f"{source}: no such file")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("", f"{source}: cannot read: {getattr(e, 'strerror', None) or e}")
    return "<config>", str(path_or_text)


def load_message(path_or_text: Any) -> tuple[BootstrapMessage, Positions, str]:
    """
    The Envoy Bootstrap message of a YAML file or text, where each path was, and the source.
    """
    source, text = read_source(path_or_text)
    data = load_yaml(text, source)
    if data is None:
        raise ConfigError("", f"{source}: the configuration is empty")
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: expected a mapping at the top level (line 1)")
    positions = Positions()
    message = to_message(data, BootstrapMessage, "", positions, _unknown_type)
    return message, positions, source  # type: ignore[return-value]


def _unknown_type(path: str, type_url: str, parent: str = "") -> ConfigError:
    """
    An ``@type`` no compiled proto defines: in an extension slot, list the plugins' types.
    """
    interface, what = SLOTS.get(parent, (None, ""))
    hint = ""
    if not type_name(type_url).startswith(("envoy.", "xds.", "udpa.", "google.")):
        hint = (" (a config without a compiled proto goes in a TypedStruct: {'@type': "
                "type.googleapis.com/xds.type.v3.TypedStruct, type_url: "
                f"{type_url}, value: {{...}}}})")
    if interface is None:
        return ConfigError(path, f"unknown type {type_url!r}: no Envoy message of that "
                           f"name{hint}")
    known = sorted(url for p in extensions.extensions(interface) for url in p.typeUrls)
    if type_url in known:
        # A plugin's type without a compiled proto: Envoy's way is a TypedStruct.
        return ConfigError(path, (
            f"{what} type {type_url!r} has no compiled Envoy message; put its config in a "
            "TypedStruct: {'@type': type.googleapis.com/xds.type.v3.TypedStruct, type_url: "
            f"{type_url}, value: {{...}}}}"))
    return ConfigError(path, f"unknown {what} type {type_url!r}{hint}; known: "
                       f"{', '.join(known) or 'none'}")


def load_config(path_or_text: Any, reactor: Any, *, base_dir: Any = None) -> LoadedConfig:
    """
    Like load_bootstrap, with what the Bootstrap was made of.
    """
    message, positions, source = load_message(path_or_text)
    return build_bootstrap(message, reactor, base_dir=base_dir, source=source,
                           positions=positions)


def build_bootstrap(message: BootstrapMessage, reactor: Any, *, base_dir: Any = None,
                    source: str = "<config>", positions: Optional[Positions] = None
                    ) -> LoadedConfig:
    """
    The runtime objects an Envoy Bootstrap message describes (from a file or not).
    """
    context = ConfigContext(reactor, base_dir=base_dir, source=source, positions=positions)
    context.loaded.message = message
    context.bootstrap.message = message  # for the admin's /config_dump
    support.check(message, "", context)
    _build(message, context)
    for path, text in context.loaded.warnings:
        log.warn("{path}: {text}", path=path, text=text)
    return context.loaded


def _build(root: BootstrapMessage, context: ConfigContext) -> None:
    if root.HasField("admin"):
        context.bootstrap.admin = json_format.MessageToDict(
            root.admin, preserving_proto_field_name=True)
    for index, ext in enumerate(root.bootstrap_extensions):
        _bootstrap_extension(ext, f"bootstrap_extensions[{index}]", context)
    if root.HasField("layered_runtime"):
        _layered_runtime(root.layered_runtime, "layered_runtime", context)
    _global_connection_limit(root, context)
    context.bootstrap.workers = context.runtime_values.get(WORKERS)
    if not root.HasField("static_resources"):
        raise context.error("", "missing required field 'static_resources'")
    static = root.static_resources
    # Names first: clusters may point at internal listeners declared after them.
    for index, listener in enumerate(static.listeners):
        path = f"static_resources.listeners[{index}]"
        if not listener.name:
            raise context.error(path, "missing required field 'name'")
        if listener.name in context.listener_names:
            first = context.listener_names[listener.name][0]
            raise context.error(
                path, f"duplicate listener name {listener.name!r} (also {first})", "name")
        context.listener_names[listener.name] = (path, listener.HasField("internal_listener"))
    for index, cluster in enumerate(static.clusters):
        _build_cluster(cluster, f"static_resources.clusters[{index}]", context)
    addresses: dict[tuple[str, int], tuple[str, str]] = {}
    for index, listener in enumerate(static.listeners):
        path = f"static_resources.listeners[{index}]"
        info = _build_listener(listener, path, context)
        if not info.listener.internal:
            _check_address(path, info, addresses, context)
        context.loaded.listeners.append(info)
        context.bootstrap.add_listener(info.listener, path)
    for check in context._checks:
        check()


def _bootstrap_extension(ext: Any, path: str, context: ConfigContext) -> None:
    if ext.HasField("typed_config"):
        type_url = ext.typed_config.type_url
        if type_url != INTERNAL_LISTENER_TYPE:
            raise context.error(
                f"{path}.typed_config", f"unknown bootstrap extension type {type_url!r}; "
                f"known: {INTERNAL_LISTENER_TYPE}", "@type",
            )
        cls = message_class(type_name(type_url))
        assert cls is not None
        config = cls()
        ext.typed_config.Unpack(config)
        size = wrapped(config, "buffer_size_kb", None)
        if size is not None:
            if size < 1:
                raise context.error(f"{path}.typed_config.buffer_size_kb",
                                    f"must be at least 1, got {size}")
            context.runtime.internal_listeners.buffer_size = size * 1024
    elif ext.name != INTERNAL_LISTENER:
        raise context.error(
            path, f"unknown bootstrap extension {ext.name!r}; known: {INTERNAL_LISTENER}", "name"
        )
    context.internal_listener_enabled = True


def _layered_runtime(message: Any, path: str, context: ConfigContext) -> None:
    """
    Static layers, later ones over earlier ones (nested mappings are dotted keys, as in
    Envoy): the keys hbonex reads go to ``context.runtime_values``, others are warnings.
    """
    for index, layer in enumerate(message.layers):
        where = f"{path}.layers[{index}]"
        if not layer.name:
            raise context.error(where, "missing required field 'name'")
        if layer.WhichOneof("layer_specifier") != "static_layer":
            continue  # admin_layer: a warning from the table; the others are refused there
        values: dict[str, Any] = {}
        _flatten(json_format.MessageToDict(layer.static_layer), "", values)
        layer_path = f"{where}.static_layer"
        for key, value in values.items():
            kind = RUNTIME_KEYS.get(key)
            if kind is None:
                context.warn(layer_path, f"runtime key {key!r} has no effect in hbonex (it "
                             f"reads {', '.join(sorted(RUNTIME_KEYS))})")
                continue
            if kind is bool and not isinstance(value, bool):
                raise context.error(layer_path, f"{key}: expected true or false, got {value!r}")
            if kind is int:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                        value != int(value) or value < 0):
                    raise context.error(layer_path, f"{key}: expected a non-negative integer, "
                                        f"got {value!r}")
                value = int(value)
            context.runtime_values[key] = value


def _flatten(value: Any, prefix: str, into: dict[str, Any]) -> None:
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            _flatten(item, f"{name}.", into)
        else:
            into[name] = item


def _global_connection_limit(root: BootstrapMessage, context: ConfigContext) -> None:
    """
    The overload manager's ``global_downstream_max_connections`` resource monitor (or, as in
    Envoy, the older runtime key of that name when there is no monitor) -> the process-wide
    downstream connection limit.
    """
    limit: Optional[int] = None
    where = "overload_manager.resource_monitors"
    for index, monitor in enumerate(root.overload_manager.resource_monitors):
        path = f"{where}[{index}]"
        if monitor.HasField("typed_config"):
            type_url = monitor.typed_config.type_url
            if type_url != DOWNSTREAM_CONNECTIONS_TYPE:
                raise context.error(
                    f"{path}.typed_config", f"unknown resource monitor type {type_url!r}; "
                    f"known: {DOWNSTREAM_CONNECTIONS_TYPE}", "@type")
        if monitor.name != DOWNSTREAM_CONNECTIONS:
            raise context.error(path, f"unknown resource monitor {monitor.name!r}; known: "
                                f"{DOWNSTREAM_CONNECTIONS}", "name")
        if not monitor.HasField("typed_config"):
            raise context.error(path, "missing required field 'typed_config' "
                                "(max_active_downstream_connections)")
        if limit is not None:
            raise context.error(path, f"{DOWNSTREAM_CONNECTIONS} is configured twice", "name")
        cls = message_class(type_name(DOWNSTREAM_CONNECTIONS_TYPE))
        assert cls is not None
        config: Any = cls()
        monitor.typed_config.Unpack(config)
        limit = config.max_active_downstream_connections
        if limit < 1:
            raise context.error(f"{path}.typed_config.max_active_downstream_connections",
                                f"must be at least 1, got {limit}")
    runtime = context.runtime_values.get(GLOBAL_MAX_CONNECTIONS)
    if limit is not None:
        if runtime is not None:
            context.warn("layered_runtime", f"runtime key {GLOBAL_MAX_CONNECTIONS!r} is "
                         f"ignored: the {DOWNSTREAM_CONNECTIONS} resource monitor is set")
        context.runtime.downstream_limit.max_active = limit
    elif runtime:
        context.runtime.downstream_limit.max_active = runtime


def _check_address(path: str, info: ListenerInfo,
                   seen: dict[tuple[str, int], tuple[str, str]], context: ConfigContext) -> None:
    host, _, port = info.address.rpartition(":")
    if port == "0":
        return
    key = (host.strip("[]"), int(port))
    if key in seen:
        other_path, other_name = seen[key]
        raise context.error(
            path, f"address {info.address} of listener {info.listener.name!r} is already used "
            f"by {other_path} (listener {other_name!r})", "address",
        )
    seen[key] = (path, info.listener.name)


def endpoint_for(address: SocketAddress) -> str:
    """
    The Twisted server endpoint string for a listener address.
    """
    if ":" in address.host:
        escaped = address.host.replace(":", "\\:")
        return f"tcp6:{address.port}:interface={escaped}"
    return f"tcp:{address.port}:interface={address.host}"


# -- listeners ----------------------------------------------------------------------------------


def _build_listener(message: Any, path: str, context: ConfigContext) -> ListenerInfo:
    internal = message.HasField("internal_listener")
    endpoint: Optional[str] = None
    if internal and message.HasField("address"):
        raise context.error(path, "a listener has either an address or internal_listener, "
                            "not both", "internal_listener")
    if internal:
        if not context.internal_listener_enabled:
            raise context.error(
                path,
                "internal listeners need the bootstrap extension: add to the top level "
                "`bootstrap_extensions: [{name: envoy.bootstrap.internal_listener, typed_config: "
                f"{{'@type': {INTERNAL_LISTENER_TYPE}}}}}]`", "internal_listener",
            )
        address = "internal"
    elif message.HasField("address"):
        where = f"{path}.address"
        kind = message.address.WhichOneof("address")
        if kind != "socket_address":
            if kind is None:
                raise context.error(where, "one of socket_address, pipe, "
                                    "envoy_internal_address is required")
            raise context.error(where, f"{kind} listener addresses are not supported", kind)
        socket = context.socket_address(message.address.socket_address,
                                        f"{where}.socket_address", hostnames=False,
                                        listener=True)
        endpoint = endpoint_for(socket)
        address = str(socket)
    else:
        raise context.error(path, "one of address, internal_listener is required")
    limit = wrapped(message, "per_connection_buffer_limit_bytes", 1024 * 1024)
    backlog = wrapped(message, "tcp_backlog_size", 1024)
    for key, value in (("per_connection_buffer_limit_bytes", limit),
                       ("tcp_backlog_size", backlog)):
        if value < 1:
            raise context.error(f"{path}.{key}", f"must be at least 1, got {value}")
    listener_filters = _listener_filters(message, path, context)
    if not message.filter_chains and not message.HasField("default_filter_chain"):
        raise context.error(path, "missing required field 'filter_chains'")
    matcher = message.HasField("filter_chain_matcher")
    chains: list[ChainInfo] = []
    matches: dict[FilterChainMatch, str] = {}
    names: dict[str, str] = {}
    for index, chain_message in enumerate(message.filter_chains):
        chain_path = f"{path}.filter_chains[{index}]"
        info = _build_filter_chain(chain_message, chain_path, context)
        chains.append(info)
        if matcher:
            # Envoy: the matcher names chains; their filter_chain_match is ignored.
            _check_chain_name(chain_message.name, chain_path, names, context)
            continue
        match = info.chain.match
        if match in matches:
            raise context.error(
                chain_path, f"filter chain has the same filter_chain_match as {matches[match]}; "
                "each chain must match differently"
            )
        matches[match] = chain_path
    default: Optional[ChainInfo] = None
    if message.HasField("default_filter_chain"):
        default = _build_filter_chain(message.default_filter_chain,
                                      f"{path}.default_filter_chain", context)
    listener = Listener(
        message.name, context.reactor, [c.chain for c in chains], endpoint=endpoint,
        internal=internal, per_connection_buffer_limit_bytes=limit, backlog=backlog,
    )
    if default is not None:
        listener.set_chains(listener.filter_chains, default.chain)
        chains.append(default)
    listener.ignore_global_conn_limit = message.ignore_global_conn_limit
    listener.listener_filters = listener_filters
    if message.HasField("listener_filters_timeout"):
        listener.listener_filters_timeout = seconds(message.listener_filters_timeout)
    listener.continue_on_listener_filters_timeout = message.continue_on_listener_filters_timeout
    if matcher:
        builder = MatcherBuilder(names, context)
        listener.filter_chain_matcher = builder.matcher(message.filter_chain_matcher,
                                                        f"{path}.filter_chain_matcher")
        listener.matcher_inputs = frozenset(builder.inputs)
    return ListenerInfo(listener, chains, path, address)


def _check_chain_name(name: str, path: str, names: dict[str, str],
                      context: ConfigContext) -> None:
    if not name:
        raise context.error(path, "a filter chain needs a name when the listener has a "
                            "filter_chain_matcher (its actions name the chains): add name: ...")
    if name in names:
        raise context.error(path, f"filter chain name {name!r} is also used by {names[name]}; "
                            "chain names must be unique when the listener has a "
                            "filter_chain_matcher", "name")
    names[name] = path


def _listener_filters(message: Any, path: str, context: ConfigContext
                      ) -> list[ListenerFilterEntry]:
    entries = []
    for index, item in enumerate(message.listener_filters):
        where = f"{path}.listener_filters[{index}]"
        plugin, parsed, _ = context.parse_extension(
            item, where, IListenerFilterExtension, "listener filter")
        disabled = None
        if item.HasField("filter_disabled"):
            disabled = listener_predicate(item.filter_disabled, f"{where}.filter_disabled",
                                          context)
        make = plugin.listenerFilterFactory(parsed, context)
        if make is None:
            if disabled is not None:
                raise context.error(where, f"filter_disabled is not supported on {plugin.name}: "
                                    "the listener runs it whenever its chains need it; remove "
                                    "filter_disabled", "filter_disabled")
            continue
        entries.append(ListenerFilterEntry(make, disabled, plugin.name))
    return entries


def _build_filter_chain(message: Any, path: str, context: ConfigContext) -> ChainInfo:
    match = FilterChainMatch()
    if message.HasField("filter_chain_match"):
        m = message.filter_chain_match
        where = f"{path}.filter_chain_match"
        port = wrapped(m, "destination_port", None)
        if port is not None and not 1 <= port <= 65535:
            raise context.error(f"{where}.destination_port",
                                f"must be between 1 and 65535, got {port}")
        if m.transport_protocol not in ("", "raw_buffer", "tls"):
            raise context.error(f"{where}.transport_protocol",
                                f"{m.transport_protocol!r} is not one of raw_buffer, tls")
        match = FilterChainMatch(
            destination_port=port,
            server_names=tuple(s.lower() for s in m.server_names),
            transport_protocol=m.transport_protocol,
            application_protocols=tuple(m.application_protocols),
        )
    tls: Optional[TLSSettings] = None
    if message.HasField("transport_socket"):
        tls, _ = context.transport_socket(message.transport_socket, f"{path}.transport_socket",
                                          upstream=False)
    handshake = 10.0
    if message.HasField("transport_socket_connect_timeout"):
        handshake = seconds(message.transport_socket_connect_timeout)
    if not message.filters:
        raise context.error(path, "missing required field 'filters'")
    filters: list[FilterInfo] = []
    factories = []
    last = len(message.filters) - 1
    for index, item in enumerate(message.filters):
        filter_path = f"{path}.filters[{index}]"
        plugin, parsed, _ = context.parse_extension(
            item, filter_path, INetworkFilterExtension, "network filter"
        )
        terminal = getattr(plugin, "terminal", None)
        if terminal and index != last:
            raise context.error(
                filter_path, f"{plugin.name} is a terminal filter and must be the last in the "
                "chain")
        if terminal is False and index == last:
            raise context.error(
                filter_path, f"{plugin.name} is not a terminal filter; the chain must end with "
                "one (envoy.filters.network.tcp_proxy or http_connection_manager)"
            )
        factories.append(plugin.filterFactory(parsed, context))
        filters.append(FilterInfo(plugin.name, plugin, parsed, filter_path))
    server_tls = None
    if tls is not None:
        try:
            server_tls = ServerTLS(tls)
        except Exception as e:  # OpenSSL refused the certificate or key
            raise context.error(f"{path}.transport_socket", f"cannot use the TLS settings: {e}")
    chain = FilterChain(factories, tls=server_tls, match=match, name=message.name,
                        handshake_timeout=handshake)
    return ChainInfo(chain, filters, path, tls)


# -- clusters -----------------------------------------------------------------------------------


def cluster_type_plugin(name: str, path: str, key: str, context: ConfigContext) -> Any:
    known = extensions.extensions(IClusterTypeExtension)
    for plugin in known:
        if plugin.name == name:
            return plugin
    names = ", ".join(p.name for p in known)
    raise context.error(path, f"unknown cluster type {name!r}; known: {names}", key)


def _build_cluster(message: Any, path: str, context: ConfigContext) -> None:
    name = message.name
    if not name:
        raise context.error(path, "missing required field 'name'")
    if name in context.loaded.clusters:
        first = context.loaded.clusters[name].path
        raise context.error(path, f"duplicate cluster name {name!r} (also {first})", "name")
    if message.HasField("cluster_type"):
        plugin, _, _ = context.parse_extension(
            message.cluster_type, f"{path}.cluster_type", IClusterTypeExtension, "cluster type"
        )
        type_name_ = plugin.name
    else:
        type_name_ = message.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[
            message.type].name
        plugin = cluster_type_plugin(type_name_, path, "type", context)
    lb_policy = message.DESCRIPTOR.fields_by_name["lb_policy"].enum_type.values_by_number[
        message.lb_policy].name
    if lb_policy not in LB_POLICIES:
        raise context.error(
            path, f"lb_policy {lb_policy!r} is not supported; accepted: "
            f"{', '.join(LB_POLICIES)}", "lb_policy")
    timeout = DEFAULT_CONNECT_TIMEOUT
    if message.HasField("connect_timeout"):
        timeout = seconds(message.connect_timeout)
    common: dict[str, Any] = {
        "name": name,
        "runtime": context.runtime,
        "type": type_name_,
        "lb_policy": lb_policy,
        "connect_timeout": timeout,
    }
    protocol, h2, streams, idle = _protocol_options(message, path, context)
    common["upstream_protocol"] = protocol
    common["h2_settings"] = h2
    if streams is not None:
        common["max_streams_per_connection"] = streams
    if idle is not None:
        common["pool_idle_timeout"] = idle
    breakers = _circuit_breakers(message, path, context)
    if breakers is not None:
        common["circuit_breakers"] = breakers
    alpn_explicit = True
    if message.HasField("transport_socket"):
        tls, parsed = context.transport_socket(message.transport_socket,
                                               f"{path}.transport_socket", upstream=True)
        if tls is not None:
            alpn_explicit = bool(getattr(parsed, "alpn_explicit", True))
            if not alpn_explicit:
                default = {"http2": (b"h2",), "http1": (b"http/1.1",),
                           "auto": AUTO_ALPN}.get(protocol or "", ())
                tls = attrs.evolve(tls, alpn=default)
            common["tls"] = tls
        passthrough = getattr(parsed, "passthrough_metadata", ())
        if passthrough:
            common["passthrough_metadata"] = passthrough
    if protocol == "downstream" and "tls" in common:
        raise context.error(
            child_path(f"{path}.typed_extension_protocol_options", HTTP_OPTIONS)
            + ".use_downstream_protocol_config",
            "use_downstream_protocol_config is implemented for plain-text upstreams only (a "
            "TLS one would need an ALPN per protocol); over TLS use auto_config")
    if protocol == "auto" and "tls" not in common:
        raise context.error(
            child_path(f"{path}.typed_extension_protocol_options", HTTP_OPTIONS)
            + ".auto_config",
            "auto_config chooses HTTP/2 or HTTP/1.1 by ALPN, so the cluster needs an "
            "envoy.transport_sockets.tls transport_socket (Envoy refuses it without one "
            "too); for plain text use explicit_http_config")
    targets = _hbonex_metadata(message, path, context)
    if targets is not None:
        common["target_policy"] = targets
    if message.HasField("metadata") and message.metadata.filter_metadata:
        common["metadata"] = filter_metadata(message.metadata)
    try:
        cluster = plugin.buildCluster(common, message, path, context)
    except ConfigError as e:
        raise context.wrap(path, e)
    except Exception as e:  # e.g. OpenSSL refusing the TLS material
        raise context.error(path, f"cannot build the cluster: {e}")
    context.bootstrap.add_cluster(cluster)
    context.loaded.clusters[name] = ClusterInfo(cluster, path, alpn_explicit)


def _protocol_options(
    message: Any, path: str, context: ConfigContext
) -> tuple[Optional[str], H2Settings, Optional[int], Optional[float]]:
    protocol: Optional[str] = None
    h2, streams, idle = H2Settings(), None, None
    options = message.typed_extension_protocol_options
    deprecated = message.HasField("http2_protocol_options")
    if deprecated and HTTP_OPTIONS in options:
        raise context.error(
            path, "http2_protocol_options (deprecated) and typed_extension_protocol_options "
            f"{HTTP_OPTIONS} may not both be set", "http2_protocol_options",
        )
    if deprecated:
        protocol = "http2"
        h2, streams = context.h2_settings(message.http2_protocol_options,
                                          f"{path}.http2_protocol_options", server=False)
    elif message.HasField("http_protocol_options"):
        protocol = "http1"
    where = f"{path}.typed_extension_protocol_options"
    for key in options:
        if key != HTTP_OPTIONS:
            raise context.error(
                where, f"unknown protocol options {key!r}; accepted here: {HTTP_OPTIONS}", key)
        any_ = options[key]
        value_path = child_path(where, key)
        if any_.type_url != HTTP_OPTIONS_TYPE:
            raise context.error(value_path, f"expected '@type: {HTTP_OPTIONS_TYPE}', got "
                                f"{any_.type_url!r}", "@type")
        cls = message_class(HTTP_OPTIONS)
        assert cls is not None
        value: Any = cls()
        any_.Unpack(value)
        kind = value.WhichOneof("upstream_protocol_options")
        if kind is None:
            raise context.error(value_path, "one of explicit_http_config, "
                                "use_downstream_protocol_config, auto_config is required")
        if kind == "auto_config":
            # Chosen per connection by ALPN (hbonex.upstream.auto_pool).
            protocol = "auto"
            auto = value.auto_config
            auto_path = f"{value_path}.auto_config"
            h2, streams = context.h2_settings(
                auto.http2_protocol_options if auto.HasField("http2_protocol_options")
                else None, f"{auto_path}.http2_protocol_options", server=False)
            common = value.common_http_protocol_options
            if value.HasField("common_http_protocol_options") and common.HasField(
                    "idle_timeout"):
                idle = seconds(common.idle_timeout)
            continue
        if kind == "use_downstream_protocol_config":
            # Each request upstream in its own protocol (hbonex.upstream.cluster.http_pool).
            protocol = "downstream"
            same = value.use_downstream_protocol_config
            same_path = f"{value_path}.use_downstream_protocol_config"
            if same.HasField("http3_protocol_options"):
                raise context.error(same_path, "HTTP/3 is not supported",
                                    "http3_protocol_options")
            h2, streams = context.h2_settings(
                same.http2_protocol_options if same.HasField("http2_protocol_options")
                else None, f"{same_path}.http2_protocol_options", server=False)
            common = value.common_http_protocol_options
            if value.HasField("common_http_protocol_options") and common.HasField(
                    "idle_timeout"):
                idle = seconds(common.idle_timeout)
            continue
        if kind != "explicit_http_config":
            raise context.error(value_path, f"{kind} is not supported; use "
                                "explicit_http_config or auto_config", kind)
        config = value.explicit_http_config
        config_path = f"{value_path}.explicit_http_config"
        which = config.WhichOneof("protocol_config")
        if which is None:
            raise context.error(config_path, "one of http_protocol_options, "
                                "http2_protocol_options, http3_protocol_options is required")
        if which == "http3_protocol_options":
            raise context.error(config_path, "HTTP/3 is not supported", which)
        if which == "http_protocol_options":
            protocol = "http1"
        else:
            protocol = "http2"
            h2, streams = context.h2_settings(config.http2_protocol_options,
                                              f"{config_path}.http2_protocol_options",
                                              server=False)
        common = value.common_http_protocol_options
        if value.HasField("common_http_protocol_options") and common.HasField("idle_timeout"):
            idle = seconds(common.idle_timeout)
    return protocol, h2, streams, idle


def _circuit_breakers(message: Any, path: str, context: ConfigContext
                      ) -> Optional[CircuitBreakers]:
    if not message.HasField("circuit_breakers"):
        return None
    thresholds = message.circuit_breakers.thresholds
    if not thresholds:
        return None
    where = f"{path}.circuit_breakers.thresholds"
    if len(thresholds) > 1:
        raise context.error(f"{where}[1]",
                            "only one thresholds entry (priority DEFAULT) is supported")
    t = thresholds[0]
    if t.priority != 0:
        raise context.error(f"{where}[0].priority", "'HIGH' is not one of DEFAULT")
    defaults = CircuitBreakers()
    values = {}
    for key in ("max_connections", "max_pending_requests", "max_requests"):
        value = wrapped(t, key, getattr(defaults, key))
        if value < 1:
            raise context.error(f"{where}[0].{key}", f"must be at least 1, got {value}")
        values[key] = value
    return CircuitBreakers(**values)


def _hbonex_metadata(message: Any, path: str, context: ConfigContext) -> Any:
    """
    ``metadata.filter_metadata.hbonex.allowed_targets`` -> TargetPolicy (other metadata
    namespaces are opaque, as in Envoy).
    """
    from hbonex.tunnel.connect import TargetPolicy, TargetRule

    if not message.HasField("metadata") or "hbonex" not in message.metadata.filter_metadata:
        return None
    ours = message.metadata.filter_metadata["hbonex"]
    where = f"{path}.metadata.filter_metadata.hbonex"
    unknown = [k for k in ours.fields if k != "allowed_targets"]
    if unknown:
        raise context.error(where, f"unknown field {unknown[0]!r}; accepted here: "
                            "allowed_targets", unknown[0])
    if "allowed_targets" not in ours.fields:
        return None
    targets = ours.fields["allowed_targets"]
    targets_path = f"{where}.allowed_targets"
    if targets.WhichOneof("kind") != "list_value":
        raise context.error(targets_path, "expected a list of CIDR[:PORT|:LO-HI] strings")
    rules = []
    for index, element in enumerate(targets.list_value.values):
        item_path = f"{targets_path}[{index}]"
        if element.WhichOneof("kind") != "string_value":
            raise context.error(item_path, "expected a string")
        try:
            rules.append(TargetRule.parse(element.string_value))
        except ValueError as e:
            raise context.error(item_path, str(e))
    if not rules:
        raise context.error(targets_path, "must not be empty (no target would be allowed)")
    return TargetPolicy(tuple(rules))


def is_message(config: Any) -> bool:
    return isinstance(config, Message)
