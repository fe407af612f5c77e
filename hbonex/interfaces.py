"""
Every interface of hbonex, in one place.

The shapes follow Envoy: a listener accepts a connection and runs a filter chain of *network
filters* over it; a terminal filter (``tcp_proxy``, ``http_connection_manager``) relays the bytes
to a *cluster*.  Extensions (network filters, HTTP filters, cluster types, transport sockets) are
Twisted plugins providing the ``I*Extension`` interfaces below, so configuration resolves them by
Envoy name or ``@type`` URL through ``getPlugins``.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    ITransport,
)
from zope.interface import Attribute, Interface


class IHalfCloseableTransport(ITransport, IConsumer, IPushProducer):
    """
    A byte stream transport that can shut down its write side while still reading: a TCP
    socket, an HTTP/2 CONNECT stream, or an internal-listener connection.
    """

    def loseWriteConnection() -> None:
        """
        Send EOF (TCP FIN, HTTP/2 END_STREAM) after everything already written.
        """

    def abortConnection() -> None:
        """
        Close at once, dropping buffered data (TCP RST, HTTP/2 RST_STREAM).
        """


class IConnectionInfo(Interface):
    """
    What the filters know about a downstream connection (Envoy's stream info).
    """

    remoteAddress = Attribute("'ip:port' (or internal listener name) of the peer")
    localAddress = Attribute("'ip:port' (or internal listener name) we accepted on")
    requestedServerName = Attribute("TLS SNI sent by the peer, or ''")
    peerIdentity = Attribute("SPIFFE ID (str) of the verified peer certificate, or ''")
    negotiatedProtocol = Attribute("ALPN protocol (bytes) or None")
    listenerName = Attribute("name of the listener that accepted the connection")


class INetworkFilterCallbacks(Interface):
    """
    What a network filter may do with its connection (Envoy's ReadFilterCallbacks).
    """

    transport = Attribute("the downstream IHalfCloseableTransport")
    info = Attribute("the IConnectionInfo of the downstream connection")

    def continueReading() -> None:
        """
        Resume iterating the filter chain after a filter returned STOP from onNewConnection.
        """

    def takeOver(protocol: object) -> None:
        """
        Hand the downstream connection to ``protocol`` (an IProtocol): from now on the
        transport delivers its bytes there directly, with no filter in between.
        """


class INetworkFilter(Interface):
    """
    One filter instance per downstream connection, in a listener's filter chain.
    """

    def onNewConnection(callbacks: INetworkFilterCallbacks) -> bool:
        """
        A connection was accepted.  Return True to continue with the next filter, False to
        stop iteration (the filter will call ``callbacks.continueReading()`` later).
        """

    def onData(data: bytes, endStream: bool) -> bool:
        """
        Bytes from downstream.  Return True to pass them on to the next filter.
        """

    def onClose(reason: object) -> None:
        """
        The downstream connection is gone.
        """


class INetworkFilterExtension(Interface):
    """
    A Twisted plugin that provides a network filter type.
    """

    name = Attribute("Envoy filter name, e.g. 'envoy.filters.network.tcp_proxy'")
    typeUrls = Attribute("tuple of accepted typed_config '@type' URLs")

    def parseConfig(config: dict, path: str, context: object) -> object:
        """
        Validate ``typed_config`` (without '@type') found at YAML ``path``; return the parsed
        config.  Raise hbonex.errors.ConfigError naming the path and the fix.
        """

    def filterFactory(parsed: object, context: object) -> object:
        """
        Return a zero-argument callable that makes one INetworkFilter per connection.
        """


class IHTTPFilterExtension(Interface):
    """
    A Twisted plugin that provides an HTTP filter type (used inside an HCM).
    """

    name = Attribute("Envoy filter name, e.g. 'envoy.filters.http.router'")
    typeUrls = Attribute("tuple of accepted typed_config '@type' URLs")

    def parseConfig(config: dict, path: str, context: object) -> object:
        """
        Validate and parse the filter's ``typed_config``.
        """


class IUpstream(Interface):
    """
    A cluster: how to reach upstream hosts, with what protocol, TLS and pool.
    """

    name = Attribute("cluster name")

    def connectTCP(protocolFactory: object, info: object) -> object:
        """
        Open a byte-stream connection to one host of the cluster for a downstream connection
        described by ``info`` (IConnectionInfo or None); return a Deferred firing with the
        connected protocol.
        """

    def openTunnel(authority: str, headers: list, protocol: object, info: object) -> object:
        """
        Open a CONNECT tunnel for ``authority`` through this cluster and connect ``protocol``
        to it; return a Deferred that fires with the response status (200) or fails with
        hbonex.errors.TunnelError.
        """


class ITunnelTarget(Interface):
    """
    Decides where a terminated CONNECT goes (a route to a cluster) and opens it.
    """

    def resolve(authority: str, headers: list, info: object) -> object:
        """
        Return a (status, cluster-or-None, reason) decision for a CONNECT request.
        """
