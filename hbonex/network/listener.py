"""
Listeners and filter chains.

A listener accepts connections on a kernel socket (a Twisted server endpoint) or as an
internal listener, runs its listener filters (which may restore the destination or peek at the
first bytes), picks a filter chain with what they found (``filter_chain_match`` or the
``filter_chain_matcher``), performs the chain's TLS handshake if it has one, then runs the
chain's network filters.  A terminal filter (tcp_proxy, http_connection_manager)
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

from hbonex.filters.listener.tls_inspector import TlsInspectorFilter
from hbonex.http.stream_info import FilterState
from hbonex.interfaces import (
    IConnectionInfo,
    IListenerFilter,
    IListenerFilterCallbacks,
    IListenerReadFilter,
    INetworkFilter,
    INetworkFilterCallbacks,
)
from hbonex.network.listener_predicate import ListenerPredicate
from hbonex.network.matching import Matcher, split_address
from hbonex.network.overload import DownstreamLimit
from hbonex.tls.context import ServerTLS, handshake_failure_reason, peer_identity
from hbonex.tls.facts import TlsFacts
from hbonex.tls.fasttls import FastTLSFactory, tune_tcp

FilterFactory = Callable[[], INetworkFilter]
ListenerFilterFactory = Callable[[], IListenerFilter]


@attrs.frozen
class ListenerFilterEntry:
    """A configured listener filter: its factory, and when it is skipped (filter_disabled)."""

    make: ListenerFilterFactory
    disabled: ListenerPredicate | None = None
    name: str = ""


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
    #: The connection's filter state (network filters such as set_filter_state write it):
    #: ``filter_state``, made on first access (most connections never use one); the
    #: constructor's ``filter_state=`` sets it.
    _filter_state: FilterState | None = None
    #: Envoy's localAddressRestored(): a listener filter (original_dst) set localAddress to
    #: the connection's original destination; ORIGINAL_DST clusters then connect there.
    localAddressRestored: bool = False
    #: The connection's dynamic metadata, by namespace (an internal connection starts with
    #: what its cluster's internal_upstream transport socket passed through):
    #: ``dynamic_metadata``, made on first access like the filter state (network RBAC writes
    #: into it in place).
    _dynamic_metadata: dict[str, dict[str, Any]] | None = None
    #: Envoy's detectedTransportProtocol: "tls" (TLS inspector), else "raw_buffer" once the
    #: listener filters are done.
    transportProtocol: str = ""
    #: Envoy's requestedApplicationProtocols: the ClientHello's ALPN, or what the HTTP
    #: inspector found ("http/1.0", "http/1.1", "h2c").
    requestedApplicationProtocols: tuple[str, ...] = ()
    #: Envoy's directRemoteAddress: the peer as accepted, whatever a listener filter restores.
    directRemoteAddress: str = ""
    #: Envoy's connection.ssl(): the TLS handshake's certificate facts
    #: (hbonex.tls.facts.TlsFacts, computed when asked), None without TLS.
    ssl: Any = None

    def __attrs_post_init__(self) -> None:
        if not self.directRemoteAddress:
            self.directRemoteAddress = self.remoteAddress

    @property
    def filter_state(self) -> FilterState:
        state = self._filter_state
        if state is None:
            state = self._filter_state = FilterState()
        return state

    @filter_state.setter
    def filter_state(self, state: FilterState) -> None:
        self._filter_state = state

    @property
    def dynamic_metadata(self) -> dict[str, dict[str, Any]]:
        metadata = self._dynamic_metadata
        if metadata is None:
            metadata = self._dynamic_metadata = {}
        return metadata

    @dynamic_metadata.setter
    def dynamic_metadata(self, metadata: dict[str, dict[str, Any]]) -> None:
        self._dynamic_metadata = metadata

    def existing_filter_state(self) -> FilterState | None:
        """The filter state if anything made it yet, without making one."""
        return self._filter_state

    def existing_dynamic_metadata(self) -> dict[str, dict[str, Any]] | None:
        """The dynamic metadata if anything made it yet, without making it."""
        return self._dynamic_metadata

    def substitutions(self) -> dict[str, str]:
        record = {
            "connection_id": str(self.connectionId),
            "remote": self.remoteAddress,
            "local": self.localAddress,
            "sni": self.requestedServerName,
            "peer_uri_san": self.peerIdentity,
            "local_uri_san": self.localIdentity,
        }
        state = self._filter_state
        if state is not None and not state.is_empty():
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


@implementer(IHalfCloseableProtocol, IHandshakeListener, INetworkFilterCallbacks)
class ListenerConnection(Protocol):
    """
    One accepted connection running a filter chain.
    """

    log = Logger()
    # One per accepted connection (every tunnel on hbone-client), for its whole life.
    __slots__ = ("listener", "chain", "tls", "_accepted", "info", "filters", "_next",
                 "_started", "_delegate", "_pre", "_iterating", "_handshake_call",
                 "_handshake_failure", "_stopped_data", "transport", "connected")

    def __init__(self, listener: Listener, chain: FilterChain, tls: bool,
                 info: ConnectionInfo | None = None) -> None:
        self.transport: Any = None
        self.connected = 0
        self.listener = listener
        self.chain = chain
        self.tls = tls
        #: Built by the listener filter phase when there was one, else at connectionMade.
        self._accepted = info
        self.info: ConnectionInfo
        self.filters: list[INetworkFilter] = []
        self._next = 0
        self._started = False
        self._delegate: IProtocol | None = None
        #: The filters before the one that took over (they keep seeing the bytes).
        self._pre: Sequence[INetworkFilter] = ()
        self._iterating = False
        self._handshake_call: IDelayedCall | None = None
        #: Why the handshake failed when we ended it ourselves (the abort's own reason,
        #: "lost in a non-clean fashion", would hide it).
        self._handshake_failure = ""
        #: Bytes held while a filter stopped iteration (made when there are some).
        self._stopped_data: list[tuple[bytes, bool]] | None = None

    def connectionMade(self) -> None:
        self.listener.connections_active += 1
        transport = self.transport
        tune_tcp(transport)
        self.info = self._accepted or self.listener.connection_info(transport)
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
        self.info.ssl = TlsFacts.of_tls_connection(tls_conn, getattr(
            getattr(self.chain.tls, "settings", None), "certificate", None))
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
        pending, self._stopped_data = self._stopped_data, None
        for data, end in pending or ():
            self._read(data, end, 0)

    def takeOver(self, protocol: IProtocol) -> None:
        # Filters before the one taking over keep seeing the bytes (onData); if there are
        # none, the transport's bytes go straight to ``protocol``.
        self._pre = tuple(self.filters[: max(0, self._next - 1)])
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
            if self._stopped_data is None:
                self._stopped_data = []
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
        if listener.needs_filter_phase:
            return InspectingProtocol(listener, addr)
        chain = listener.select_chain() or listener.default_filter_chain
        if chain is None:
            listener.log.warn(
                "{listener}: no filter chain matches a connection from {peer}, closing",
                listener=listener.name, peer=address_text(addr),
            )
            listener.connection_closed()
            return None
        return listener.protocol_for(chain, addr)


@implementer(IHalfCloseableProtocol, IListenerFilterCallbacks)
class InspectingProtocol(Protocol):
    """
    The listener filter phase of one connection (Envoy's ActiveTcpSocket): runs the listener
    filters in order — the TLS inspector first when the chains need it, then the configured
    ones unless their ``filter_disabled`` holds — feeding those that peek the bytes received
    so far (never consumed), then picks the filter chain with what they found and hands it the
    connection and every byte seen.  The whole phase is bounded by the listener's
    ``listener_filters_timeout``.
    """

    def __init__(self, listener: Listener, addr: Any) -> None:
        self.listener = listener
        self.addr = addr
        self.info: ConnectionInfo
        self._buffer = b""
        self._inner: Protocol | None = None
        self._timeout: IDelayedCall | None = None
        self._entries = listener.filter_phase()
        self._index = 0
        #: The filter that stopped iteration (it reads data, or continues later), if any.
        self._waiting: IListenerFilter | None = None
        self._done = False

    def connectionMade(self) -> None:
        self.info = self.listener.connection_info(self.transport)
        timeout = self.listener.listener_filters_timeout
        if timeout > 0:
            self._timeout = self.listener.reactor.callLater(timeout, self._timed_out)
        self._run()

    # -- the listener filters -----------------------------------------------------------------

    def _run(self) -> None:
        while self._index < len(self._entries) and not self._done:
            entry = self._entries[self._index]
            if entry.disabled is not None and entry.disabled.matches(self.info):
                self._index += 1
                continue
            listener_filter = entry.make()
            if listener_filter.onAccept(self) is False:
                self._waiting = listener_filter
                if IListenerReadFilter.providedBy(listener_filter) and self._buffer:
                    self._feed()
                return
            self._index += 1
        if not self._done:
            self._pick()

    def _feed(self) -> None:
        reader: Any = self._waiting
        limit = reader.maxReadBytes()
        data = self._buffer[:limit]
        if reader.onData(data):
            self._continue()
        elif self._done:
            return
        elif len(data) >= limit:
            self.listener.log.warn(
                "{listener}: listener filter {name} still wants more than {limit} bytes from "
                "{peer}, closing", listener=self.listener.name,
                name=self._entries[self._index].name, limit=limit,
                peer=address_text(self.addr))
            self._close()

    def _continue(self) -> None:
        self._waiting = None
        self._index += 1
        self._run()

    def continueFilterChain(self, success: bool) -> None:
        if self._done:
            return
        if not success:
            self._close()
        elif self._waiting is not None:
            self._continue()

    def _close(self) -> None:
        self._finish()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _finish(self) -> None:
        self._done = True
        self._waiting = None
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _timed_out(self) -> None:
        self._timeout = None
        listener = self.listener
        name = self._entries[self._index].name if self._index < len(self._entries) else ""
        if listener.continue_on_listener_filters_timeout:
            # Envoy: the remaining listener filters are skipped, the chain is chosen now.
            self._waiting = None
            self._pick()
            return
        listener.log.warn(
            "{listener}: listener filter {name} got no answer from {peer} within {t}s, "
            "closing", listener=listener.name, name=name, peer=address_text(self.addr),
            t=listener.listener_filters_timeout,
        )
        self._finish()
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- choosing the chain -------------------------------------------------------------------

    def _pick(self) -> None:
        self._finish()
        listener = self.listener
        info = self.info
        if not info.transportProtocol:
            info.transportProtocol = "raw_buffer"  # Envoy's default when nothing detected
        chain = listener.find_chain(info)
        if chain is None:
            listener.log.warn(
                "{listener}: no filter chain matches {peer} (destination {local}, transport "
                "{transport}, SNI {sni!r}, application protocols {alpn}), closing",
                listener=listener.name, peer=info.remoteAddress, local=info.localAddress,
                transport=info.transportProtocol, sni=info.requestedServerName,
                alpn=list(info.requestedApplicationProtocols),
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        inner = listener.protocol_for(chain, self.addr, info)
        self._inner = inner
        inner.makeConnection(self.transport)
        data, self._buffer = self._buffer, b""
        if data:
            inner.dataReceived(data)

    # -- IProtocol ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._done:
            return  # closing
        self._buffer += data
        if self._waiting is not None and IListenerReadFilter.providedBy(self._waiting):
            self._feed()

    def readConnectionLost(self) -> None:
        inner = self._inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()  # type: ignore[attr-defined]
        else:
            # Envoy: the peer's EOF while the listener filters still read closes it.
            self._finish()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        inner = self._inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finish()
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
        #: Envoy's listener_filters_timeout: how long the listener filters (the TLS and HTTP
        #: inspectors' peeking) may take; 0 is no limit.
        self.listener_filters_timeout = 15.0
        #: Envoy's continue_on_listener_filters_timeout: at the timeout, choose the chain
        #: with what was found instead of closing.
        self.continue_on_listener_filters_timeout = False
        #: Listener filters run on each accepted connection before the chain is chosen
        #: (entries, or bare factories); the TLS inspector is not among them: it runs first
        #: whenever the chains need it.
        self.listener_filters: Sequence[ListenerFilterEntry | ListenerFilterFactory] = []
        #: Envoy's filter_chain_matcher: when set, it alone chooses the chain (by name), and
        #: the chains' filter_chain_match is ignored.
        self.filter_chain_matcher: Matcher | None = None
        #: The network inputs the matcher reads (message names), to know what to inspect.
        self.matcher_inputs: frozenset[str] = frozenset()
        #: Envoy's default_filter_chain: used when nothing matches.
        self.default_filter_chain: FilterChain | None = None
        self.factory = ListenerFactory(self)
        self.tls_factories: dict[int, FastTLSFactory] = {}
        self.set_chains(self.filter_chains)

    def set_chains(self, chains: Sequence[FilterChain],
                   default: FilterChain | None = None) -> None:
        """The filter chains (and the default chain); their TLS factories are made once."""
        self.filter_chains = list(chains)
        self.default_filter_chain = default
        self._by_name = {c.name: c for c in self.filter_chains if c.name}
        for chain in self.all_chains:
            if chain.tls is not None and id(chain) not in self.tls_factories:
                self.tls_factories[id(chain)] = self._tls_factory(chain)

    @property
    def all_chains(self) -> list[FilterChain]:
        """The filter chains, then the default chain if there is one."""
        default = self.default_filter_chain
        return self.filter_chains + ([default] if default is not None else [])

    def connection_info(self, transport: Any) -> ConnectionInfo:
        """The facts of a connection just accepted on ``transport``."""
        info = ConnectionInfo(
            listenerName=self.name,
            remoteAddress=address_text(transport.getPeer()),
            localAddress=address_text(transport.getHost()),
            upstream_request=getattr(transport, "upstream_request", None),
        )
        # An internal hop: the peer is whoever the hop's upstream side was serving (the
        # tunnel client's SPIFFE id past a terminated CONNECT); a TLS handshake here
        # replaces it with this connection's own peer.
        info.peerIdentity = getattr(info.upstream_request, "peer_identity", "") or ""
        shared = getattr(info.upstream_request, "filter_state", None)
        if shared is not None:
            # An internal hop: the connection starts with what the hop's upstream shared.
            info.filter_state = shared
        passed = getattr(info.upstream_request, "dynamic_metadata", None)
        if passed:
            info.dynamic_metadata = {ns: dict(v) for ns, v in passed.items()}
        return info

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
        Whether choosing a chain needs the ClientHello (SNI, ALPN, TLS or not): the listener
        then runs the TLS inspector first, whether listed or not.
        """
        chains = self.all_chains
        if len(chains) < 2:
            return False
        if len({c.tls is None for c in chains}) > 1:
            return True
        if self.filter_chain_matcher is not None:
            return bool(self.matcher_inputs & _TLS_INPUTS)
        return any(
            c.match.server_names or c.match.transport_protocol or c.match.application_protocols
            for c in chains
        )

    @property
    def needs_filter_phase(self) -> bool:
        """Whether connections go through listener filters before their chain is chosen."""
        return bool(self.listener_filters or self.filter_chain_matcher is not None
                    or self.needs_inspection)

    def filter_phase(self) -> list[ListenerFilterEntry]:
        """The listener filters one connection runs, in order."""
        entries = [e if isinstance(e, ListenerFilterEntry) else ListenerFilterEntry(e)
                   for e in self.listener_filters]
        if self.needs_inspection:
            entries.insert(0, ListenerFilterEntry(TlsInspectorFilter, None,
                                                  "envoy.filters.listener.tls_inspector"))
        return entries

    def find_chain(self, info: ConnectionInfo) -> FilterChain | None:
        """
        The chain for a connection whose listener filters are done (Envoy's findFilterChain):
        the matcher's named chain when there is a matcher, else filter_chain_match's
        precedence; the default chain when neither gives one.
        """
        if self.filter_chain_matcher is not None:
            name = self.filter_chain_matcher.match(info)
            if name is not None:
                return self._by_name.get(name)
            return self.default_filter_chain
        local = split_address(info.localAddress)
        chain = self.select_chain(
            local_port=local[1] if local is not None else None,
            server_name=info.requestedServerName,
            transport_protocol=info.transportProtocol,
            application_protocols=info.requestedApplicationProtocols,
            internal=local is None,
        )
        return chain or self.default_filter_chain

    def protocol_for(self, chain: FilterChain, addr: Any,
                     info: ConnectionInfo | None = None) -> Protocol:
        self.connections_total += 1
        if chain.tls is not None:
            factory = self.tls_factories[id(chain)]
            # As factory.buildProtocol(addr), with the connection's facts found so far.
            return factory.protocol(factory, ListenerConnection(self, chain, True, info))
        protocol = ListenerConnection(self, chain, False, info)
        protocol.factory = self.factory
        return protocol

    def select_chain(
        self,
        local_port: int | None = None,
        server_name: str = "",
        transport_protocol: str = "",
        application_protocols: Sequence[str] = (),
        internal: bool = False,
    ) -> FilterChain | None:
        """
        The filter chain for a connection, by Envoy's precedence: destination port, then
        server name (exact, then longest wildcard), transport protocol, application protocols;
        at each step the most specific matching chains win, chains without the criterion are
        the fallback.
        """
        if local_port is None and self.endpoint is not None and not internal:
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


#: Matcher inputs that read what the TLS inspector finds.
_TLS_INPUTS = frozenset({"ServerNameInput", "TransportProtocolInput", "ApplicationProtocolInput"})


def _endpoint_port(description: str) -> int | None:
    for part in description.split(":")[1:2]:
        if part.isdigit():
            return int(part)
    return None
