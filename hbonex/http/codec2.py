"""
Ordinary HTTP/2 requests (not CONNECT tunnels) on an HBONE/HTTP/2 connection: each request
stream is an H2Stream (flow control and backpressure as for tunnels) whose bytes feed the
request's filter chain, and whose response is written back by an :class:`H2ResponseSink`.

A malformed request is a stream error (RST_STREAM PROTOCOL_ERROR, RFC 9113 §8.1.1); it never
harms the other streams of the connection.

An extended CONNECT other than ``bytestream`` (RFC 8441: websocket over HTTP/2) is an
upgrade, as in Envoy's codec: its headers reach the filters in the HTTP/1.1 form (GET,
``upgrade``, ``connection: upgrade``), a 101 goes out as 200, and after it the stream is
handed to the relay (:class:`H2UpgradeSink`).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.h2.connection import ErrorCodes, H2Stream, H2TunnelConnection
from hbonex.http.codec1 import HOP_BY_HOP
from hbonex.http.filter_manager import IResponseSink
from hbonex.http.headers import Headers
from hbonex.http.upgrade import h1_response_to_h2, h2_request_to_h1, h2_upgrade_protocol

_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})


def malformed_request(items: list[tuple[bytes, bytes]]) -> str | None:
    """
    Why an HTTP/2 request's header list (as received) is malformed (RFC 9113 §8.2-8.3), or
    None.
    """
    seen: set[bytes] = set()
    regular = False
    values: dict[bytes, bytes] = {}
    for name, value in items:
        if name != name.lower():
            return f"uppercase header name {name!r}"
        if name.startswith(b":"):
            if regular:
                return f"pseudo-header {name!r} after a regular header"
            if name not in _REQUEST_PSEUDO:
                return f"unknown pseudo-header {name!r}"
            if name in seen:
                return f"repeated pseudo-header {name!r}"
            seen.add(name)
            values[name] = value
        else:
            regular = True
            if name in HOP_BY_HOP and not (name == b"te" and value == b"trailers"):
                return f"connection-specific header {name!r}"
        if b"\x00" in value or b"\r" in value or b"\n" in value:
            return f"invalid character in the value of {name!r}"
    method = values.get(b":method")
    if method is None:
        return "no :method"
    if method == b"CONNECT" and b":protocol" not in seen:
        return None if seen == {b":method", b":authority"} else "CONNECT with :scheme or :path"
    if not {b":scheme", b":path"} <= seen:
        return "no :scheme or :path"
    if values.get(b":path") == b"":
        return "empty :path"
    return None


@implementer(IResponseSink)
class H2ResponseSink:
    """A response written on the request's stream: HEADERS, DATA, trailing HEADERS."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream

    def sendHeaders(self, headers: Headers, endStream: bool) -> None:
        items = [(n, v) for n, v in headers.items() if n not in HOP_BY_HOP]
        self.stream.send_headers(items, endStream)

    def sendData(self, data: bytes, endStream: bool) -> None:
        if data:
            self.stream.write(data)
        if endStream:
            self.stream.loseWriteConnection()

    def sendTrailers(self, trailers: Headers) -> None:
        self.stream.writeTrailers(trailers.items())

    def reset(self) -> None:
        self.stream.reset(ErrorCodes.INTERNAL_ERROR)

    def registerProducer(self, producer: Any) -> None:
        # The stream's queue (or the connection's socket) is full: the producer pauses.
        if self.stream._producer is None and not self.stream._closed:
            self.stream.registerProducer(producer, True)

    def unregisterProducer(self) -> None:
        self.stream.unregisterProducer()

    def requestProducer(self) -> Any:
        # Pausing the stream stops delivery, and so the window updates: the client waits.
        return self.stream

    def switchProtocols(self, protocol: Any) -> bool:
        return False  # an ordinary request is no upgrade (see H2UpgradeSink)


@implementer(IResponseSink)
class H2UpgradeSink(H2ResponseSink):
    """
    The response to an extended CONNECT upgrade: in HTTP/2 form (101 → 200, no ``upgrade`` /
    ``connection``: Envoy's transformUpgradeResponseFromH1toH2); after a 101 the stream
    becomes the upgraded protocol's transport (switchProtocols).  Any other answer is an
    ordinary response, after which a client still sending is reset with NO_ERROR.
    """

    def __init__(self, stream: H2Stream, body: H2UpgradeBody) -> None:
        super().__init__(stream)
        self.body = body
        stream.stop_peer_after_end = True

    def sendHeaders(self, headers: Headers, endStream: bool) -> None:
        super().sendHeaders(h1_response_to_h2(headers), endStream)

    def switchProtocols(self, protocol: Any) -> bool:
        """
        The stream's bytes, END_STREAM and reset now go to ``protocol`` (the relay's
        downstream end), with what arrived and was not yet delivered; an END_STREAM already
        seen (held by H2UpgradeBody) follows at once.
        """
        stream = self.stream
        if stream._closed or stream._reset is not None or not stream.connection.may_send:
            return False  # the client (or the connection) went while the 101 was on its way
        stream.stop_peer_after_end = False
        self.body.handler = None
        stream.attach(protocol)
        if self.body.eof:
            protocol.readConnectionLost()
        return True


@implementer(IHalfCloseableProtocol)
class H2RequestBody(Protocol):
    """
    Attached to a request's stream: its body, trailers and end go to the request's handler
    (a FilterManager); a stream that ends otherwise (reset, connection lost) resets it.
    """

    def __init__(self, handler: Any, ended: bool) -> None:
        self.handler = handler
        #: The request ended with its headers (END_STREAM on HEADERS).
        self.ended = ended

    def dataReceived(self, data: bytes) -> None:
        self.handler.decodeData(data, False)

    def trailersReceived(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.ended = True
        self.handler.decodeTrailers(Headers(headers))

    def readConnectionLost(self) -> None:
        if not self.ended:
            self.ended = True
            self.handler.decodeData(b"", True)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not getattr(self.handler, "complete", True):
            self.handler.reset()


@implementer(IHalfCloseableProtocol)
class H2UpgradeBody(Protocol):
    """
    Attached to an extended CONNECT's stream until the switch: what arrives before the 101
    is upgrade payload for the router (sent upstream after the request head, as an HTTP/1.1
    upgrade's); END_STREAM is held for the relay (an upgrade's request side ends with it,
    never in the filter chain), as the HTTP/1.1 codec holds the client's FIN.
    """

    def __init__(self, handler: Any = None) -> None:
        self.handler = handler
        self.eof = False

    def dataReceived(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.decodeData(data, False)

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        handler, self.handler = self.handler, None
        if handler is not None and not getattr(handler, "complete", True):
            handler.reset()


@implementer(IHalfCloseableProtocol)
class H2ResponseBody(Protocol):
    """
    Attached to an upstream request's stream: the response body, trailers and end go to the
    response side (the router); a stream that ends otherwise is an upstream reset.
    """

    def __init__(self, response: Any) -> None:
        self.response = response
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.response.decodeData(data, False)

    def trailersReceived(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.ended = True
        self.response.decodeTrailers(Headers(headers))

    def readConnectionLost(self) -> None:
        if not self.ended:
            self.ended = True
            self.response.decodeData(b"", True)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.ended:
            self.ended = True
            self.response.onUpstreamReset(reason.getErrorMessage())


def serve_request(
    connection: H2TunnelConnection,
    stream_id: int,
    items: list[tuple[bytes, bytes]],
    end_stream: bool,
    new_stream: Callable[[IResponseSink], Any],
) -> H2Stream | None:
    """
    Run one HTTP/2 request (its header list as received) through the handler
    ``new_stream(sink)`` makes; a malformed one is reset with PROTOCOL_ERROR instead.
    """
    why = malformed_request(items)
    if why is not None:
        connection.log.info("{conn}: malformed request on stream {sid}: {why}",
                            conn=connection.describe(), sid=stream_id, why=why)
        connection.conn.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
        connection._flush()
        return None
    headers = Headers(items)
    stream = H2Stream(connection, stream_id)
    connection.add_stream(stream)
    if h2_upgrade_protocol(items) is not None:
        # Envoy's transformUpgradeRequestFromH2toH1: the filters, the routes and the router
        # see an HTTP/1.1 upgrade.  Its END_STREAM is held for the relay, not the chain.
        body = H2UpgradeBody()
        handler = body.handler = new_stream(H2UpgradeSink(stream, body))
        stream.attach(body)  # END_STREAM on the HEADERS reaches it as EOF (StreamEnded)
        handler.decodeHeaders(h2_request_to_h1(headers), False)
        return stream
    handler = new_stream(H2ResponseSink(stream))
    stream.attach(H2RequestBody(handler, end_stream))
    handler.decodeHeaders(headers, end_stream)
    return stream


__all__ = [
    "H2RequestBody",
    "H2ResponseBody",
    "H2ResponseSink",
    "H2UpgradeBody",
    "H2UpgradeSink",
    "malformed_request",
    "serve_request",
]
