"""
Clusters: named groups of upstream endpoints with a load-balancing policy, an upstream
protocol (raw TCP, or HTTP/1.1 / HTTP/2 CONNECT tunnels), optional TLS and a connection pool.
"""

from __future__ import annotations

import random
import socket
from typing import TYPE_CHECKING, Any, Union

import attrs
from twisted.internet import defer, threads
from twisted.internet import error as ierror
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import ClientFactory, Factory
from twisted.logger import Logger

from hbonex.errors import UpstreamError
from hbonex.h2.settings import H2Settings
from hbonex.network.overload import DownstreamLimit
from hbonex.network.relay import RelayEnd
from hbonex.tls.context import ClientTLS, TLSSettings
from hbonex.tls.fasttls import FastTLSFactory
from hbonex.tunnel.client import H1TunnelClient, H2TunnelClient
from hbonex.tunnel.connect import BadAuthority, TargetPolicy, ip_of, parse_authority
from hbonex.upstream.tunnel_pool import H2Pool, PoolKey

if TYPE_CHECKING:
    from hbonex.network.internal import InternalListenerRegistry


@attrs.frozen
class SocketAddress:
    host: str
    port: int
    #: The lb_endpoint's ``metadata.filter_metadata`` (namespace -> fields); not part of
    #: the address's identity.
    metadata: Any = attrs.field(default=None, eq=False, repr=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class InternalAddress:
    server_listener_name: str
    endpoint_id: str = ""
    #: As SocketAddress.metadata.
    metadata: Any = attrs.field(default=None, eq=False, repr=False)

    def __str__(self) -> str:
        return f"envoy://{self.server_listener_name}/{self.endpoint_id}"


Address = Union[SocketAddress, InternalAddress]


@attrs.frozen
class CircuitBreakers:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024


DEFAULT_CIRCUIT_BREAKERS = CircuitBreakers()
DEFAULT_H2_SETTINGS = H2Settings()


@attrs.define
class ClusterStats:
    upstream_cx_total: int = 0
    upstream_cx_connect_fail: int = 0
    upstream_cx_active: int = 0
    upstream_rq_total: int = 0
    upstream_cx_connect_timeout: int = 0
    #: HTTP requests the router retried (tunnels retried by the pools are counted there).
    upstream_rq_retry: int = 0
    #: Envoy's ``cluster.<name>.ssl.handshake`` and ``ssl.connection_error``.
    ssl_handshake: int = 0
    ssl_connection_error: int = 0
    #: Envoy's ``cluster.<name>.internal_upstream.no_metadata``.
    internal_upstream_no_metadata: int = 0


class Runtime:
    """
    What the running objects share: the reactor, the internal listeners, the clusters.
    """

    def __init__(self, reactor: Any) -> None:
        from hbonex.network.internal import InternalListenerRegistry

        self.reactor = reactor
        self.internal_listeners: InternalListenerRegistry = InternalListenerRegistry()
        self.clusters: dict[str, Cluster] = {}
        #: Live server-side HTTP/2 connections, told GOAWAY when the service stops.
        self.server_connections: set[Any] = set()
        #: Accepted connections across every listener (the overload manager's limit).
        self.downstream_limit = DownstreamLimit()
        self._http_pools: dict[str, Any] = {}

    def http_pool(self, cluster: Cluster, downstream_protocol: str = "") -> Any:
        """
        Where the router sends a cluster's requests: its HTTP/2 connections (a cluster with
        HTTP/2 protocol options) or a pool of kept-alive HTTP/1.1 connections; with
        use_downstream_protocol_config, the pool of the request's own protocol.
        """
        protocol = cluster.upstream_protocol
        key = cluster.name
        if protocol == "downstream":
            protocol = "http2" if downstream_protocol == "HTTP/2" else "http1"
            key = f"{cluster.name} {protocol}"
        pool = self._http_pools.get(key)
        if pool is not None:
            return pool
        if protocol == "auto":
            from hbonex.upstream.auto_pool import AutoHttpPool

            pool = AutoHttpPool(cluster)
        elif protocol == "http2":
            from hbonex.upstream.http2_pool import H2RequestPool

            pool = H2RequestPool(cluster)
        else:
            from hbonex.upstream.http1_pool import Http1Pool

            breakers = cluster.circuit_breakers
            pool = Http1Pool(
                self.reactor,
                lambda codec: cluster.connect_stream(codec, UpstreamRequest()),
                max_connections=breakers.max_connections,
                max_pending=breakers.max_pending_requests,
                idle_timeout=cluster.pool_idle_timeout,
            )
        self._http_pools[key] = pool
        return pool

    def cluster(self, name: str) -> Cluster:
        return self.clusters[name]


@attrs.define
class UpstreamRequest:
    """
    Context for one upstream connection or tunnel: who asked, and (for ORIGINAL_DST) where to.
    """

    original_destination: str | None = None  # "host:port" from :authority or a header
    downstream_remote: str = ""
    downstream_local: str = ""
    peer_identity: str = ""
    hash_key: str = ""
    #: Filter state shared with the upstream (its ONCE and TRANSITIVE objects): the
    #: connection an internal listener accepts for this request starts with it.
    filter_state: Any = None
    #: Dynamic metadata for the internal listener's connection (namespace -> fields): what
    #: the cluster's internal_upstream transport socket passes through.
    dynamic_metadata: dict[str, dict[str, Any]] | None = None
    #: The downstream connection's own dynamic metadata and filter state, where an
    #: ORIGINAL_DST cluster looks for its target (``metadata_key``, and the filter state
    #: object ``envoy.network.transport_socket.original_dst_address``).
    downstream_metadata: Any = None
    downstream_state: Any = None


#: The filter state object that overrides an ORIGINAL_DST cluster's target (Envoy's).
ORIGINAL_DST_ADDRESS_KEY = "envoy.network.transport_socket.original_dst_address"


def metadata_value(metadata: Any, namespace: str, path: tuple[str, ...]) -> Any:
    """Envoy's MetadataKey lookup: a namespace, then keys into nested structs."""
    value = (metadata or {}).get(namespace)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, list):
        value = value[0] if value else None  # Envoy takes a list's first element
    return value


class Cluster:
    log = Logger()

    def __init__(
        self,
        name: str,
        runtime: Runtime,
        *,
        type: str = "STATIC",
        endpoints: tuple[Address, ...] = (),
        lb_policy: str = "ROUND_ROBIN",
        connect_timeout: float = 5.0,
        # None: raw TCP; "http1"/"http2": tunnels and requests; "auto": requests, by ALPN
        upstream_protocol: str | None = None,
        tls: TLSSettings | None = None,
        h2_settings: H2Settings = DEFAULT_H2_SETTINGS,
        max_streams_per_connection: int = 100,
        pool_idle_timeout: float = 300.0,
        target_policy: TargetPolicy | None = None,
        circuit_breakers: CircuitBreakers = DEFAULT_CIRCUIT_BREAKERS,
        tunnel_response_timeout: float = 15.0,
        original_dst_header: str | None = None,
        original_dst_metadata_key: tuple[str, tuple[str, ...]] | None = None,
        upstream_port_override: int | None = None,
        metadata: dict[str, dict[str, Any]] | None = None,
        passthrough_metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.type = type
        self.endpoints = endpoints
        self.lb_policy = lb_policy
        self.connect_timeout = connect_timeout
        self.upstream_protocol = upstream_protocol
        self.tls = tls
        self.client_tls = ClientTLS(tls) if tls is not None else None
        #: (expected server identity, own identity) of this cluster's pool keys; computed once,
        #: not per tunnel (it parses the certificate's SANs).
        self._pool_identities = (
            (tls.peer_policy.describe(), _identity_of(tls)) if tls is not None else ("", "")
        )
        self.h2_settings = h2_settings
        self.max_streams_per_connection = max_streams_per_connection
        self.pool_idle_timeout = pool_idle_timeout
        self.target_policy = target_policy
        self.circuit_breakers = circuit_breakers
        self.tunnel_response_timeout = tunnel_response_timeout
        #: ORIGINAL_DST with ``use_http_header``: the request header naming the destination.
        self.original_dst_header = original_dst_header
        #: original_dst_lb_config.metadata_key: (filter_metadata namespace, path of keys).
        self.original_dst_metadata_key = original_dst_metadata_key
        self.upstream_port_override = upstream_port_override
        #: The cluster's ``metadata.filter_metadata`` (namespace -> fields).
        self.metadata = metadata or {}
        #: internal_upstream's passthrough_metadata: ("host" | "cluster", namespace) pairs
        #: copied into an internal listener connection's dynamic metadata.
        self.passthrough_metadata = passthrough_metadata
        self.pools: dict[PoolKey, H2Pool] = {}
        self.stats = ClusterStats()
        self._rr = 0
        self._active: dict[Address, int] = {}

    @property
    def reactor(self) -> Any:
        return self.runtime.reactor

    # -- picking a host -----------------------------------------------------------------------

    def pick(self, request: UpstreamRequest) -> defer.Deferred[Address]:
        """
        The endpoint for this request (ORIGINAL_DST resolves and checks the target policy).
        """
        if self.type == "ORIGINAL_DST":
            return self._original_destination(request)
        if not self.endpoints:
            return defer.fail(UpstreamError(503, f"cluster {self.name} has no endpoints",
                                            flag="UH"))
        if self.lb_policy == "RANDOM":
            address = random.choice(self.endpoints)
        elif self.lb_policy == "LEAST_REQUEST":
            address = min(self.endpoints, key=lambda a: self._active.get(a, 0))
        else:
            address = self.endpoints[self._rr % len(self.endpoints)]
            self._rr += 1
        if isinstance(address, SocketAddress) and self.type in ("STRICT_DNS", "LOGICAL_DNS"):
            return self._resolve(address)
        return defer.succeed(address)

    def _original_destination(self, request: UpstreamRequest) -> defer.Deferred[Address]:
        # Envoy's order: the filter state object, then metadata_key, then the header or the
        # restored local address (request.original_destination); then upstream_port_override.
        target = None
        state = request.downstream_state
        if state is not None and state.has_data(ORIGINAL_DST_ADDRESS_KEY):
            target = str(state.get_data(ORIGINAL_DST_ADDRESS_KEY))
        if target is None and self.original_dst_metadata_key is not None:
            value = metadata_value(request.downstream_metadata, *self.original_dst_metadata_key)
            if isinstance(value, str) and value:
                target = value
        target = target or request.original_destination
        if not target:
            return defer.fail(UpstreamError(400, "no original destination in the request"))
        try:
            authority = parse_authority(target)
        except BadAuthority as e:
            return defer.fail(UpstreamError(400, str(e)))
        port = self.upstream_port_override or authority.port
        d = self._resolve(SocketAddress(authority.host, port))
        policy = self.target_policy

        def check(address: Address) -> Address:
            assert isinstance(address, SocketAddress)
            ip = ip_of(address.host)
            if policy is not None and (ip is None or not policy.allows(ip, address.port)):
                # The resolved address only where it says more than the authority.
                shown = f"{authority}" if str(address) == str(authority) else (
                    f"{authority} ({address})"
                )
                raise UpstreamError(403, f"target {shown} is outside the allowed targets",
                                    flag="DENY")
            return address

        return d.addCallback(check)

    def lookup(self, host: str, port: int) -> defer.Deferred[list[Any]]:
        """
        getaddrinfo in the reactor's thread pool (a test may replace this).
        """
        return threads.deferToThreadPool(  # type: ignore[no-any-return]
            self.reactor, self.reactor.getThreadPool(),
            socket.getaddrinfo, host, port, type=socket.SOCK_STREAM,
        )

    def _resolve(self, address: SocketAddress) -> defer.Deferred[Address]:
        if ip_of(address.host) is not None:
            return defer.succeed(address)
        d = self.lookup(address.host, address.port)
        # getaddrinfo cannot be interrupted: the tunnel stops waiting for it, the thread
        # finishes on its own.
        timeout = self.connect_timeout
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda *_: _raise(
            UpstreamError(503, f"cannot resolve {address.host} within {timeout:g}s")))

        def first(infos: list[Any]) -> Address:
            if not infos:
                raise UpstreamError(503, f"{address.host} has no addresses")
            return SocketAddress(infos[0][4][0], address.port)

        def failed(f: Any) -> Any:
            if f.check(UpstreamError, defer.CancelledError):
                return f
            raise UpstreamError(503, f"cannot resolve {address.host}: {f.value}")

        return d.addCallbacks(first, failed)

    # -- raw byte streams ---------------------------------------------------------------------

    def connect_stream(
        self, protocol: IProtocol, request: UpstreamRequest
    ) -> defer.Deferred[Address]:
        """
        Connect ``protocol`` to a host of this cluster over TCP (TLS if configured) or an
        internal listener; fire with the address once connected.
        """
        self.stats.upstream_cx_total += 1
        d = self.pick(request)

        def connect(address: Address) -> defer.Deferred[Address]:
            def connected(_: Any) -> Address:
                self._track(address, protocol)
                return address

            return self._connect_to(address, protocol, request).addCallback(connected)

        d.addCallback(connect)
        d.addErrback(self._count_failure)
        return d

    def _passthrough(self, address: Address) -> dict[str, dict[str, Any]]:
        """
        Envoy's InternalUpstreamTransport passthrough_metadata: the named namespaces of the
        host's or the cluster's metadata (a namespace missing from it is counted and skipped).
        """
        passed: dict[str, dict[str, Any]] = {}
        for kind, namespace in self.passthrough_metadata:
            source = (address.metadata or {}) if kind == "host" else self.metadata
            if namespace in source:
                passed[namespace] = source[namespace]
            else:
                self.stats.internal_upstream_no_metadata += 1
        return passed

    def _track(self, address: Address, protocol: IProtocol) -> None:
        """
        Count the connection against ``address`` until ``protocol`` loses it (LEAST_REQUEST
        balances on these counts; the stats report the active total).
        """
        self._active[address] = self._active.get(address, 0) + 1
        self.stats.upstream_cx_active += 1
        if isinstance(protocol, RelayEnd) and protocol.untrack is None:
            # A tunnel's relay end (nearly always): it calls untrack itself, no closure and
            # no per-instance method for every tunnel.
            protocol.untrack = (self, address)
            return
        lost = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            self.untrack(address)
            lost(reason)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]

    def untrack(self, address: Address) -> None:
        """``address``'s connection (counted by _track) is gone."""
        self._active[address] -= 1
        self.stats.upstream_cx_active -= 1

    def _count_handshake(self, protocol: IProtocol) -> None:
        # Wrapped on the instance: TLSMemoryBIOProtocol looks handshakeCompleted up there.
        stats, done = self.stats, [False]
        completed = getattr(protocol, "handshakeCompleted", None)
        lost = protocol.connectionLost

        def handshake_completed() -> None:
            done[0] = True
            stats.ssl_handshake += 1
            if completed is not None:
                completed()

        def connection_lost(reason: Any) -> None:
            if not done[0]:
                stats.ssl_connection_error += 1
            lost(reason)

        protocol.handshakeCompleted = handshake_completed  # type: ignore[attr-defined]
        protocol.connectionLost = connection_lost  # type: ignore[method-assign]

    def _count_failure(self, f: Any) -> Any:
        # A connect the downstream gave up on did not fail.
        if not f.check(defer.CancelledError):
            self.stats.upstream_cx_connect_fail += 1
        return f

    def _connect_to(
        self, address: Address, protocol: IProtocol, request: UpstreamRequest
    ) -> defer.Deferred[Any]:
        if isinstance(address, InternalAddress):
            if self.passthrough_metadata:
                request = attrs.evolve(request, dynamic_metadata=self._passthrough(address))
            return self.runtime.internal_listeners.connect(address, protocol, request)
        factory: Any = _OneShotFactory(protocol)
        if self.client_tls is not None:
            factory = FastTLSFactory(self.client_tls, True, factory)
            self._count_handshake(protocol)
        d = _connect_tcp(self.reactor, address, self.connect_timeout, factory)

        def failed(f: Any) -> Any:
            if f.check(defer.CancelledError):
                return f
            if f.check(ierror.TimeoutError):
                self.stats.upstream_cx_connect_timeout += 1
                raise UpstreamError(503, f"connect to {address} timed out "
                                         f"after {self.connect_timeout:g}s")
            raise UpstreamError(503, f"connect to {address} failed: {_short(f.value)}")

        return d.addErrback(failed)

    # -- tunnels ------------------------------------------------------------------------------

    def open_tunnel(
        self,
        protocol: IProtocol,
        authority: str,
        headers: list[tuple[str, str]],
        request: UpstreamRequest,
        post_path: str | None = None,
    ) -> defer.Deferred[tuple[Address, dict[bytes, bytes]]]:
        """
        Carry ``protocol`` in a CONNECT tunnel for ``authority`` to a host of this cluster;
        fire with (host address, response headers) once the tunnel is up (2xx).
        """
        self.stats.upstream_rq_total += 1
        d = self.pick(request)

        def opened(address: Address) -> defer.Deferred[Any]:
            if self.upstream_protocol == "http2":
                tunnel = self._pool_for(address).open_tunnel(authority, headers, post_path)

                def attach(result: Any) -> Any:
                    stream, response_headers = result
                    self._track(address, protocol)
                    stream.attach(protocol)
                    return address, response_headers

                return tunnel.addCallback(attach)
            return self._open_h1_tunnel(address, protocol, authority, headers)

        tunnel: defer.Deferred[Any] = d.addCallback(opened)
        timeout = self.connect_timeout + self.tunnel_response_timeout
        tunnel.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda *_: _raise(
            UpstreamError(504, f"no tunnel response within {timeout:g}s")))
        return tunnel

    def _open_h1_tunnel(
        self, address: Address, protocol: IProtocol, authority: str,
        headers: list[tuple[str, str]],
    ) -> defer.Deferred[Any]:
        client = H1TunnelClient(authority, headers)
        d = self._connect_to(address, client, UpstreamRequest())

        def connected(_: Any) -> defer.Deferred[Any]:
            return client.response

        def established(status: int) -> Any:
            self._track(address, protocol)
            client.attach(protocol)
            return address, {b":status": str(status).encode()}

        return d.addCallback(connected).addCallback(established)

    def _pool_for(self, address: Address) -> H2Pool:
        key = PoolKey(str(address), *self._pool_identities)
        pool = self.pools.get(key)
        if pool is None:
            pool = H2Pool(
                key,
                lambda: self._connect_h2(address),
                self.reactor,
                max_streams=self.max_streams_per_connection,
                idle_timeout=self.pool_idle_timeout,
                max_connections=self.circuit_breakers.max_connections,
                max_pending=self.circuit_breakers.max_pending_requests,
                pending_timeout=self.connect_timeout,
            )
            self.pools[key] = pool
        return pool

    def _connect_h2(self, address: Address) -> defer.Deferred[H2TunnelClient]:
        client = H2TunnelClient(self.h2_settings, self.reactor, tls=self.client_tls is not None)
        d = self._connect_to(address, client, UpstreamRequest())
        d.addCallback(lambda _: client.ready)
        d.addTimeout(self.connect_timeout, self.reactor, onTimeoutCancel=lambda *_: _raise(
            UpstreamError(503, f"HTTP/2 connection to {address} not ready within "
                               f"{self.connect_timeout:g}s")))
        return d

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


class _OneShotFactory(Factory):
    """
    Connects one already-built protocol (quietly: one log line per connection is too many).
    """

    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol_instance


def _raise(error: Exception) -> Any:
    raise error


def _short(error: Any) -> str:
    if isinstance(error, ierror.ConnectionRefusedError):
        return "connection refused"
    text = str(error).rstrip(".")
    return text


def _identity_of(tls: TLSSettings) -> str:
    from hbonex.tls.spiffe import uri_sans

    uris = uri_sans(tls.certificate)
    return uris[0] if uris else ""


class _ConnectFactory(ClientFactory):
    """
    ``reactor.connectTCP`` with a Deferred, as TCP4ClientEndpoint gives, without the endpoint's
    wrapping protocol between the socket and ours for every event of the connection's life
    (one per tunnel on hbone-server). The Deferred fires with the protocol after its
    ``makeConnection``, as the endpoint's does; a cancel stops the connect.
    """

    noisy = False

    def __init__(self, inner: Factory, deferred: defer.Deferred[Any]) -> None:
        self.inner = inner
        self.deferred = deferred

    def doStart(self) -> None:
        self.inner.doStart()

    def doStop(self) -> None:
        self.inner.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        protocol: Any = self.inner.buildProtocol(addr)
        if protocol is None:
            return None
        deferred = self.deferred
        own = protocol.__dict__.get("makeConnection")
        make = protocol.makeConnection

        def make_connection(transport: Any) -> None:
            # Back to what it was before the connect: nothing of ours stays on the protocol.
            if own is None:
                del protocol.makeConnection
            else:
                protocol.makeConnection = own
            make(transport)
            if not deferred.called:
                deferred.callback(protocol)

        protocol.makeConnection = make_connection
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)


def _connect_tcp(
    reactor: Any, address: SocketAddress, timeout: float, factory: Factory
) -> defer.Deferred[Any]:
    # connectTCP takes IPv6 literals too; cluster addresses are resolved before this.
    connector: list[Any] = []

    def cancel(d: defer.Deferred[Any]) -> None:
        # Only while connecting (once connected d has fired); clientConnectionFailed then
        # finds d called and ignores the connect's failure, as TCP4ClientEndpoint does.
        connector[0].stopConnecting()

    d: defer.Deferred[Any] = defer.Deferred(cancel)
    connector.append(
        reactor.connectTCP(address.host, address.port, _ConnectFactory(factory, d),
                           timeout=timeout)
    )
    return d


__all__ = [
    "Address",
    "CircuitBreakers",
    "Cluster",
    "InternalAddress",
    "Runtime",
    "SocketAddress",
    "UpstreamRequest",
]
