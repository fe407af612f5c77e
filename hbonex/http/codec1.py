"""
The downstream HTTP/1.1 codec: requests parsed from a byte stream, one at a time (pipelined
requests wait their turn, answered in order), responses framed back.

Framing is strict where request smuggling lives: Content-Length together with
Transfer-Encoding, conflicting lengths, a transfer coding other than a final ``chunked``,
malformed chunk sizes, obs-fold, and NUL/CR/LF in header values are all 400 and the connection
is closed.  ``Expect: 100-continue`` is answered here (as Envoy does), not forwarded.  Limits:
the request head (``max_request_headers_kb``: 431), the request line (400), and the
``request_headers_timeout`` for a client that sends its head slowly.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.http.filter_manager import IResponseSink, reason_phrase
from hbonex.http.headers import Headers
from hbonex.http.upgrade import upgrade_type

#: RFC 9110 token characters (method and header names).
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Header values: visible characters, spaces and tabs (no NUL, CR or LF).
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,16}$")
#: Hop-by-hop headers, never passed on (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
    b"upgrade", b"trailer", b"proxy-authenticate", b"proxy-authorization",
})


@attrs.frozen
class Http1Limits:
    #: max_request_headers_kb, in bytes (request line and headers together).
    max_request_headers: int = 60 * 1024
    #: The request line alone.
    max_request_line: int = 16 * 1024
    #: request_headers_timeout (0: none): the whole head must arrive within it.
    request_headers_timeout: float = 10.0
    #: Idle time between requests on a kept-alive connection (0: none).
    idle_timeout: float = 3600.0


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Stream:
    """One request being answered; its response framing."""

    def __init__(self, method: bytes, version: bytes, keep_alive: bool) -> None:
        self.method = method
        self.version = version
        self.keep_alive = keep_alive
        self.handler: Any = None
        self.response_started = False
        self.chunked = False
        self.remaining: int | None = None
        self.response_done = False
        self.request_done = False
        #: An Upgrade request (not h2c): what follows its head is upgrade payload, passed on
        #: unparsed (as Envoy), whatever Content-Length or Transfer-Encoding it names.
        self.upgrade = False


@implementer(IResponseSink)
class _Sink:
    """The response side of one request, written in HTTP/1.1 framing."""

    def __init__(self, codec: Http1ServerCodec, stream: _Stream) -> None:
        self._codec = codec
        self._stream = stream

    def sendHeaders(self, headers: Headers, endStream: bool) -> None:
        self._codec._send_headers(self._stream, headers, endStream)

    def sendData(self, data: bytes, endStream: bool) -> None:
        self._codec._send_data(self._stream, data, endStream)

    def sendTrailers(self, trailers: Headers) -> None:
        self._codec._send_trailers(self._stream, trailers)

    def reset(self) -> None:
        self._codec._reset(self._stream)

    def registerProducer(self, producer: Any) -> None:
        # The client's socket is full: the producer (the upstream response) pauses.
        transport = self._codec.transport
        if transport is not None:
            try:
                transport.registerProducer(producer, True)  # type: ignore[attr-defined]
            except RuntimeError:  # one is registered already (an earlier response)
                pass

    def unregisterProducer(self) -> None:
        transport = self._codec.transport
        if transport is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]

    def requestProducer(self) -> Any:
        return _RequestSource(self._codec)

    def switchProtocols(self, protocol: Any) -> bool:
        return self._codec._switch(self._stream, protocol)


@implementer(IPushProducer)
class _RequestSource:
    """Pauses reading the request body from the client (the upstream is full)."""

    def __init__(self, codec: Http1ServerCodec) -> None:
        self._codec = codec

    def pauseProducing(self) -> None:
        self._codec.pause_reading("upstream")

    def resumeProducing(self) -> None:
        self._codec.resume_reading("upstream")

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Http1ServerCodec(Protocol):
    """
    ``new_stream(sink)`` is called for each request and returns its handler (an
    hbonex.http.filter_manager.FilterManager, or anything with decodeHeaders, decodeData,
    decodeTrailers and reset).
    """

    log = Logger()

    def __init__(
        self,
        new_stream: Callable[[IResponseSink], Any],
        reactor: Any,
        limits: Http1Limits = Http1Limits(),
        scheme: bytes = b"http",
    ) -> None:
        self.new_stream = new_stream
        self.reactor = reactor
        self.limits = limits
        self.scheme = scheme
        self._buffer = bytearray()
        self._state = "head"  # head, body, chunk-size, chunk-data, chunk-end, trailers, wait
        self._stream: _Stream | None = None
        self._remaining = 0
        self._trailers_buffer = bytearray()
        self._head_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._closing = False
        self._close_after_response = False
        #: Why reading from the client is paused: "pipeline" (a response is still going out)
        #: and/or "upstream" (the upstream cannot take the request body yet).
        self._pause_reasons: set[str] = set()
        self.requests = 0
        #: After a 101 to an upgrade: the protocol the connection's bytes now go to.
        self._switched: Any = None
        #: The client's EOF arrived while its upgrade request waited for the upstream.
        self._upgrade_eof = False

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self.limits.request_headers_timeout > 0:
            self._head_timer = self.reactor.callLater(
                self.limits.request_headers_timeout, self._head_timed_out
            )

    def _cancel(self, call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._state == "head":
            self._error(408, "request headers not received within "
                        f"{self.limits.request_headers_timeout:g}s")

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if self._state == "head" and not self._buffer:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._switched is not None:
            self._switched.dataReceived(data)
            return
        if self._closing:
            return
        self._buffer += data
        try:
            self._parse()
        except BadRequest as e:
            self._error(e.status, e.reason)

    def readConnectionLost(self) -> None:
        if self._switched is not None:
            self._switched.readConnectionLost()
            return
        stream = self._stream
        if stream is not None and stream.upgrade and not stream.response_done:
            # Kept for the relay if the upstream switches protocols; any other answer ends
            # the connection after it.
            self._upgrade_eof = True
            self._close_after_response = True
            return
        if stream is not None and not stream.request_done:
            # The client stopped sending mid-request: the request is truncated.
            self._abort_stream(stream)
        if self._stream is None or self._stream.response_done:
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self._close_after_response = True

    def writeConnectionLost(self) -> None:
        if self._switched is not None:
            self._switched.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel(self._head_timer)
        self._cancel(self._idle_timer)
        if self._switched is not None:
            self._switched.connectionLost(reason)
            return
        stream = self._stream
        if stream is not None and not (stream.request_done and stream.response_done):
            self._abort_stream(stream)

    def _abort_stream(self, stream: _Stream) -> None:
        handler, stream.handler = stream.handler, None
        stream.request_done = stream.response_done = True
        if handler is not None:
            handler.reset()

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        while not self._closing:
            state = self._state
            if state == "head":
                if not self._parse_head():
                    return
            elif state == "body":
                if not self._buffer:
                    return
                take = min(self._remaining, len(self._buffer))
                chunk = bytes(self._buffer[:take])
                del self._buffer[:take]
                self._remaining -= take
                self._body(chunk, self._remaining == 0)
            elif state == "chunk-size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > 1024:
                        raise BadRequest(400, "chunk size line too long")
                    return
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not _CHUNK_SIZE.match(size_text):
                    raise BadRequest(400, f"bad chunk size {line[:40]!r}")
                size = int(size_text, 16)
                if size == 0:
                    self._state = "trailers"
                    self._trailers_buffer = bytearray()
                else:
                    self._remaining = size
                    self._state = "chunk-data"
            elif state == "chunk-data":
                if not self._buffer:
                    return
                take = min(self._remaining, len(self._buffer))
                chunk = bytes(self._buffer[:take])
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "chunk-end"
                self._body(chunk, False)
            elif state == "chunk-end":
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise BadRequest(400, "chunk data not followed by CRLF")
                del self._buffer[:2]
                self._state = "chunk-size"
            elif state == "trailers":
                if not self._parse_trailers():
                    return
            elif state == "upgrade":
                # Upgrade payload before the upstream answered: to the router as it comes
                # (it reads one buffer at most ahead while the upstream connects).
                if not self._buffer:
                    return
                chunk = bytes(self._buffer)
                self._buffer.clear()
                stream = self._stream
                if stream is not None and stream.handler is not None:
                    stream.handler.decodeData(chunk, False)
                return
            else:  # "wait": the response to this request is still going out
                return

    def _parse_head(self) -> bool:
        buffer = self._buffer
        if self._stream is None and buffer[:2] == b"\r\n":
            del buffer[:2]  # RFC 9112 §2.2: ignore empty lines before a request
            return True
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            line_end = buffer.find(b"\r\n")
            if line_end < 0 and len(buffer) > self.limits.max_request_line:
                raise BadRequest(400, "request line too long")
            if len(buffer) > self.limits.max_request_headers:
                raise BadRequest(431, "request headers too large")
            return False
        if end > self.limits.max_request_headers:
            raise BadRequest(431, "request headers too large")
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        self._cancel(self._head_timer)
        self._head_timer = None
        self._cancel(self._idle_timer)
        self._idle_timer = None
        self._request(head)
        return True

    def _request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        request_line = lines[0]
        if len(request_line) > self.limits.max_request_line:
            raise BadRequest(400, "request line too long")
        parts = request_line.split(b" ")
        if len(parts) != 3:
            raise BadRequest(400, "malformed request line")
        method, target, version = parts
        if not _TOKEN.match(method):
            raise BadRequest(400, "malformed method")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadRequest(400 if not version.startswith(b"HTTP/") else 505,
                             "unsupported HTTP version")
        headers = Headers()
        regular = Headers()
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise BadRequest(400, "obsolete line folding")
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise BadRequest(400, "malformed header field")
            value = value.strip(b" \t")
            if _BAD_VALUE.search(value):
                raise BadRequest(400, "invalid character in a header value")
            regular.add(name, value)
        # Body framing (RFC 9112 §6), strict against request smuggling.
        te = regular.get_all(b"transfer-encoding")
        lengths = regular.get_all(b"content-length")
        chunked = False
        length = 0
        if te:
            if lengths:
                raise BadRequest(400, "both Content-Length and Transfer-Encoding")
            codings = [c.strip().lower() for c in b",".join(te).split(b",")]
            if codings != [b"chunked"]:
                raise BadRequest(501 if codings[-1:] == [b"chunked"] else 400,
                                 "unsupported transfer coding")
            if version == b"HTTP/1.0":
                raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            chunked = True
        elif lengths:
            values = {v.strip() for joined in lengths for v in joined.split(b",")}
            if len(values) != 1:
                raise BadRequest(400, "conflicting Content-Length values")
            (text,) = values
            if not text.isdigit() or len(text) > 18:
                raise BadRequest(400, "malformed Content-Length")
            length = int(text)
        # Pseudo-headers, as HTTP/2 carries them (the HCM sees one form for both).
        headers.add(b":method", method)
        host = regular.get(b"host")
        if method == b"CONNECT":
            headers.add(b":authority", target)
        elif target.startswith(b"/") or target == b"*":
            headers.add(b":scheme", self.scheme)
            if host is None and version == b"HTTP/1.1":
                raise BadRequest(400, "missing Host header")
            headers.add(b":authority", host or b"")
            headers.add(b":path", target)
        else:
            match = re.match(rb"^(https?)://([^/?#]+)([^#]*)$", target, re.I)
            if match is None:
                raise BadRequest(400, "malformed request target")
            headers.add(b":scheme", match.group(1).lower())
            headers.add(b":authority", match.group(2))
            headers.add(b":path", match.group(3) or b"/")
        connection = {t.strip().lower() for t in
                      b",".join(regular.get_all(b"connection")).split(b",") if t.strip()}
        keep_alive = (b"close" not in connection) if version == b"HTTP/1.1" else (
            b"keep-alive" in connection
        )
        expect = regular.get(b"expect")
        upgrade = upgrade_type(regular) if method != b"CONNECT" else None
        for name, value in regular:
            if name == b"te":
                if value.lower() == b"trailers":  # the one TE value HTTP/2 keeps
                    headers.add(b"te", b"trailers")
                continue
            if name in HOP_BY_HOP or name == b"host" or name in connection:
                continue
            if name == b"expect" and value.lower() == b"100-continue":
                continue  # answered here
            headers.add(name, value)
        if upgrade is not None:
            # Envoy forwards an upgrade's Upgrade and Connection, and its body framing with
            # the body itself, untouched: the upstream reads them as the client sent them.
            headers.add(b"upgrade", regular.get(b"upgrade") or b"")
            headers.add(b"connection", b"upgrade")
            if te:
                headers.add(b"transfer-encoding", b", ".join(te))
        stream = _Stream(method, version, keep_alive)
        stream.upgrade = upgrade is not None
        self._stream = stream
        self.requests += 1
        has_body = chunked or length > 0
        if expect is not None and expect.lower() == b"100-continue" and has_body:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        stream.handler = self.new_stream(_Sink(self, stream))
        if stream.upgrade:
            self._state = "upgrade"
            stream.handler.decodeHeaders(headers, False)
            return
        if chunked:
            self._state = "chunk-size"
        elif length:
            self._state = "body"
            self._remaining = length
        else:
            self._state = "wait"
            stream.request_done = True
        stream.handler.decodeHeaders(headers, not has_body)
        self._maybe_next()

    def _parse_trailers(self) -> bool:
        buffer = self._buffer
        if buffer[:2] == b"\r\n":
            del buffer[:2]
            self._finish_body(None)
            return True
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > self.limits.max_request_headers:
                raise BadRequest(431, "request trailers too large")
            return False
        block = bytes(buffer[:end])
        del buffer[: end + 4]
        trailers = Headers()
        for line in block.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name) or line[:1] in (b" ", b"\t"):
                raise BadRequest(400, "malformed trailer field")
            value = value.strip(b" \t")
            if _BAD_VALUE.search(value):
                raise BadRequest(400, "invalid character in a trailer value")
            trailers.add(name, value)
        self._finish_body(trailers)
        return True

    def _body(self, chunk: bytes, end: bool) -> None:
        stream = self._stream
        assert stream is not None
        if end:
            self._state = "wait"
            stream.request_done = True
        if stream.handler is not None:
            stream.handler.decodeData(chunk, end)
        if end:
            self._maybe_next()

    def _finish_body(self, trailers: Headers | None) -> None:
        stream = self._stream
        assert stream is not None
        self._state = "wait"
        stream.request_done = True
        if stream.handler is not None:
            if trailers:
                stream.handler.decodeTrailers(trailers)
            else:
                stream.handler.decodeData(b"", True)
        self._maybe_next()

    def _maybe_next(self) -> None:
        """
        The request is in; once its response is out too, the next pipelined request may be
        parsed.  Until then the connection stops reading (its bytes wait in the socket).
        """
        stream = self._stream
        if stream is None or not stream.request_done:
            return
        if not stream.response_done:
            self.pause_reading("pipeline")
            return
        self._stream = None
        if not stream.keep_alive or self._close_after_response:
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._state = "head"
        self._arm_head_timer()
        if self.limits.idle_timeout > 0 and not self._buffer:
            self._idle_timer = self.reactor.callLater(self.limits.idle_timeout,
                                                      self._idle_timed_out)
        self._pause_reasons.discard("upstream")
        self.resume_reading("pipeline")
        if self._buffer:
            self.reactor.callLater(0, self._continue_parsing)

    def _continue_parsing(self) -> None:
        if self._closing or self._state != "head":
            return
        try:
            self._parse()
        except BadRequest as e:
            self._error(e.status, e.reason)

    def drain(self) -> None:
        """
        The server is shutting down: close after the response in progress (it says
        ``connection: close``), or now if no request is under way.
        """
        self._close_after_response = True
        stream = self._stream
        if stream is None and not self._buffer:
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif stream is not None and not stream.response_started:
            stream.keep_alive = False

    def pause_reading(self, reason: str) -> None:
        if not self._pause_reasons and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self._closing:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- responses ----------------------------------------------------------------------------

    def _send_headers(self, stream: _Stream, headers: Headers, end: bool) -> None:
        if stream.response_started or stream.response_done:
            return
        stream.response_started = True
        if not stream.request_done:
            # Answered before the request body ended (a 413, a denial): the rest of the body
            # would have to be read and dropped; the connection closes instead, as Envoy's.
            stream.keep_alive = False
        status_text = headers.get(b":status", b"200") or b"200"
        status = int(status_text) if status_text.isdigit() else 502
        lines = [b"HTTP/1.1 %d %s" % (status, reason_phrase(status).encode())]
        if status == 101 and stream.upgrade:
            # Switching protocols: no body framing; the connection becomes the upgraded
            # protocol's once the router switches it (switchProtocols).
            lines += [n + b": " + v for n, v in headers
                      if not n.startswith(b":") and n not in HOP_BY_HOP]
            lines += [b"upgrade: " + (headers.get(b"upgrade") or b""), b"connection: upgrade"]
            self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")  # type: ignore[union-attr]
            return
        has_length = False
        for name, value in headers:
            if name.startswith(b":") or name in HOP_BY_HOP:
                continue
            if name == b"content-length":
                has_length = True
                stream.remaining = int(value) if value.isdigit() else None
            lines.append(name + b": " + value)
        no_body = stream.method == b"HEAD" or status in (204, 304) or 100 <= status < 200
        if not has_length and not no_body:
            if end:
                lines.append(b"content-length: 0")
            elif stream.version == b"HTTP/1.1":
                lines.append(b"transfer-encoding: chunked")
                stream.chunked = True
            else:
                stream.keep_alive = False  # the end of the body is the end of the connection
        if not stream.keep_alive:
            lines.append(b"connection: close")
        elif stream.version == b"HTTP/1.0":
            lines.append(b"connection: keep-alive")
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")  # type: ignore[union-attr]
        if end:
            self._response_done(stream)

    def _send_data(self, stream: _Stream, data: bytes, end: bool) -> None:
        if stream.response_done:
            return
        if stream.method != b"HEAD" and data:
            if stream.chunked:
                self.transport.writeSequence(  # type: ignore[union-attr]
                    [b"%x\r\n" % len(data), data, b"\r\n"]
                )
            else:
                self.transport.write(data)  # type: ignore[union-attr]
        if end:
            if stream.chunked:
                self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
            self._response_done(stream)

    def _send_trailers(self, stream: _Stream, trailers: Headers) -> None:
        if stream.response_done:
            return
        if stream.chunked:
            block = b"".join(n + b": " + v + b"\r\n" for n, v in trailers
                             if not n.startswith(b":"))
            self.transport.write(b"0\r\n" + block + b"\r\n")  # type: ignore[union-attr]
        self._response_done(stream)

    def _response_done(self, stream: _Stream) -> None:
        stream.response_done = True
        if stream is not self._stream:
            return
        if not stream.request_done:
            stream.request_done = True
            stream.handler = None
        self._maybe_next()

    def _switch(self, stream: _Stream, protocol: Any) -> bool:
        """
        After the 101: the connection's bytes go to ``protocol`` (the relay's downstream end)
        both ways, half-close included; this codec only passes events on.
        """
        if stream is not self._stream or self.transport is None or self._closing:
            return False  # the connection went while the 101 was on its way
        self._switched = protocol
        self._state = "switched"
        stream.handler = None
        stream.request_done = stream.response_done = True
        self._cancel(self._head_timer)
        self._cancel(self._idle_timer)
        if self._pause_reasons:
            self._pause_reasons.clear()
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        protocol.makeConnection(self.transport)
        if self._upgrade_eof:
            protocol.readConnectionLost()
        return True

    _answering_error = False

    def _reset(self, stream: _Stream) -> None:
        # HTTP/1.1 has no stream reset: the connection goes.
        stream.handler = None
        stream.request_done = stream.response_done = True
        self._closing = True
        if self._answering_error:
            return  # _error answers (400 if no response started) and closes the ordinary way
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _error(self, status: int, reason: str) -> None:
        """A request we cannot parse: answer it ourselves and close."""
        self.log.info("{peer}: bad HTTP/1.1 request: {reason}; {status}",
                      peer=_peer(self.transport), reason=reason, status=status)
        stream = self._stream
        if stream is not None and stream.handler is not None:
            # The filters and the upstream learn of it; their reset must not cut the
            # connection before the client has its 400.
            self._answering_error = True
            try:
                self._abort_stream(stream)
            finally:
                self._answering_error = False
        self._closing = True
        self._cancel(self._head_timer)
        if stream is None or not stream.response_started:
            body = reason_phrase(status).encode()
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\ncontent-type: text/plain\r\n"
                b"connection: close\r\n\r\n%s" % (status, body, len(body), body)
            )
        self.transport.loseConnection()  # type: ignore[union-attr]


def _peer(transport: Any) -> str:
    peer = getattr(transport, "getPeer", lambda: None)()
    host, port = getattr(peer, "host", "?"), getattr(peer, "port", "?")
    return f"{host}:{port}"


__all__ = ["BadRequest", "HOP_BY_HOP", "Http1Limits", "Http1ServerCodec"]
