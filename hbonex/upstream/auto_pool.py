"""
Envoy's upstream ``auto_config`` for the router: every new connection offers h2 and
http/1.1 in ALPN, and what the server picks decides what the connection becomes, an HTTP/2
connection in the cluster's pool for that host (requests as streams) or an HTTP/1.1
connection in the cluster's HTTP/1.1 pool (one request at a time).  A request takes a
connection with room first (a free HTTP/2 stream, an idle HTTP/1.1 connection) and opens a
new one only when there is none.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.errors import UpstreamError
from hbonex.tunnel.client import H2TunnelClient
from hbonex.upstream.http1_client import Http1ClientCodec
from hbonex.upstream.http1_pool import Http1Pool, Overflow
from hbonex.upstream.http2_pool import H2Exchange

#: What auto_config offers (Envoy's default ALPN for it).
AUTO_ALPN = (b"h2", b"http/1.1")


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class AlpnSwitch(Protocol):
    """
    A new upstream TLS connection until its handshake is done; then the protocol ALPN chose
    (built by ``choose(negotiated)``) takes it over and receives everything that follows.
    """

    def __init__(self, choose: Any) -> None:
        self.choose = choose
        self.inner: Protocol | None = None
        #: Fires with the inner protocol once chosen, or fails if the connection is lost first.
        self.chosen: defer.Deferred[Protocol] = defer.Deferred(lambda _: self._abandon())

    def _abandon(self) -> None:
        # Given up on (the connect timeout): a handshake finishing later must not leave a
        # connection outside every pool.
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        inner = self.inner = self.choose(negotiated)
        inner.makeConnection(self.transport)
        if IHandshakeListener.providedBy(inner):
            inner.handshakeCompleted()  # type: ignore[attr-defined]
        self.chosen.callback(inner)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()  # type: ignore[attr-defined]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.chosen.called:
            self.chosen.errback(UpstreamError(
                503, f"connection lost before the TLS handshake: {reason.getErrorMessage()}"))


class AutoHttpPool:
    """``acquire()`` an exchange (HTTP/1.1 connection or HTTP/2 stream) for the router."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        breakers = cluster.circuit_breakers
        self.max_connections = breakers.max_connections
        #: The HTTP/1.1 connections ALPN made (it never dials by itself: ``_no_dial``).
        self.http1 = Http1Pool(cluster.reactor, self._no_dial,
                               max_connections=breakers.max_connections,
                               max_pending=breakers.max_pending_requests,
                               idle_timeout=cluster.pool_idle_timeout)
        self.connecting = 0
        #: How many connections ALPN made into each protocol (for the stats and the tests).
        self.negotiated = {"h2": 0, "http/1.1": 0}

    def _no_dial(self, codec: Http1ClientCodec) -> defer.Deferred[Any]:
        # Http1Pool dials by itself only for a request waiting at the connection limit when
        # one of its connections closed: that one goes through ALPN too.  Should the server
        # now pick h2, the connection joins the HTTP/2 pool for later requests and this one
        # fails (a router retry policy takes it there).
        def made(result: tuple[Any, Any]) -> Any:
            address, inner = result
            if inner is not codec:
                self.cluster._pool_for(address).adopt(inner)
                raise UpstreamError(503, "auto_config: the server negotiated h2 for a "
                                    "request waiting for an HTTP/1.1 connection")
            return address

        return self._dial(codec).addCallback(made)

    def _h2_connections(self) -> list[Any]:
        return [c for pool in self.cluster.pools.values() for c in pool.connections]

    def _total(self) -> int:
        return len(self.http1.connections) + len(self._h2_connections()) + self.connecting

    def acquire(self) -> defer.Deferred[Any]:
        if self.http1.idle:
            return self.http1.acquire()
        for pool in self.cluster.pools.values():
            if any(pool._room(c) > 0 for c in pool.connections):
                return pool.acquire_connection().addCallback(H2Exchange)
        if self._total() >= self.max_connections:
            # At the limit: wait for room on what there is.
            if self.http1.connections:
                return self.http1.acquire()
            for pool in self.cluster.pools.values():
                if pool.connections:
                    return pool.acquire_connection().addCallback(H2Exchange)
            return defer.fail(Overflow(503, "connection limit reached", flag="UO"))
        return self._dial().addCallback(self._exchange)

    def _exchange(self, made: tuple[Any, Any]) -> Any:
        address, inner = made
        if isinstance(inner, H2TunnelClient):
            pool = self.cluster._pool_for(address)
            pool.adopt(inner)
            return pool.acquire_connection().addCallback(H2Exchange)
        self.http1.connections.add(inner)
        return inner

    def _dial(self, codec: Http1ClientCodec | None = None) -> defer.Deferred[tuple[Any, Any]]:
        """
        A new connection to a host of the cluster, whatever ALPN made of it: (host address,
        H2TunnelClient or Http1ClientCodec, ``codec`` if given).
        """
        from hbonex.upstream.cluster import UpstreamRequest

        cluster = self.cluster
        self.connecting += 1

        def choose(negotiated: bytes | None) -> Protocol:
            if negotiated == b"h2":
                self.negotiated["h2"] += 1
                return H2TunnelClient(cluster.h2_settings, cluster.reactor, tls=True)
            # http/1.1, or a server without ALPN: HTTP/1.1 (Envoy's fallback).
            self.negotiated["http/1.1"] += 1
            if codec is not None:
                return codec
            return Http1ClientCodec(on_idle=self.http1._idle, on_closed=self.http1._closed)

        switch = AlpnSwitch(choose)
        d = cluster.connect_stream(switch, UpstreamRequest())

        def connected(address: Any) -> defer.Deferred[tuple[Any, Any]]:
            def ready(inner: Protocol) -> Any:
                if isinstance(inner, H2TunnelClient):
                    return inner.ready.addCallback(lambda _: (address, inner))
                return address, inner

            return switch.chosen.addCallback(ready)

        def done(result: Any) -> Any:
            self.connecting -= 1
            return result

        timeout = cluster.connect_timeout
        d.addCallback(connected)
        d.addTimeout(timeout, cluster.reactor, onTimeoutCancel=lambda *_: _raise(
            UpstreamError(503, f"no connection of cluster {cluster.name} ready within "
                               f"{timeout:g}s")))
        return d.addBoth(done)

    def close(self) -> None:
        self.http1.close()


def _raise(error: Exception) -> Any:
    raise error


__all__ = ["AUTO_ALPN", "AlpnSwitch", "AutoHttpPool"]
