"""
Envoy v3 static bootstrap YAML -> ``hbonex.bootstrap.Bootstrap``.

The supported subset of Envoy's configuration is parsed strictly: every field is either used or
an error naming its path (``static_resources.listeners[0].filter_chains[0]...``) and line.
Network filters, HTTP filters, cluster types and transport sockets are Twisted plugins
(hbonex.extensions) found by ``@type`` or name; this module parses the bootstrap, listeners,
clusters and the common Envoy types they share (addresses, data sources, HTTP/2 options,
access logs) and cross-checks references at the end.

Relative file names (certificates, access logs) are relative to the process working directory,
as in Envoy, unless ``base_dir`` is given.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Callable, Optional

import attrs

from hbonex import extensions
from hbonex.bootstrap import Bootstrap
from hbonex.cluster import (
    Address,
    CircuitBreakers,
    Cluster,
    InternalAddress,
    SocketAddress,
)
from hbonex.errors import ConfigError
from hbonex.formatter import Template
from hbonex.h2settings import H2Settings
from hbonex.interfaces import (
    IClusterTypeExtension,
    INetworkFilterExtension,
    ITransportSocketExtension,
)
from hbonex.listener import FilterChain, FilterChainMatch, Listener
from hbonex.tls import ClientTLS, ServerTLS, TLSSettings
from hbonex.yamlpath import MarkedDict, Node, load_yaml, to_plain

__all__ = [
    "ConfigContext",
    "LoadedConfig",
    "load_bootstrap",
    "load_config",
]

INTERNAL_LISTENER = "envoy.bootstrap.internal_listener"
INTERNAL_LISTENER_TYPE = (
    "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
)
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
TLS_INSPECTOR_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = f"type.googleapis.com/{HTTP_OPTIONS}"
DEFAULT_CONNECT_TIMEOUT = 5.0
LB_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "CLUSTER_PROVIDED")
UNSUPPORTED_LB_POLICIES = ("RING_HASH", "MAGLEV", "LOAD_BALANCING_POLICY_CONFIG")


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


class ConfigContext:
    """
    What extensions get while parsing: the reactor and runtime, the clusters declared so far,
    where relative files are, and helpers for the common Envoy types.
    """

    def __init__(
        self, reactor: Any, *, base_dir: Any = None, source: str = "<config>"
    ) -> None:
        self.reactor = reactor
        self.bootstrap = Bootstrap(reactor)
        self.runtime = self.bootstrap.runtime
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.source = source
        self.loaded = LoadedConfig(self.bootstrap, source)
        self.internal_listener_enabled = False
        #: Every listener name in the file -> (path, internal?), known before clusters parse.
        self.listener_names: dict[str, tuple[str, bool]] = {}
        #: typed_config '@type' of the extension being parsed (one plugin, several messages).
        self.type_url: Optional[str] = None
        self._nodes: dict[int, Node] = {}
        self._checks: list[Callable[[], None]] = []

    # -- nodes ----------------------------------------------------------------------------------

    def node(self, config: Any, path: str) -> Node:
        """
        The walker for ``config`` (the same Node each time, so fields read by one parser are
        known to the next and to ``finish()``).
        """
        key = id(config)
        node = self._nodes.get(key)
        if node is None or node.value is not config:
            node = Node(config, path)
            self._nodes[key] = node
        return node

    def adopt(self, node: Node) -> Node:
        """
        Make ``node`` the walker ``node()`` returns for its value.
        """
        self._nodes[id(node.value)] = node
        return node

    def later(self, check: Callable[[], None]) -> None:
        """
        Run ``check`` once everything is parsed (cross references).
        """
        self._checks.append(check)

    def template(self, node: Node, key: str, default: Optional[str] = None,
                 required: bool = False) -> Optional[Template]:
        """
        A string field with substitution operators, checked now.
        """
        text = node.str_field(key, default, required=required)
        if text is None:
            return None
        child = node.get(key)
        target = child if child is not None else node
        try:
            return Template(text, target.path)
        except ConfigError as e:
            raise target.wrap(e)

    # -- files ----------------------------------------------------------------------------------

    def file_path(self, name: str) -> Path:
        path = Path(os.path.expanduser(name))
        if self.base_dir is not None and not path.is_absolute():
            return self.base_dir / path
        return path

    def data_source(self, node: Node) -> tuple[Optional[Path], bytes]:
        """
        An Envoy DataSource: ``{filename}`` or ``{inline_string}`` (``inline_bytes``: base64).
        Returns (file path or None, contents); a file is not read here if it is a path.
        """
        node.expect_map()
        kind, value = node.oneof(  # type: ignore[misc]
            "filename", "inline_string", "inline_bytes", "environment_variable"
        )
        node.finish()
        if kind == "filename":
            path = self.file_path(value.as_str())
            return path, b""
        if kind == "inline_string":
            return None, value.as_str().encode()
        if kind == "inline_bytes":
            import base64
            import binascii

            try:
                return None, base64.b64decode(value.as_str(), validate=True)
            except binascii.Error as e:
                raise value.error(f"not base64: {e}")
        name = value.as_str()
        if name not in os.environ:
            raise value.error(f"environment variable {name} is not set")
        return None, os.environ[name].encode()

    # -- extensions -----------------------------------------------------------------------------

    def resolve(self, node: Node, interface: Any, what: str) -> tuple[Any, Node, Optional[str]]:
        """
        The plugin for an Envoy ``{name, typed_config: {'@type': ...}}`` and the typed_config
        node (without '@type').
        """
        node.expect_map()
        name = node.str_field("name")
        typed = node.map_field("typed_config")
        type_url = None
        config: Any = MarkedDict()
        if typed is not None:
            type_url = typed.str_field("@type")
            if type_url is None:
                raise typed.error("typed_config needs an '@type'")
            config = typed.value.without("@type")
            config.mark = typed.value.mark
        elif name is None:
            raise node.error(f"a {what} needs a name or a typed_config")
        try:
            plugin = extensions.resolve(
                interface, node.path, name=name, type_url=type_url, what=what
            )
        except ConfigError as e:
            key = "typed_config" if type_url else "name"
            child = node.get(key)
            if type_url and typed is not None:
                marks = typed.value.key_marks
                if "@type" in marks:
                    raise ConfigError(e.path, f"{e.message} (line {marks['@type'].line + 1})")
            raise (child or node).wrap(e)
        return plugin, self.node(config, f"{node.path}.typed_config"), type_url

    def parse_extension(self, node: Node, interface: Any, what: str) -> tuple[Any, Any, Node]:
        """
        Resolve and parse an extension; returns (plugin, parsed, typed_config node).
        """
        plugin, config, type_url = self.resolve(node, interface, what)
        previous, self.type_url = self.type_url, type_url
        try:
            parsed = plugin.parseConfig(config.value, config.path, self)
        finally:
            self.type_url = previous
        config.finish()
        node.finish()
        return plugin, parsed, config

    def transport_socket(self, node: Node, upstream: bool) -> tuple[Optional[TLSSettings], Any]:
        """
        A ``transport_socket``: (TLSSettings or None for raw TCP, the parsed config).
        """
        plugin, parsed, config = self.parse_extension(
            node, ITransportSocketExtension, "transport socket"
        )
        try:
            settings = plugin.buildTransport(parsed, upstream, self)
        except ConfigError as e:
            raise config.wrap(e)
        return settings, parsed

    # -- common Envoy types ---------------------------------------------------------------------

    def socket_address(self, node: Node, *, hostnames: bool, listener: bool = False
                       ) -> SocketAddress:
        node.expect_map()
        host = node.str_field("address", required=True)
        protocol = node.str_field("protocol", "TCP", choices=("TCP", "UDP"))
        if protocol != "TCP":
            raise node.error("only protocol TCP is supported", "protocol")
        port = node.int_field(
            "port_value", 0 if listener else None, required=not listener,
            minimum=0 if listener else 1, maximum=65535,
        )
        node.finish()
        try:
            ip = ipaddress.ip_address(host)
            host = str(ip)
        except ValueError:
            if not hostnames:
                raise node.error(
                    f"malformed IP address {host!r} (a hostname needs a STRICT_DNS or "
                    "LOGICAL_DNS cluster)" if not listener else
                    f"malformed IP address {host!r}", "address",
                )
            if not host or any(c in host for c in " /:@[]"):
                raise node.error(f"malformed hostname {host!r}", "address")
        return SocketAddress(host, port)

    def h2_settings(self, node: Optional[Node], *, server: bool
                    ) -> tuple[H2Settings, Optional[int]]:
        """
        ``http2_protocol_options`` -> (H2Settings, max_concurrent_streams if set).  For an
        upstream (``server=False``) max_concurrent_streams limits streams per pooled connection.
        """
        if node is None:
            return H2Settings(), None
        node.expect_map()
        kwargs: dict[str, Any] = {}
        node.bool_field("allow_connect")  # CONNECT is always allowed
        streams = node.int_field("max_concurrent_streams", minimum=1, maximum=2**31 - 1)
        if streams is not None and server:
            kwargs["max_concurrent_streams"] = streams
        for key in ("initial_stream_window_size", "initial_connection_window_size"):
            value = node.int_field(key, minimum=65535, maximum=2**31 - 1)
            if value is not None:
                kwargs[key] = value
        for key in (
            "max_outbound_frames", "max_outbound_control_frames",
            "max_consecutive_inbound_frames_with_empty_payload",
            "max_inbound_priority_frames_per_stream",
            "max_inbound_window_update_frames_per_data_frame_sent",
        ):
            value = node.int_field(key, minimum=0 if "consecutive" in key else 1,
                                   maximum=2**31 - 1)
            if value is not None:
                kwargs[key] = value
        keepalive = node.map_field("connection_keepalive")
        if keepalive is not None:
            interval = keepalive.duration_field("interval", required=True)
            timeout = keepalive.duration_field("timeout", required=True)
            keepalive.finish()
            kwargs["keepalive_interval"] = interval
            kwargs["keepalive_timeout"] = timeout
        node.finish()
        try:
            return H2Settings(**kwargs), streams
        except ValueError as e:
            raise node.error(str(e))

    # -- clusters -------------------------------------------------------------------------------

    @property
    def clusters(self) -> dict[str, Cluster]:
        return self.runtime.clusters

    def cluster(self, node: Node, key: str = "cluster") -> Cluster:
        """
        The cluster named by ``node[key]`` (which must exist).
        """
        name = node.str_field(key, required=True)
        cluster = self.clusters.get(name)
        if cluster is None:
            defined = ", ".join(sorted(self.clusters)) or "none"
            raise node.error(f"undefined cluster {name!r}; defined clusters: {defined}", key)
        return cluster

    def use_for_tunneling(self, cluster: Cluster) -> None:
        """
        ``cluster`` carries CONNECT tunnels: without HTTP protocol options it speaks HTTP/1.1,
        as Envoy does, and its TLS (unless configured) offers ALPN http/1.1.
        """
        if cluster.upstream_protocol is not None:
            return
        cluster.upstream_protocol = "http1"
        info = self.loaded.clusters.get(cluster.name)
        if cluster.tls is not None and info is not None and not info.alpn_explicit:
            cluster.tls = attrs.evolve(cluster.tls, alpn=(b"http/1.1",))
            cluster.client_tls = ClientTLS(cluster.tls)

    def load_assignment(self, node: Node, *, hostnames: bool) -> tuple[Address, ...]:
        """
        ``load_assignment.endpoints[].lb_endpoints[].endpoint.address`` of cluster ``node``.
        """
        assignment = node.map_field("load_assignment")
        if assignment is None:
            return ()
        assignment.str_field("cluster_name")
        result: list[Address] = []
        for group in assignment.list_field("endpoints"):
            group.expect_map()
            for lb in group.list_field("lb_endpoints"):
                lb.expect_map()
                endpoint = lb.map_field("endpoint", required=True)
                assert endpoint is not None
                address = endpoint.map_field("address", required=True)
                assert address is not None
                kind, value = address.oneof(  # type: ignore[misc]
                    "socket_address", "envoy_internal_address", "pipe"
                )
                if kind == "pipe":
                    raise address.error("pipe addresses are not supported", "pipe")
                if kind == "socket_address":
                    result.append(self.socket_address(value, hostnames=hostnames))
                else:
                    result.append(self._internal_address(value))
                address.finish()
                endpoint.finish()
                lb.finish()
            group.finish()
        assignment.finish()
        return tuple(result)

    def _internal_address(self, node: Node) -> InternalAddress:
        node.expect_map()
        name = node.str_field("server_listener_name", required=True)
        endpoint_id = node.str_field("endpoint_id", "")
        node.finish()

        def check() -> None:
            internal = sorted(n for n, (_, i) in self.listener_names.items() if i)
            known = ", ".join(internal) or "none"
            found = self.listener_names.get(name)
            if found is None:
                raise node.error(
                    f"no internal listener named {name!r}; internal listeners: {known}",
                    "server_listener_name",
                )
            if not found[1]:
                raise node.error(
                    f"listener {name!r} ({found[0]}) is not an internal listener; internal "
                    f"listeners: {known}", "server_listener_name",
                )

        self.later(check)
        return InternalAddress(name, endpoint_id)


# -- loading ------------------------------------------------------------------------------------


def load_bootstrap(path_or_text: Any, reactor: Any, *, base_dir: Any = None) -> Bootstrap:
    """
    The Bootstrap an Envoy v3 bootstrap YAML file or text describes: a ``Path`` or a string
    without a newline is a file name, any other string is the YAML itself.  Raises ConfigError.
    """
    return load_config(path_or_text, reactor, base_dir=base_dir).bootstrap


def load_config(path_or_text: Any, reactor: Any, *, base_dir: Any = None) -> LoadedConfig:
    """
    Like load_bootstrap, with what the Bootstrap was made of.
    """
    if isinstance(path_or_text, Path) or (
        isinstance(path_or_text, str) and "\n" not in path_or_text
    ):
        source = str(path_or_text)
        try:
            text = Path(path_or_text).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("", f"{source}: no such file")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("", f"{source}: cannot read: {getattr(e, 'strerror', None) or e}")
    else:
        source, text = "<config>", str(path_or_text)
    data = load_yaml(text, source)
    if data is None:
        raise ConfigError("", f"{source}: the configuration is empty")
    context = ConfigContext(reactor, base_dir=base_dir, source=source)
    root = Node(data, "")
    if not root.is_map():
        raise ConfigError("", f"{source}: expected a mapping at the top level (line 1)")
    _parse_bootstrap(root, context)
    return context.loaded


def _parse_bootstrap(root: Node, context: ConfigContext) -> None:
    root.ignore("node")
    admin = root.map_field("admin")
    if admin is not None:
        context.bootstrap.admin = to_plain(admin.value)
        admin.ignore(*admin.keys())
    for index, ext in enumerate(root.list_field("bootstrap_extensions")):
        _bootstrap_extension(ext, context, index)
    static = root.map_field("static_resources", required=True)
    assert static is not None
    listeners = static.list_field("listeners")
    clusters = static.list_field("clusters")
    static.finish()
    root.finish()

    # Names first: clusters may point at internal listeners declared after them.
    for node in listeners:
        node.expect_map()
        name = node.str_field("name", required=True)
        if name in context.listener_names:
            first = context.listener_names[name][0]
            raise node.error(f"duplicate listener name {name!r} (also {first})", "name")
        context.listener_names[name] = (node.path, node.has("internal_listener"))
    for node in clusters:
        _parse_cluster(node, context)
    addresses: dict[tuple[str, int], tuple[str, str]] = {}
    for node in listeners:
        info = _parse_listener(node, context)
        if not info.listener.internal:
            _check_address(node, info, addresses)
        context.loaded.listeners.append(info)
        context.bootstrap.add_listener(info.listener, node.path)
    for check in context._checks:
        check()


def _bootstrap_extension(node: Node, context: ConfigContext, index: int) -> None:
    node.expect_map()
    name = node.str_field("name")
    typed = node.map_field("typed_config")
    type_url = typed.str_field("@type") if typed is not None else None
    if type_url is not None and type_url != INTERNAL_LISTENER_TYPE:
        raise typed.error(  # type: ignore[union-attr]
            f"unknown bootstrap extension type {type_url!r}; known: {INTERNAL_LISTENER_TYPE}",
            "@type",
        )
    if type_url is None and name != INTERNAL_LISTENER:
        raise node.error(
            f"unknown bootstrap extension {name!r}; known: {INTERNAL_LISTENER}", "name"
        )
    if typed is not None:
        size = typed.int_field("buffer_size_kb", minimum=1)
        if size is not None:
            context.runtime.internal_listeners.buffer_size = size * 1024
        typed.finish()
    node.finish()
    context.internal_listener_enabled = True


def _check_address(
    node: Node, info: ListenerInfo, seen: dict[tuple[str, int], tuple[str, str]]
) -> None:
    host, _, port = info.address.rpartition(":")
    if port == "0":
        return
    key = (host.strip("[]"), int(port))
    if key in seen:
        other_path, other_name = seen[key]
        raise node.error(
            f"address {info.address} of listener {info.listener.name!r} is already used by "
            f"{other_path} (listener {other_name!r})", "address",
        )
    seen[key] = (node.path, info.listener.name)


def endpoint_for(address: SocketAddress) -> str:
    """
    The Twisted server endpoint string for a listener address.
    """
    if ":" in address.host:
        escaped = address.host.replace(":", "\\:")
        return f"tcp6:{address.port}:interface={escaped}"
    return f"tcp:{address.port}:interface={address.host}"


# -- listeners ----------------------------------------------------------------------------------


def _parse_listener(node: Node, context: ConfigContext) -> ListenerInfo:
    name = node.str_field("name", required=True)
    internal = node.get("internal_listener")
    address_node = node.map_field("address")
    endpoint: Optional[str] = None
    if internal is not None and address_node is not None:
        raise node.error("a listener has either an address or internal_listener, not both",
                         "internal_listener")
    if internal is not None:
        internal.expect_map()
        internal.finish()
        if not context.internal_listener_enabled:
            raise node.error(
                "internal listeners need the bootstrap extension: add to the top level "
                "`bootstrap_extensions: [{name: envoy.bootstrap.internal_listener, typed_config: "
                f"{{'@type': {INTERNAL_LISTENER_TYPE}}}}}]`", "internal_listener",
            )
        address = "internal"
    elif address_node is not None:
        kind, value = address_node.oneof(  # type: ignore[misc]
            "socket_address", "pipe", "envoy_internal_address"
        )
        if kind != "socket_address":
            raise address_node.error(f"{kind} listener addresses are not supported", kind)
        socket = context.socket_address(value, hostnames=False, listener=True)
        address_node.finish()
        endpoint = endpoint_for(socket)
        address = str(socket)
    else:
        raise node.error("one of address, internal_listener is required")
    limit = node.int_field("per_connection_buffer_limit_bytes", 1024 * 1024, minimum=1)
    backlog = node.int_field("tcp_backlog_size", 1024, minimum=1)
    for item in node.list_field("listener_filters"):
        _listener_filter(item)
    chains: list[ChainInfo] = []
    matches: dict[FilterChainMatch, str] = {}
    chain_nodes = node.list_field("filter_chains", required=True)
    for chain_node in chain_nodes:
        info = _parse_filter_chain(chain_node, context)
        match = info.chain.match
        if match in matches:
            raise chain_node.error(
                f"filter chain has the same filter_chain_match as {matches[match]}; "
                "each chain must match differently"
            )
        matches[match] = chain_node.path
        chains.append(info)
    node.finish()
    listener = Listener(
        name, context.reactor, [c.chain for c in chains], endpoint=endpoint,
        internal=internal is not None, per_connection_buffer_limit_bytes=limit,
        backlog=backlog,
    )
    return ListenerInfo(listener, chains, node.path, address)


def _listener_filter(node: Node) -> None:
    node.expect_map()
    name = node.str_field("name")
    typed = node.map_field("typed_config")
    type_url = typed.str_field("@type") if typed is not None else None
    if typed is not None:
        typed.finish()
    if type_url is not None and type_url != TLS_INSPECTOR_TYPE:
        raise typed.error(  # type: ignore[union-attr]
            f"unknown listener filter type {type_url!r}; known: {TLS_INSPECTOR_TYPE}", "@type"
        )
    if type_url is None and name != TLS_INSPECTOR:
        raise node.error(f"unknown listener filter {name!r}; known: {TLS_INSPECTOR}", "name")
    node.finish()


def _parse_filter_chain(node: Node, context: ConfigContext) -> ChainInfo:
    node.expect_map()
    name = node.str_field("name", "")
    match = FilterChainMatch()
    match_node = node.map_field("filter_chain_match")
    if match_node is not None:
        match = FilterChainMatch(
            destination_port=match_node.int_field("destination_port", minimum=1, maximum=65535),
            server_names=tuple(s.lower() for s in match_node.str_list_field("server_names")),
            transport_protocol=match_node.str_field(
                "transport_protocol", "", choices=("raw_buffer", "tls")
            ),
            application_protocols=tuple(match_node.str_list_field("application_protocols")),
        )
        match_node.finish()
    tls: Optional[TLSSettings] = None
    socket = node.map_field("transport_socket")
    if socket is not None:
        tls, _ = context.transport_socket(socket, upstream=False)
    handshake = node.duration_field("transport_socket_connect_timeout", 10.0)
    filters: list[FilterInfo] = []
    filter_nodes = node.list_field("filters", required=True)
    factories = []
    for index, filter_node in enumerate(filter_nodes):
        plugin, parsed, _ = context.parse_extension(
            filter_node, INetworkFilterExtension, "network filter"
        )
        terminal = getattr(plugin, "terminal", None)
        if terminal and index != len(filter_nodes) - 1:
            raise filter_node.error(
                f"{plugin.name} is a terminal filter and must be the last in the chain"
            )
        if terminal is False and index == len(filter_nodes) - 1:
            raise filter_node.error(
                f"{plugin.name} is not a terminal filter; the chain must end with one "
                "(envoy.filters.network.tcp_proxy or http_connection_manager)"
            )
        factories.append(plugin.filterFactory(parsed, context))
        filters.append(FilterInfo(plugin.name, plugin, parsed, filter_node.path))
    node.finish()
    server_tls = None
    if tls is not None:
        try:
            server_tls = ServerTLS(tls)
        except Exception as e:  # OpenSSL refused the certificate or key
            assert socket is not None
            raise socket.error(f"cannot use the TLS settings: {e}")
    chain = FilterChain(factories, tls=server_tls, match=match, name=name,
                        handshake_timeout=handshake)
    return ChainInfo(chain, filters, node.path, tls)


# -- clusters -----------------------------------------------------------------------------------


def cluster_type_plugin(node: Node, key: str, name: str) -> Any:
    known = extensions.extensions(IClusterTypeExtension)
    for plugin in known:
        if plugin.name == name:
            return plugin
    names = ", ".join(p.name for p in known)
    raise node.error(f"unknown cluster type {name!r}; known: {names}", key)


def _parse_cluster(node: Node, context: ConfigContext) -> None:
    context.adopt(node.expect_map())
    name = node.str_field("name", required=True)
    if name in context.loaded.clusters:
        first = context.loaded.clusters[name].path
        raise node.error(f"duplicate cluster name {name!r} (also {first})", "name")
    if node.has("type") and node.has("cluster_type"):
        raise node.error("only one of type, cluster_type may be set", "cluster_type")
    custom = node.map_field("cluster_type")
    if custom is not None:
        plugin, _, _ = context.parse_extension(custom, IClusterTypeExtension, "cluster type")
        type_name = plugin.name
    else:
        type_name = node.str_field("type", "STATIC")
        plugin = cluster_type_plugin(node, "type", type_name)
    lb_policy = node.str_field("lb_policy", "ROUND_ROBIN")
    if lb_policy not in LB_POLICIES:
        what = "is not supported" if lb_policy in UNSUPPORTED_LB_POLICIES else "is unknown"
        raise node.error(
            f"lb_policy {lb_policy!r} {what}; accepted: {', '.join(LB_POLICIES)}", "lb_policy"
        )
    common: dict[str, Any] = {
        "name": name,
        "runtime": context.runtime,
        "type": type_name,
        "lb_policy": lb_policy,
        "connect_timeout": node.duration_field("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
    }
    protocol, h2, streams, idle = _protocol_options(node, context)
    common["upstream_protocol"] = protocol
    common["h2_settings"] = h2
    if streams is not None:
        common["max_streams_per_connection"] = streams
    if idle is not None:
        common["pool_idle_timeout"] = idle
    breakers = _circuit_breakers(node)
    if breakers is not None:
        common["circuit_breakers"] = breakers
    alpn_explicit = True
    socket = node.map_field("transport_socket")
    if socket is not None:
        tls, parsed = context.transport_socket(socket, upstream=True)
        if tls is not None:
            alpn_explicit = bool(getattr(parsed, "alpn_explicit", True))
            if not alpn_explicit:
                default = {"http2": (b"h2",), "http1": (b"http/1.1",)}.get(protocol or "", ())
                tls = attrs.evolve(tls, alpn=default)
            common["tls"] = tls
    targets = _hbonex_metadata(node)
    if targets is not None:
        common["target_policy"] = targets
    try:
        cluster = plugin.buildCluster(common, node.value, node.path, context)
    except ConfigError as e:
        raise node.wrap(e)
    except Exception as e:  # e.g. OpenSSL refusing the TLS material
        raise node.error(f"cannot build the cluster: {e}")
    node.finish()
    context.bootstrap.add_cluster(cluster)
    context.loaded.clusters[name] = ClusterInfo(cluster, node.path, alpn_explicit)


def _protocol_options(
    node: Node, context: ConfigContext
) -> tuple[Optional[str], H2Settings, Optional[int], Optional[float]]:
    protocol: Optional[str] = None
    h2, streams, idle = H2Settings(), None, None
    deprecated = node.map_field("http2_protocol_options")
    options = node.map_field("typed_extension_protocol_options")
    if deprecated is not None and options is not None and HTTP_OPTIONS in options.value:
        raise node.error(
            "http2_protocol_options (deprecated) and typed_extension_protocol_options "
            f"{HTTP_OPTIONS} may not both be set", "http2_protocol_options",
        )
    if deprecated is not None:
        protocol = "http2"
        h2, streams = context.h2_settings(deprecated, server=False)
    if options is None:
        return protocol, h2, streams, idle
    for key, value in options.items():
        if key != HTTP_OPTIONS:
            raise options.error(
                f"unknown protocol options {key!r}; accepted here: {HTTP_OPTIONS}", key
            )
        value.expect_map()
        type_url = value.str_field("@type")
        if type_url is not None and type_url != HTTP_OPTIONS_TYPE:
            raise value.error(f"expected '@type: {HTTP_OPTIONS_TYPE}', got {type_url!r}",
                              "@type")
        kind, config = value.oneof(  # type: ignore[misc]
            "explicit_http_config", "use_downstream_protocol_config", "auto_config"
        )
        if kind != "explicit_http_config":
            raise value.error(f"{kind} is not supported; use explicit_http_config", kind)
        config.expect_map()
        which, inner = config.oneof(  # type: ignore[misc]
            "http_protocol_options", "http2_protocol_options", "http3_protocol_options"
        )
        if which == "http3_protocol_options":
            raise config.error("HTTP/3 is not supported", which)
        if which == "http_protocol_options":
            inner.expect_map()
            inner.finish()
            protocol = "http1"
        else:
            protocol = "http2"
            h2, streams = context.h2_settings(inner.expect_map(), server=False)
        config.finish()
        common = value.map_field("common_http_protocol_options")
        if common is not None:
            idle = common.duration_field("idle_timeout")
            common.finish()
        value.finish()
    return protocol, h2, streams, idle


def _circuit_breakers(node: Node) -> Optional[CircuitBreakers]:
    breakers = node.map_field("circuit_breakers")
    if breakers is None:
        return None
    thresholds = breakers.list_field("thresholds")
    breakers.finish()
    if not thresholds:
        return None
    if len(thresholds) > 1:
        raise thresholds[1].error("only one thresholds entry (priority DEFAULT) is supported")
    t = thresholds[0].expect_map()
    t.str_field("priority", "DEFAULT", choices=("DEFAULT",))
    defaults = CircuitBreakers()
    result = CircuitBreakers(
        max_connections=t.int_field("max_connections", defaults.max_connections, minimum=1),
        max_pending_requests=t.int_field(
            "max_pending_requests", defaults.max_pending_requests, minimum=1
        ),
        max_requests=t.int_field("max_requests", defaults.max_requests, minimum=1),
    )
    t.finish()
    return result


def _hbonex_metadata(node: Node) -> Any:
    """
    ``metadata.filter_metadata.hbonex.allowed_targets`` -> TargetPolicy (other metadata
    namespaces are opaque, as in Envoy).
    """
    from hbonex.connect import TargetPolicy, TargetRule

    metadata = node.map_field("metadata")
    if metadata is None:
        return None
    metadata.ignore("typed_filter_metadata")
    filter_metadata = metadata.map_field("filter_metadata")
    metadata.finish()
    if filter_metadata is None:
        return None
    ours = filter_metadata.map_field("hbonex")
    filter_metadata.ignore(*filter_metadata.keys())
    if ours is None:
        return None
    targets = ours.get("allowed_targets")
    ours.finish()
    if targets is None:
        return None
    rules = []
    for element in targets.elements():
        try:
            rules.append(TargetRule.parse(element.as_str()))
        except ValueError as e:
            raise element.error(str(e))
    if not rules:
        raise targets.error("must not be empty (no target would be allowed)")
    return TargetPolicy(tuple(rules))
