"""
Listeners and filter chains.

A listener accepts connections on a kernel socket (a Twisted server endpoint) or as an
internal listener, picks a filter chain, performs the chain's TLS handshake if it has one, then
runs the chain's network filters.  A terminal filter (tcp_proxy, http_connection_manager)
takes the connection over; from then on the transport talks to it directly.
"""

from __future__ import annotations

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

from hbonex.fasttls import FastTLSFactory, tune_tcp
from hbonex.interfaces import IConnectionInfo, INetworkFilter, INetworkFilterCallbacks
from hbonex.tls import ServerTLS, handshake_failure_reason, peer_identity

FilterFactory = Callable[[], INetworkFilter]


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


@implementer(IConnectionInfo)
@attrs.define
class ConnectionInfo:
    listenerName: str
    remoteAddress: str
    localAddress: str
    requestedServerName: str = ""
    peerIdentity: str = ""
    negotiatedProtocol: bytes | None = None
    started: float = attrs.Factory(time.time)
    upstream_request: Any = None

    def substitutions(self) -> dict[str, str]:
        return {
            "remote": self.remoteAddress,
            "local": self.localAddress,
            "sni": self.requestedServerName,
            "peer_uri_san": self.peerIdentity,
        }


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

    def __init__(self, listener: Listener, chain: FilterChain, tls: bool) -> None:
        self.listener = listener
        self.chain = chain
        self.tls = tls
        self.info: ConnectionInfo
        self.filters: list[INetworkFilter] = []
        self._next = 0
        self._started = False
        self._delegate: IProtocol | None = None
        self._handshake_call: IDelayedCall | None = None
        self._stopped_data: list[tuple[bytes, bool]] = []

    def connectionMade(self) -> None:
        transport = self.transport
        tune_tcp(transport)
        self.info = ConnectionInfo(
            listenerName=self.listener.name,
            remoteAddress=address_text(transport.getPeer()),  # type: ignore[union-attr]
            localAddress=address_text(transport.getHost()),  # type: ignore[union-attr]
            upstream_request=getattr(transport, "upstream_request", None),
        )
        if self.tls:
            self._handshake_call = self.listener.reactor.callLater(
                self.chain.handshake_timeout, self._handshake_timeout
            )
        else:
            self._start()

    def _handshake_timeout(self) -> None:
        self._handshake_call = None
        self.log.warn(
            "{listener}: TLS handshake from {peer} timed out after {t}s",
            listener=self.listener.name, peer=self.info.remoteAddress,
            t=self.chain.handshake_timeout,
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        transport: Any = self.transport
        tls_conn = transport._tlsConnection
        self.info.peerIdentity = peer_identity(tls_conn)
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
        while self._next < len(self.filters):
            f = self.filters[self._next]
            self._next += 1
            if self._delegate is not None:
                return
            if not f.onNewConnection(self):
                return
        pending, self._stopped_data = self._stopped_data, []
        for data, end in pending:
            self._filter_data(data, end)

    def takeOver(self, protocol: IProtocol) -> None:
        self._delegate = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    # -- IProtocol ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        delegate = self._delegate
        if delegate is not None:
            delegate.dataReceived(data)
            return
        self._filter_data(data, False)

    def _filter_data(self, data: bytes, end: bool) -> None:
        if self._next < len(self.filters) or not self._started:
            # A filter stopped iteration at connection time: hold data until it continues.
            self._stopped_data.append((data, end))
            return
        for f in self.filters:
            if not f.onData(data, end):
                break
            if self._delegate is not None:
                if data:
                    self._delegate.dataReceived(data)
                if end:
                    self.readConnectionLost()
                return

    def readConnectionLost(self) -> None:
        delegate = self._delegate
        if delegate is not None:
            if IHalfCloseableProtocol.providedBy(delegate):
                delegate.readConnectionLost()  # type: ignore[attr-defined]
            else:
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._filter_data(b"", True)

    def writeConnectionLost(self) -> None:
        delegate = self._delegate
        if delegate is not None and IHalfCloseableProtocol.providedBy(delegate):
            delegate.writeConnectionLost()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        if self.tls and not self._started:
            tls_conn = getattr(self.transport, "_tlsConnection", None)
            self.log.warn(
                "{listener}: TLS handshake from {peer} failed: {reason}",
                listener=self.listener.name,
                peer=self.info.remoteAddress,
                reason=handshake_failure_reason(tls_conn, _reason_text(reason)),
            )
        for f in self.filters:
            f.onClose(reason)
        delegate, self._delegate = self._delegate, None
        if delegate is not None:
            delegate.connectionLost(reason)


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
        chain = listener.select_chain(addr)
        if chain is None:
            listener.log.warn(
                "{listener}: no filter chain matches a connection from {peer}, closing",
                listener=listener.name, peer=address_text(addr),
            )
            return None
        listener.connections_total += 1
        if chain.tls is not None:
            wrapper = listener.tls_factories[id(chain)]
            return wrapper.buildProtocol(addr)  # type: ignore[no-any-return]
        protocol = ListenerConnection(listener, chain, False)
        protocol.factory = self
        return protocol


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
    ) -> None:
        self.name = name
        self.reactor = reactor
        self.filter_chains = list(filter_chains)
        self.endpoint = endpoint
        self.internal = internal
        self.per_connection_buffer_limit_bytes = per_connection_buffer_limit_bytes
        self.connections_total = 0
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

        return FastTLSFactory(chain.tls, False, Inner())

    def select_chain(self, addr: Any) -> FilterChain | None:
        """
        The filter chain for a new connection (most specific destination-port match first).
        """
        port = None
        if self.endpoint is not None:
            port = _endpoint_port(self.endpoint)
        best = None
        for chain in self.filter_chains:
            want = chain.match.destination_port
            if want is not None and want != port:
                continue
            if best is None or (want is not None and best.match.destination_port is None):
                best = chain
        return best


def _endpoint_port(description: str) -> int | None:
    for part in description.split(":")[1:2]:
        if part.isdigit():
            return int(part)
    return None
