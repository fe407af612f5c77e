"""
The tunnel client: opens CONNECT tunnels over HTTP/2 (many streams per connection) or
HTTP/1.1 (one TLS connection per tunnel).  What it hands back is a byte-stream transport.
"""

from __future__ import annotations

from typing import Any, Iterable

import h2.events
import h2.exceptions
from hpack import NeverIndexedHeaderTuple
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from hbonex.errors import UpstreamError
from hbonex.h2 import fastheaders
from hbonex.h2.connection import ErrorCodes, H2Stream, H2TunnelConnection, headers_dict
from hbonex.h2.settings import H2Settings
from hbonex.interfaces import IHalfCloseableTransport
from hbonex.tls.context import handshake_failure_reason

MAX_RESPONSE_HEAD = 64 * 1024
_UNIQUE_PER_TUNNEL = frozenset({b"traceparent", b"forwarded"})


@implementer(IHandshakeListener)
class H2TunnelClient(H2TunnelConnection):
    """
    Client end of an HBONE HTTP/2 connection.  ``ready`` fires once the TLS handshake is done
    and the server's SETTINGS arrived (so its MAX_CONCURRENT_STREAMS is known).
    """

    client_side = True
    log = Logger()

    def __init__(self, settings: H2Settings, reactor: IReactorTime, tls: bool = True) -> None:
        super().__init__(settings, reactor)
        #: False for plain-text HTTP/2 (h2c, as the article's configs use).
        self.tls = tls
        # Giving up on a connection (the pool's readiness timeout) cuts it: one that finished
        # its handshake later would otherwise live on outside any pool.
        self.ready: defer.Deferred[H2TunnelClient] = defer.Deferred(lambda _: self._abandon())
        self._settings_seen = False
        self._handshake_done = False
        self._pending: dict[int, defer.Deferred[tuple[H2Stream, dict[bytes, bytes]]]] = {}
        #: Ordinary requests waiting for their response headers: stream id -> the response
        #: side (decodeHeaders/decodeData/decodeTrailers/onUpstreamReset).
        self._requests: dict[int, Any] = {}
        #: Called by the pool when streams free up / the connection dies.
        self.on_capacity: Any = None
        self.on_lost: Any = None
        self.last_stream_id_allowed: int | None = None

    def connectionMade(self) -> None:
        # Over TLS, wait for the handshake: nothing HTTP/2 goes out before the server is
        # verified.
        if not self.tls:
            self.handshakeCompleted()

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        proto = getattr(self.transport, "negotiatedProtocol", None)
        if proto not in (b"h2", None):
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        super().connectionMade()

    def _abandon(self) -> None:
        if self.transport is not None and not self._lost:
            self.abort("abandoned before it was ready")

    def settings_changed(self) -> None:
        if not self._settings_seen:
            self._settings_seen = True
            if not self.ready.called:
                self.ready.callback(self)
        elif self.on_capacity is not None:
            self.on_capacity(self)

    def state_changed(self) -> None:
        # DRAINING or CLOSED: the pool stops using this connection at once.
        if self.on_capacity is not None:
            self.on_capacity(self)

    @property
    def capacity(self) -> int:
        """
        How many more streams the peer lets us open now.
        """
        if not self.accepting_streams or not self._settings_seen:
            return 0
        return self.peer_max_concurrent_streams - len(self.streams)

    def open_tunnel(
        self, authority: str, headers: list[tuple[str, str]], post_path: str | None = None
    ) -> defer.Deferred[tuple[H2Stream, dict[bytes, bytes]]]:
        """
        Send a CONNECT (or, with ``post_path``, a POST) and fire with (stream, response headers)
        on a 2xx, or fail with UpstreamError.
        """
        if self.capacity <= 0:
            return defer.fail(UpstreamError(503, "connection has no free stream", retryable=True))
        stream_id = self.conn.get_next_available_stream_id()
        if post_path is None:
            request = [(b":method", b"CONNECT"), (b":authority", authority.encode("latin-1"))]
        else:
            request = [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", authority.encode("latin-1")),
                (b":path", post_path.encode("latin-1")),
            ]
        for k, v in headers:
            name = k.lower().encode("latin-1")
            # Values unique to each tunnel only churn the HPACK table: never index them.
            value = v.encode("latin-1")
            if name in _UNIQUE_PER_TUNNEL:
                request.append(NeverIndexedHeaderTuple(name, value))
            else:
                request.append((name, value))
        try:
            fastheaders.send_headers(self.conn, stream_id, request)
        except h2.exceptions.TooManyStreamsError:
            return defer.fail(UpstreamError(503, "peer stream limit reached", retryable=True))
        except h2.exceptions.ProtocolError as e:  # pragma: no cover - capacity says 0 first
            return defer.fail(UpstreamError(503, f"connection unusable: {e}", retryable=True))
        self.guard.stream_opened(stream_id)
        stream = H2Stream(self, stream_id)
        self.add_stream(stream)

        def cancel(_: Any) -> None:
            # Forget it before the reset, so the reset does not fail it with a 503 and
            # cancel() fails it with CancelledError, as callers (tcp_proxy, the pool) expect.
            self._pending.pop(stream_id, None)
            stream.reset(ErrorCodes.CANCEL)

        d: defer.Deferred[tuple[H2Stream, dict[bytes, bytes]]] = defer.Deferred(cancel)
        self._pending[stream_id] = d

        def closed_before_response(reason: Failure) -> None:
            pending = self._pending.pop(stream_id, None)
            if pending is not None:
                retry = False
                if (
                    reason.check(ierror.ConnectionLost)
                    and getattr(reason.value, "code", None) == ErrorCodes.REFUSED_STREAM
                ):
                    retry = True
                pending.errback(
                    UpstreamError(503, f"tunnel closed before response: {reason.value}", retry,
                                  unprocessed=retry)
                )

        stream.on_closed = closed_before_response
        self._flush()
        return d

    def open_request(
        self, headers: list[tuple[bytes, bytes]], end_stream: bool, response: Any
    ) -> H2Stream:
        """
        Send an ordinary request (the router's, upstream over HTTP/2); its response goes to
        ``response``.  The caller checked ``capacity``.
        """
        from hbonex.http.codec2 import H2ResponseBody

        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self.guard.stream_opened(sid)
        stream = H2Stream(self, sid)
        if end_stream:
            stream._end_requested = stream._ended_local = True
        self.add_stream(stream)
        self._requests[sid] = response
        stream.attach(H2ResponseBody(response))
        self._flush()
        return stream

    def response_received(self, event: h2.events.ResponseReceived) -> None:
        response = self._requests.pop(event.stream_id, None)
        if response is not None:
            from hbonex.http.headers import Headers

            ended = event.stream_ended is not None
            stream = self.streams.get(event.stream_id)
            if ended and stream is not None and stream.protocol is not None:
                stream.protocol.ended = True  # type: ignore[attr-defined]  # no body follows
            response.decodeHeaders(Headers(event.headers), ended)
            return
        d = self._pending.pop(event.stream_id, None)
        stream = self.streams.get(event.stream_id)
        if d is None or stream is None:
            return
        stream.on_closed = None
        headers = headers_dict(event.headers)
        status = headers.get(b":status", b"")
        if status.startswith(b"2") and len(status) == 3:
            d.callback((stream, headers))
            return
        stream.reset(ErrorCodes.CANCEL)
        code = int(status) if status.isdigit() else 502
        d.errback(UpstreamError(code, f"tunnel refused by server with status {code}"))

    def goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.last_stream_id_allowed = event.last_stream_id
        # Streams the server never processed can be retried elsewhere (RFC 9113 §6.8).
        for stream_id in list(self._pending):
            if event.last_stream_id is not None and stream_id > event.last_stream_id:
                d = self._pending.pop(stream_id)
                stream = self.streams.get(stream_id)
                if stream is not None:
                    stream.on_closed = None
                    stream._connection_closed(Failure(ierror.ConnectionDone("GOAWAY")))
                d.errback(UpstreamError(503, "server sent GOAWAY", retryable=True,
                                        unprocessed=True))
        if self.on_capacity is not None:
            self.on_capacity(self)

    def stream_forgotten(self, stream: H2Stream) -> None:
        if self.on_capacity is not None:
            self.on_capacity(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._handshake_done:
            tls = getattr(self.transport, "_tlsConnection", None)
            why = handshake_failure_reason(tls, str(reason.value))
            error = UpstreamError(503, f"TLS handshake with server failed: {why}")
        else:
            error = UpstreamError(503, f"connection lost: {reason.value}", retryable=True)
        if not self.ready.called:
            self.ready.errback(error)
        pending, self._pending = self._pending, {}
        super().connectionLost(reason)
        for d in pending.values():
            d.errback(error)
        if self.on_lost is not None:
            self.on_lost(self)


@implementer(IHalfCloseableTransport, ITransport, IConsumer, IPushProducer)
class H1TunnelTransport:
    """
    The connection of an HTTP/1.1 tunnel (TLS or plain TCP), after the CONNECT exchange, as a
    byte transport.

    Half-close is the connection's: a TCP FIN, or over TLS close_notify then FIN
    (hbonex.tls.fasttls), while the other direction goes on.
    """

    def __init__(self, tls_transport: Any) -> None:
        self._t = tls_transport
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self._t.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._t.writeSequence(data)

    def loseWriteConnection(self) -> None:
        lose_write = getattr(self._t, "loseWriteConnection", None)
        if lose_write is None:
            # A transport that cannot half-close: keep it open; the relay closes it once the
            # other direction is done too (or at its idle timeout).
            return
        lose_write()

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._t.loseConnection()

    def abortConnection(self) -> None:
        self._t.abortConnection()

    def getPeer(self) -> Any:
        return self._t.getPeer()

    def getHost(self) -> Any:
        return self._t.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._t.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._t.unregisterProducer()

    def pauseProducing(self) -> None:
        self._t.pauseProducing()

    def resumeProducing(self) -> None:
        self._t.resumeProducing()

    def stopProducing(self) -> None:
        self._t.stopProducing()


@implementer(IHalfCloseableProtocol)
class H1TunnelClient(Protocol):
    """
    One HTTP/1.1 CONNECT tunnel over its own connection (TLS or plain TCP).  ``response``
    fires with the status once a 2xx arrived; then ``attach(protocol)`` connects the byte
    stream, half-close included.

    Nothing of the tunnel is written before the 2xx: the byte stream is attached only then.

    (IHandshakeListener is added per instance over TLS only: Twisted's endpoint wrapper
    provides just the last of the interfaces it forwards, and over plain TCP it must forward
    IHalfCloseableProtocol.)
    """

    log = Logger()

    def __init__(self, authority: str, headers: list[tuple[str, str]]) -> None:
        self.authority = authority
        self.headers = headers
        self.response: defer.Deferred[int] = defer.Deferred(lambda _: self._abort())
        self._buffer = b""
        self._head_done = False
        self._handshake_done = False
        self.protocol: Any = None
        self.tunnel_transport: H1TunnelTransport | None = None
        #: EOF from the server before a protocol was attached (delivered by attach).
        self._eof = False
        self._tls = False

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def makeConnection(self, transport: Any) -> None:
        self._tls = getattr(transport, "_tlsConnection", None) is not None
        if self._tls:
            alsoProvides(self, IHandshakeListener)
        else:
            self._handshake_done = True
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        lines = [f"CONNECT {self.authority} HTTP/1.1", f"Host: {self.authority}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))  # type: ignore

    def handshakeCompleted(self) -> None:
        self._handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        if self._head_done:
            if self.protocol is not None:
                self.protocol.dataReceived(data)
            else:
                self._buffer += data
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_RESPONSE_HEAD:
                self._fail(UpstreamError(502, "CONNECT response head too large"))
            return
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        self._head_done = True
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            self._fail(UpstreamError(502, f"bad CONNECT response {status_line!r}"))
            return
        status = int(parts[1])
        if not 200 <= status < 300:
            self._fail(UpstreamError(status, f"tunnel refused by server with status {status}"))
            return
        self.tunnel_transport = H1TunnelTransport(self.transport)
        self.response.callback(status)

    def attach(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.tunnel_transport)
        early, self._buffer = self._buffer, b""
        if early:
            protocol.dataReceived(early)
        if self._eof and self.protocol is not None:
            self._eof_to(protocol)

    def readConnectionLost(self) -> None:
        if not self._head_done:
            # The server ended its side before answering: the tunnel failed.
            self._fail(UpstreamError(503, "connection closed before the CONNECT response"))
            return
        self._eof = True
        if self.protocol is not None:
            self._eof_to(self.protocol)

    def _eof_to(self, protocol: Any) -> None:
        if IHalfCloseableProtocol.providedBy(protocol):
            protocol.readConnectionLost()
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        if self.protocol is not None and IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.writeConnectionLost()

    def _fail(self, error: UpstreamError) -> None:
        if not self.response.called:
            self.response.errback(error)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.response.called:
            if not self._handshake_done:
                tls = getattr(self.transport, "_tlsConnection", None)
                why = handshake_failure_reason(tls, str(reason.value))
                self.response.errback(UpstreamError(503, f"TLS handshake failed: {why}"))
            else:
                self.response.errback(
                    UpstreamError(503, f"connection lost before response: {reason.value}")
                )
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(reason)
