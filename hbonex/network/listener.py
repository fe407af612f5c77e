"""
Listeners and filter chains.

A listener accepts connections on a kernel socket (a Twisted server endpoint) or as an
internal listener, picks a filter chain, performs the chain's TLS handshake if it has one, then
runs the chain's network filters.  A terminal filter (tcp_proxy, http_connection_manager)
takes the connection over; from then on the transport talks to it directly.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Sequence

import attrs
from twisted.internet import error as ierror
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.filters.listener.tls_inspector import (
    MAX_CLIENT_HELLO,
    ClientHello,
    NeedMore,
    looks_like_tls,
    parse_client_hello,
)
from hbonex.http.stream_info import FilterState
from hbonex.interfaces import (
    IConnectionInfo,
    IListenerFilter,
    IListenerFilterCallbacks,
    INetworkFilter,
    INetworkFilterCallbacks,
)
from hbonex.network.overload import DownstreamLimit
from hbonex.tls.context import ServerTLS, handshake_failure_reason, peer_identity
from hbonex.tls.fasttls import FastTLSFactory, tune_tcp

FilterFactory = Callable[[], INetworkFilter]
ListenerFilterFactory = Callable[[], IListenerFilter]


def address_text(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if isinstance(host, str) and host.startswith("envoy://"):
        return host
    if isinstance(host, str) and ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


_CONNECTION_IDS = itertools.count(1)


@implementer(IConnectionInfo)
@attrs.define
class ConnectionInfo:
    listenerName: str
    remoteAddress: str
    localAddress: str
    requestedServerName: str = ""
    peerIdentity: str = ""
    #: Our own SPIFFE identity on this connection (the chain's certificate).
    localIdentity: str = ""
    negotiatedProtocol: bytes | None = None
    started: float = attrs.Factory(time.time)
    upstream_request: Any = None
    #: Envoy's %CONNECTION_ID%: unique among this process's downstream connections.
    connectionId: int = attrs.Factory(lambda: next(_CONNECTION_IDS))
    #: The connection's filter state (network filters such as set_filter_state write it).
    filter_state: FilterState = attrs.Factory(FilterState)
    #: Envoy's localAddressRestored(): a listener filter (original_dst) set localAddress to
    #: the connection's original destination; ORIGINAL_DST clusters then connect there.
    localAddressRestored: bool = False
    #: The connection's dynamic metadata, by namespace (an internal connection starts with
    #: what its cluster's internal_upstream transport socket passed through).
    dynamic_metadata: dict[str, dict[str, Any]] = attrs.Factory(dict)
    #: The peer's address as accepted, whatever a listener filter restores into
    #: remoteAddress (Envoy's directRemoteAddress; RBAC's direct_remote_ip).
    directRemoteAddress: str = ""

    def substitutions(self) -> dict[str, str]:
        record = {
            "connection_id": str(self.connectionId),
            "remote": self.remoteAddress,
            "local": self.localAddress,
            "sni": self.requestedServerName,
            "peer_uri_san": self.peerIdentity,
            "local_uri_san": self.localIdentity,
        }
        state = self.filter_state
        if not state.is_empty():
            record.update((f"fs:{key}", str(state.get_data(key))) for key in state.keys())
        return record


@attrs.frozen
class FilterChainMatch:
    destination_port: int | None = None
    server_names: tuple[str, ...] = ()
    transport_protocol: str = ""
    application_protocols: tuple[str, ...] = ()


@attrs.define
class FilterChain:
    filters: Sequence[FilterFactory]
    tls: ServerTLS | None = None
    match: FilterChainMatch = FilterChainMatch()
    name: str = ""
    handshake_timeout: float = 10.0


@implementer(IHalfCloseableProtocol, IHandshakeListener, INetworkFilterCallbacks,
             IListenerFilterCallbacks)
class ListenerConnection(Protocol):
    """
    One accepted connection running a filter chain.
    """

    log = Logger()

    def __init__(self, listener: Listener, chain: FilterChain, tls: bool) -> None:
        self.listener = listener
        self.chain = chain
        self.tls = tls
        self.info: ConnectionInfo
        self.filters: list[INetworkFilter] = []
        self._next = 0
        self._started = False
        self._delegate: IProtocol | None = None
        self._pre: list[INetworkFilter] = []
        self._iterating = False
        self._handshake_call: IDelayedCall | None = None
        #: Why the handshake failed when we ended it ourselves (the abort's own reason,
        #: "lost in a non-clean fashion", would hide it).
        self._handshake_failure = ""
        self._stopped_data: list[tuple[bytes, bool]] = []

    def connectionMade(self) -> None:
        self.listener.connections_active += 1
        transport = self.transport
        tune_tcp(transport)
        self.info = ConnectionInfo(
            listenerName=self.listener.name,
            remoteAddress=address_text(transport.getPeer()),  # type: ignore[union-attr]
            localAddress=address_text(transport.getHost()),  # type: ignore[union-attr]
            upstream_request=getattr(transport, "upstream_request", None),
        )
        self.info.directRemoteAddress = self.info.remoteAddress
        # An internal hop: the peer is whoever the hop's upstream side was serving (the
        # tunnel client's SPIFFE id past a terminated CONNECT); a TLS handshake here
        # replaces it with this connection's own peer.
        self.info.peerIdentity = getattr(self.info.upstream_request, "peer_identity", "") or ""
        shared = getattr(self.info.upstream_request, "filter_state", None)
        if shared is not None:
            # An internal hop: the connection starts with what the hop's upstream shared.
            self.info.filter_state = shared
        passed = getattr(self.info.upstream_request, "dynamic_metadata", None)
        if passed:
            self.info.dynamic_metadata = {ns: dict(v) for ns, v in passed.items()}
        for make in self.listener.listener_filters:
            make().onAccept(self)
        if self.tls:
            self._handshake_call = self.listener.reactor.callLater(
                self.chain.handshake_timeout, self._handshake_timeout
            )
        else:
            self._start()

    def _handshake_timeout(self) -> None:
        self._handshake_call = None
        # connectionLost logs the failure, once, with this reason.
        self._handshake_failure = (
            f"handshake timed out after {self.chain.handshake_timeout:g} s"
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        self.listener.ssl_handshake += 1
        transport: Any = self.transport
        tls_conn = transport._tlsConnection
        self.info.peerIdentity = peer_identity(tls_conn)
        self.info.localIdentity = self.listener.local_identity(self.chain)
        sni = tls_conn.get_servername()
        self.info.requestedServerName = sni.decode("idna") if sni else ""
        self.info.negotiatedProtocol = transport.negotiatedProtocol
        self._start()

    def _start(self) -> None:
        self._started = True
        self.filters = [make() for make in self.chain.filters]
        self.continueReading()

    # -- INetworkFilterCallbacks ----------------------------------------------------------------

    def continueReading(self) -> None:
        self._iterating = True
        try:
            while self._next < len(self.filters) and self._delegate is None:
                f = self.filters[self._next]
                self._next += 1
                if not f.onNewConnection(self) and self._delegate is None:
                    return  # the filter calls continueReading() when it is ready
        finally:
            self._iterating = False
        self._replay()

    def _replay(self) -> None:
        pending, self._stopped_data = self._stopped_data, []
        for data, end in pending:
            self._read(data, end, 0)

    def takeOver(self, protocol: IProtocol) -> None:
        # Filters before the one taking over keep seeing the bytes (onData); if there are
        # none, the transport's bytes go straight to ``protocol``.
        self._pre = self.filters[: max(0, self._next - 1)]
        self._delegate = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]
        if not self._iterating:
            self._replay()

    def injectReadData(self, filter: INetworkFilter, data: bytes, endStream: bool) -> None:
        filters = self._pre if self._delegate is not None else self.filters
        self._read(data, endStream, filters.index(filter) + 1)

    # -- IProtocol ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        delegate = self._delegate
        if delegate is not None and not self._pre:
            delegate.dataReceived(data)
            return
        self._read(data, False, 0)

    def _read(self, data: bytes, end: bool, start: int) -> None:
        delegate = self._delegate
        if delegate is None and (self._next < len(self.filters) or not self._started):
            # A filter stopped iteration at connection time: hold data until it continues.
            self._stopped_data.append((data, end))
            return
        for f in (self._pre if delegate is not None else self.filters)[start:]:
            if not f.onData(data, end):
                return
        if delegate is not None:
            if data:
                delegate.dataReceived(data)
            if end:
                self._eof_to_delegate(delegate)

    def _eof_to_delegate(self, delegate: IProtocol) -> None:
        if IHalfCloseableProtocol.providedBy(delegate):
            delegate.readConnectionLost()  # type: ignore[attr-defined]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        delegate = self._delegate
        if delegate is not None and not self._pre:
            self._eof_to_delegate(delegate)
            return
        self._read(b"", True, 0)

    def writeConnectionLost(self) -> None:
        delegate = self._delegate
        if delegate is not None and IHalfCloseableProtocol.providedBy(delegate):
            delegate.writeConnectionLost()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.listener.connections_active -= 1
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        if self.tls and not self._started:
            self.listener.ssl_connection_error += 1
            tls_conn = getattr(self.transport, "_tlsConnection", None)
            self.log.warn(
                "{listener}: TLS handshake from {peer} failed: {reason}",
                listener=self.listener.name,
                peer=self.info.remoteAddress,
                reason=self._handshake_failure
                or handshake_failure_reason(tls_conn, _reason_text(reason)),
            )
        for f in self.filters:
            f.onClose(reason)
        delegate, self._delegate = self._delegate, None
        if delegate is not None:
            delegate.connectionLost(reason)
        self.listener.connection_closed()


def _reason_text(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ierror.ConnectionDone):
        return "connection closed by peer during handshake"
    text = str(value)
    return text if len(text) < 300 else text[:300] + "..."


class ListenerFactory(Factory):
    noisy = False

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> Protocol | None:
        listener = self.listener
        limit = listener.downstream_limit
        if limit is not None and not limit.admit(listener.name, address_text(addr)):
            listener.connections_refused += 1
            return None  # closed at once, before any TLS work
        if listener.needs_inspection:
            return InspectingProtocol(listener, addr)
        chain = listener.select_chain()
        if chain is None:
            listener.log.warn(
                "{listener}: no filter chain matches a connection from {peer}, closing",
                listener=listener.name, peer=address_text(addr),
            )
            listener.connection_closed()
            return None
        return listener.protocol_for(chain, addr)


@implementer(IHalfCloseableProtocol)
class InspectingProtocol(Protocol):
    """
    Envoy's TLS inspector: peeks at the first bytes (TLS or not, SNI, ALPN), picks the filter
    chain, then hands the connection — and the bytes seen so far — to that chain's protocol.
    """

    def __init__(self, listener: Listener, addr: Any) -> None:
        self.listener = listener
        self.addr = addr
        self._buffer = b""
        self._inner: Protocol | None = None
        self._timeout: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timeout = self.listener.reactor.callLater(
            self.listener.inspection_timeout, self._timed_out
        )

    def _timed_out(self) -> None:
        self._timeout = None
        self.listener.log.warn(
            "{listener}: {peer} sent no complete ClientHello within {t}s, closing",
            listener=self.listener.name, peer=address_text(self.addr),
            t=self.listener.inspection_timeout,
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        is_tls = looks_like_tls(self._buffer)
        if is_tls is None:
            return
        hello = ClientHello()
        if is_tls:
            try:
                hello = parse_client_hello(self._buffer)
            except NeedMore:
                if len(self._buffer) <= MAX_CLIENT_HELLO:
                    return
            except ValueError:
                pass
        self._pick(is_tls, hello)

    def _pick(self, is_tls: bool, hello: ClientHello) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        listener = self.listener
        host = self.transport.getHost()  # type: ignore[union-attr]
        chain = listener.select_chain(
            local_port=getattr(host, "port", None),
            server_name=hello.server_name,
            transport_protocol="tls" if is_tls else "raw_buffer",
            application_protocols=hello.alpn,
        )
        if chain is None:
            listener.log.warn(
                "{listener}: no filter chain matches {peer} (transport {transport}, "
                "SNI {sni!r}, ALPN {alpn}), closing",
                listener=listener.name, peer=address_text(self.addr),
                transport="tls" if is_tls else "raw_buffer", sni=hello.server_name,
                alpn=list(hello.alpn),
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        inner = listener.protocol_for(chain, self.addr)
        self._inner = inner
        inner.makeConnection(self.transport)
        data, self._buffer = self._buffer, b""
        if data:
            inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        inner = self._inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()  # type: ignore[attr-defined]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        inner = self._inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        if self._inner is not None:
            self._inner.connectionLost(reason)
        else:
            self.listener.connection_closed()  # no chain took it over


def _server_name_score(patterns: Sequence[str], name: str) -> int:
    """
    Envoy's server_names precedence: exact (highest), then the longest matching '*.suffix'
    wildcard; -1 when nothing matches.
    """
    best = -1
    for pattern in patterns:
        p = pattern.lower()
        if p == name:
            return 1_000_000
        if p.startswith("*.") and name.endswith(p[1:]) and len(name) > len(p) - 1:
            best = max(best, len(p))
    return best


class Listener:
    """
    A listener: a name, where it listens (endpoint string, or internal) and filter chains.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        reactor: Any,
        filter_chains: Sequence[FilterChain],
        *,
        endpoint: str | None = None,
        internal: bool = False,
        per_connection_buffer_limit_bytes: int = 1024 * 1024,
        backlog: int = 1024,
    ) -> None:
        self.name = name
        self.backlog = backlog
        self.reactor = reactor
        self.filter_chains = list(filter_chains)
        self.endpoint = endpoint
        self.internal = internal
        self.per_connection_buffer_limit_bytes = per_connection_buffer_limit_bytes
        self.connections_total = 0
        self.connections_refused = 0
        #: Connections running a filter chain now (Envoy's downstream_cx_active).
        self.connections_active = 0
        #: Envoy's ``listener.<addr>.ssl.handshake`` and ``ssl.connection_error``.
        self.ssl_handshake = 0
        self.ssl_connection_error = 0
        self._local_identities: dict[int, str] = {}
        #: The process-wide downstream connection limit (set by the service), if any.
        self.downstream_limit: DownstreamLimit | None = None
        #: Envoy's ignore_global_conn_limit: the service sets no downstream_limit.
        self.ignore_global_conn_limit = False
        #: How long the TLS inspector waits for a ClientHello (Envoy: listener_filters_timeout).
        self.inspection_timeout = 15.0
        #: Listener filters run on each accepted connection before its network filters
        #: (the TLS inspector is not among them: choosing a chain runs it when needed).
        self.listener_filters: list[ListenerFilterFactory] = []
        self.factory = ListenerFactory(self)
        self.tls_factories: dict[int, FastTLSFactory] = {}
        for chain in self.filter_chains:
            if chain.tls is not None:
                self.tls_factories[id(chain)] = self._tls_factory(chain)

    def _tls_factory(self, chain: FilterChain) -> FastTLSFactory:
        listener = self

        class Inner(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Protocol:
                return ListenerConnection(listener, chain, True)

        assert chain.tls is not None
        return FastTLSFactory(chain.tls, False, Inner())

    def local_identity(self, chain: FilterChain) -> str:
        """The SPIFFE ID of the chain's certificate (computed once per chain)."""
        cached = self._local_identities.get(id(chain))
        if cached is None:
            cached = ""
            if chain.tls is not None:
                from hbonex.tls.spiffe import uri_sans

                certificate = getattr(getattr(chain.tls, "settings", None), "certificate", None)
                if certificate is not None:
                    uris = uri_sans(certificate)
                    cached = uris[0] if uris else ""
            self._local_identities[id(chain)] = cached
        return cached

    def connection_closed(self) -> None:
        """
        An accepted connection is gone (called once for each).
        """
        if self.downstream_limit is not None:
            self.downstream_limit.release()

    @property
    def needs_inspection(self) -> bool:
        """
        Whether choosing a chain needs the connection's first bytes (SNI, ALPN, TLS or not).
        """
        if len(self.filter_chains) < 2:
            return False
        return any(
            c.match.server_names or c.match.transport_protocol or c.match.application_protocols
            for c in self.filter_chains
        ) or len({c.tls is None for c in self.filter_chains}) > 1

    def protocol_for(self, chain: FilterChain, addr: Any) -> Protocol:
        self.connections_total += 1
        if chain.tls is not None:
            return self.tls_factories[id(chain)].buildProtocol(addr)  # type: ignore
        protocol = ListenerConnection(self, chain, False)
        protocol.factory = self.factory
        return protocol

    def select_chain(
        self,
        local_port: int | None = None,
        server_name: str = "",
        transport_protocol: str = "",
        application_protocols: Sequence[str] = (),
    ) -> FilterChain | None:
        """
        The filter chain for a connection, by Envoy's precedence: destination port, then
        server name (exact, then longest wildcard), transport protocol, application protocols;
        at each step the most specific matching chains win, chains without the criterion are
        the fallback.
        """
        if local_port is None and self.endpoint is not None:
            local_port = _endpoint_port(self.endpoint)
        chains = self.filter_chains
        exact = [c for c in chains if c.match.destination_port is not None
                 and c.match.destination_port == local_port]
        chains = exact or [c for c in chains if c.match.destination_port is None]
        if server_name:
            scored = [(_server_name_score(c.match.server_names, server_name), c) for c in chains]
            best = max((score for score, _ in scored), default=-1)
            if best >= 0:
                chains = [c for score, c in scored if score == best]
            else:
                chains = [c for c in chains if not c.match.server_names]
        else:
            chains = [c for c in chains if not c.match.server_names]
        if transport_protocol:
            exact = [c for c in chains if c.match.transport_protocol == transport_protocol]
            chains = exact or [c for c in chains if not c.match.transport_protocol]
        offered = set(application_protocols)
        exact = [c for c in chains if offered & set(c.match.application_protocols)]
        chains = exact or [c for c in chains if not c.match.application_protocols]
        return chains[0] if chains else None


def _endpoint_port(description: str) -> int | None:
    for part in description.split(":")[1:2]:
        if part.isdigit():
            return int(part)
    return None
