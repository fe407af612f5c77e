"""
Every interface of hbonex, in one place.

The shapes follow Envoy: a listener accepts a connection and runs a filter chain of *network
filters* over it; a terminal filter (``tcp_proxy``, ``http_connection_manager``) relays the bytes
to a *cluster*.  Extensions (network filters, HTTP filters, cluster types, transport sockets) are
Twisted plugins providing the ``I*Extension`` interfaces below, so configuration resolves them by
Envoy name or ``@type`` URL through ``getPlugins``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
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

    def takeOver(protocol: IProtocol) -> None:
        """
        Hand the downstream connection to ``protocol`` (a terminal filter's codec or relay).
        Filters before the calling one keep seeing the bytes (onData) first; with none, the
        transport delivers its bytes to ``protocol`` directly.
        """

    def injectReadData(filter: INetworkFilter, data: bytes, endStream: bool) -> None:
        """
        Continue the chain after ``filter`` with ``data`` (e.g. bytes a filter transformed
        after returning False from onData).
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


class IExtension(Interface):
    """
    What every configurable extension (a Twisted plugin) says about itself.  Configuration
    finds it by ``typed_config['@type']`` (preferred, as Envoy does) or by ``name``.
    """

    name = Attribute("Envoy extension name, e.g. 'envoy.filters.network.tcp_proxy'")
    typeUrls = Attribute("tuple of accepted typed_config '@type' URLs (may be empty)")

    def parseConfig(config: object, path: str, context: object) -> object:
        """
        Validate ``config`` found at YAML ``path`` and return the parsed form.  ``config`` is
        the ``typed_config`` unpacked as its Envoy message (a google.protobuf Message of the
        plugin's ``@type``; an entry named without ``typed_config`` gets that message's
        defaults), or, for a plugin without a compiled proto, the ``value`` of the
        ``xds.type.v3.TypedStruct`` naming it as a plain mapping (hbonex.config.yamlpath.MarkedDict,
        read with ``context.node(config, path)``).  Raise hbonex.errors.ConfigError naming
        the path, what is wrong and what is accepted.  ``context`` is an
        hbonex.config.ConfigContext (reactor, runtime, clusters declared so far, helpers for
        the common Envoy types).
        """


class INetworkFilterExtension(IExtension):
    """
    A network filter type (listener filter chains).
    """

    def filterFactory(parsed: object, context: object) -> object:
        """
        Return a zero-argument callable that makes one INetworkFilter per connection.
        """


class IHTTPFilterExtension(IExtension):
    """
    An HTTP filter type (inside an http_connection_manager).
    """

    def filterFactory(parsed: object, context: object) -> object:
        """
        Return a zero-argument callable that makes one HTTP filter per request.
        """


class IHTTPFilterPerRouteExtension(IHTTPFilterExtension):
    """
    An HTTP filter type that also takes configuration per route (Envoy's
    ``typed_per_filter_config`` on a route, virtual host or route configuration, keyed by the
    filter's name in ``http_filters``).
    """

    perRouteTypeUrls = Attribute("The @type URLs of the per-route configuration it accepts.")

    def parsePerRouteConfig(config: object, path: str, context: object) -> object:
        """
        Parse one per-route configuration (the unpacked message, or a TypedStruct's value);
        the filter reads the result back with its callbacks' ``perFilterConfig()``.
        """


class IClusterTypeExtension(IExtension):
    """
    A cluster type (Envoy's ``type: STATIC`` etc.; ``name`` is the type's name).
    """

    def buildCluster(common: object, config: object, path: str, context: object) -> object:
        """
        Build an hbonex.upstream.cluster.Cluster from the already parsed common cluster settings
        (``common``, a dict of Cluster keyword arguments) and ``config``, the cluster's Envoy
        message (envoy.config.cluster.v3.Cluster).
        """


class ITransportSocketExtension(IExtension):
    """
    A transport socket (``envoy.transport_sockets.tls``, ``raw_buffer``).
    """

    def buildTransport(parsed: object, upstream: bool, context: object) -> object:
        """
        Return hbonex.tls.context.TLSSettings (or None for plain TCP).
        """


class IListenerFilterCallbacks(Interface):
    """
    What a listener filter sees of a connection just accepted (Envoy's
    ListenerFilterCallbacks): the transport and the connection's facts, which it may change.
    """

    transport = Attribute("the accepted connection's transport (TCP, TLS or internal)")
    info = Attribute(
        "the connection's hbonex.network.listener.ConnectionInfo: addresses (restorable), "
        "filter state, dynamic metadata, detected transport protocol, requested server name "
        "and application protocols"
    )

    def continueFilterChain(success: bool) -> None:
        """
        Resume the listener filters after this one stopped (onAccept returned False and it
        reads no data): the next filter runs, or the filter chain is chosen; ``False``
        closes the connection.
        """


class IListenerFilter(Interface):
    """
    One listener filter instance per accepted connection; it runs before the filter chain is
    chosen (Envoy's ListenerFilter).
    """

    def onAccept(callbacks: IListenerFilterCallbacks) -> bool | None:
        """
        The connection was accepted: read or change its facts.  Return None or True to let
        the next filter run (Envoy's Continue), False to stop (StopIteration): an
        IListenerReadFilter then gets the connection's first bytes (``onData``), any other
        filter calls ``callbacks.continueFilterChain`` later.
        """


class IListenerReadFilter(IListenerFilter):
    """
    A listener filter that peeks at the connection's first bytes (Envoy's ``onData`` with
    ``maxReadBytes``): the bytes are not consumed, the chosen chain reads them all.
    """

    def maxReadBytes() -> int:
        """
        The most bytes this filter needs to see; it is handed at most that many.
        """

    def onData(data: bytes) -> bool:
        """
        The bytes received so far (from the first, at most ``maxReadBytes()``).  Return True
        when done (Continue), False for more (StopIteration).  Seeing ``maxReadBytes()``
        bytes and still asking for more closes the connection; so does the peer's EOF or the
        listener's ``listener_filters_timeout`` (unless it continues on timeout).
        """


class IListenerFilterExtension(IExtension):
    """
    A listener filter type (``listener_filters``: tls_inspector, original_dst, http_inspector).
    """

    def listenerFilterFactory(parsed: object, context: object) -> object:
        """
        Return a zero-argument callable making one IListenerFilter per connection, or None
        when the filter's work is done by the listener itself (the TLS inspector: the
        listener inspects when its chains need it).
        """


# -- HTTP filters (Envoy's StreamDecoderFilter / StreamEncoderFilter model) ----------------------


class IStreamFilterCallbacks(Interface):
    """
    What a filter may ask of the request it runs in (Envoy's StreamFilterCallbacks).
    """

    def connection() -> IConnectionInfo:
        """
        The downstream connection's facts (addresses, peer SPIFFE id, SNI, ALPN, and the
        tunnel's facts carried inward).
        """

    def streamInfo() -> object:
        """
        hbonex.http.stream_info.StreamInfo: response flags, filter state, timings, bytes.
        """

    def route() -> object:
        """
        The route chosen for the current request headers (hbonex.http.routing.RouteDecision), or
        None; computed on first use and cached until clearRouteCache().
        """

    def clearRouteCache() -> None:
        """
        Headers changed in a way that may change the route: choose it again on next use.
        """

    def perFilterConfig() -> object:
        """
        This filter's most specific ``typed_per_filter_config`` for the current route (the
        route's, else its virtual host's, else the route configuration's), as the filter's
        plugin parsed it (IHTTPFilterPerRouteExtension); None when there is none.
        """

    def perFilterConfigs() -> tuple[object, ...]:
        """
        Every level's ``typed_per_filter_config`` for this filter on the current route, least
        specific first (the route configuration's, the virtual host's, the route's), as its
        plugin parsed them: Envoy's getAllPerFilterConfig, for filters that combine levels.
        """

    def resetStream() -> None:
        """
        Abort the request (RST_STREAM, or close an HTTP/1.1 connection).
        """


class IStreamDecoderFilterCallbacks(IStreamFilterCallbacks):
    def continueDecoding() -> None:
        """
        Resume the request after a Stop* status: what was held goes on to the next filters.
        """

    def decodingBuffer() -> object:
        """
        The request body buffered at this filter so far (bytes or None).
        """

    def addDecodedData(data: bytes, streaming: bool) -> None:
        """
        Add to the buffered request body (from decodeData or decodeTrailers).
        """

    def modifyDecodingBuffer(data: bytes) -> None:
        """
        Replace the request body buffered at this filter.
        """

    def sendLocalReply(
        status: int, body: bytes, modifyHeaders: Any, details: str, responseFlag: str
    ) -> None:
        """
        Answer the request ourselves (the encoder filters still see the reply) and stop
        decoding.
        """

    def encodeHeaders(headers: Any, endStream: bool) -> None:
        """
        Start the response (a filter acting as the upstream: the router).
        """

    def encodeData(data: bytes, endStream: bool) -> None:
        """
        Response body, after encodeHeaders.
        """

    def encodeTrailers(trailers: Any) -> None:
        """
        Response trailers (ending the response).
        """

    def registerResponseProducer(producer: object) -> None:
        """
        The response's source (an IPushProducer) is paused while the client is full.
        """

    def unregisterResponseProducer() -> None:
        """
        The response's source is done.
        """

    def requestBodyProducer() -> object:
        """
        An IPushProducer whose pause stops reading the request body from the client.
        """

    def switchProtocols(protocol: object, onSwitched: Callable[[bool], None]) -> None:
        """
        An upgrade the upstream accepted (101): once the 101 has left the encoder filters
        for the client, the downstream connection (or stream) is handed to ``protocol`` (an
        IProtocol, e.g. a relay end) and ``onSwitched(True)`` is called; ``onSwitched(False)``
        if it cannot be (another response went instead, or the client is gone).
        """

    def upgradeFinished(bytesReceived: int, bytesSent: int) -> None:
        """
        The upgraded connection ended (the relay is done): the request is over, with the
        bytes relayed each way counted in its stream info (the access log's).
        """


class IStreamEncoderFilterCallbacks(IStreamFilterCallbacks):
    def continueEncoding() -> None:
        """
        Resume the response after a Stop* status.
        """

    def encodingBuffer() -> object:
        """
        The response body buffered at this filter so far (bytes or None).
        """

    def addEncodedData(data: bytes, streaming: bool) -> None:
        """
        Add to the buffered response body.
        """

    def modifyEncodingBuffer(data: bytes) -> None:
        """
        Replace the response body buffered at this filter.
        """


class IStreamDecoderFilter(Interface):
    """
    Sees the request: headers, then body chunks, then trailers, in ``http_filters`` order.
    Each method returns one of hbonex.http.filter_manager's status values.
    """

    def setDecoderFilterCallbacks(callbacks: IStreamDecoderFilterCallbacks) -> None:
        """
        Called once, before anything else.
        """

    def decodeHeaders(headers: Any, endStream: bool) -> object:
        """
        Request headers (hbonex.http.headers.Headers, mutable) -> FilterHeadersStatus.
        """

    def decodeData(data: bytes, endStream: bool) -> object:
        """
        A request body chunk -> FilterDataStatus.
        """

    def decodeTrailers(trailers: Any) -> object:
        """
        Request trailers (mutable Headers) -> FilterTrailersStatus.
        """

    def onDestroy() -> None:
        """
        The request is over (completed or reset): release whatever is held.
        """


class IStreamEncoderFilter(Interface):
    """
    Sees the response: headers, body, trailers, in reverse ``http_filters`` order.
    """

    def setEncoderFilterCallbacks(callbacks: IStreamEncoderFilterCallbacks) -> None:
        """
        Called once, before anything else.
        """

    def encodeHeaders(headers: Any, endStream: bool) -> object:
        """
        Response headers (mutable) -> FilterHeadersStatus.
        """

    def encodeData(data: bytes, endStream: bool) -> object:
        """
        A response body chunk -> FilterDataStatus.
        """

    def encodeTrailers(trailers: Any) -> object:
        """
        Response trailers -> FilterTrailersStatus.
        """

    def onDestroy() -> None:
        """
        The request is over.
        """


class IStreamFilter(IStreamDecoderFilter, IStreamEncoderFilter):
    """
    A filter on both paths (Envoy's StreamFilter).
    """
