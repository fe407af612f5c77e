"""
The upstream HTTP/1.1 codec: one request at a time on a kept-alive connection (no
pipelining upstream, as Envoy), requests framed from HTTP/2-style headers, responses parsed
back into them.

A request's body streams as it arrives (Content-Length when the request said it, chunked
otherwise); the response streams back the same way: ``decodeHeaders``/``decodeData``/
``decodeTrailers`` on the ``response`` object given with the request (the router), and
``onUpstreamReset(reason)`` when the connection fails under it.  A response cut short (the
connection ends before its length or final chunk) is a reset, never a clean end.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.http.codec1 import HOP_BY_HOP
from hbonex.http.headers import Headers
from hbonex.http.upgrade import upgrade_type

_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,16}$")
MAX_RESPONSE_HEAD = 64 * 1024


#: Hop-by-hop headers an upgrade request keeps: the upgrade itself and its body framing.
_UPGRADE_KEPT = frozenset({b"upgrade", b"connection", b"transfer-encoding"})


class UpstreamProtocolError(Exception):
    pass


class _Request:
    def __init__(self, method: bytes, response: Any) -> None:
        self.method = method
        self.response = response
        self.chunked = False
        self.request_done = False
        self.response_done = False
        self.keep_alive = True
        #: An Upgrade request: its head and then raw bytes, as the client sent them.
        self.upgrade = False


@implementer(IHalfCloseableProtocol)
class Http1ClientCodec(Protocol):
    """
    One upstream HTTP/1.1 connection.  ``on_idle(codec)`` is called when a request/response
    exchange finished and the connection can take another; ``on_closed(codec)`` once it is
    gone.
    """

    log = Logger()

    def __init__(
        self,
        on_idle: Callable[[Http1ClientCodec], None] | None = None,
        on_closed: Callable[[Http1ClientCodec], None] | None = None,
    ) -> None:
        self.on_idle = on_idle
        self.on_closed = on_closed
        self._request: _Request | None = None
        self._buffer = bytearray()
        self._state = "idle"  # idle, head, body, chunk-size, chunk-data, chunk-end,
        #                       trailers, until-close, done
        self._remaining = 0
        self.lost = False
        self.connected = False
        #: After a 101 to an upgrade: the protocol the connection now belongs to (take_over).
        self._owner: Any = None
        self._switching = False
        self._eof = False

    @property
    def busy(self) -> bool:
        return self._request is not None

    def connectionMade(self) -> None:
        self.connected = True

    # -- the request --------------------------------------------------------------------------

    def start_request(self, headers: Headers, end_stream: bool, response: Any) -> None:
        """
        Send a request (HTTP/2-style headers); the response goes to ``response``.
        """
        if self._request is not None or self.lost:
            raise RuntimeError("connection busy or gone")
        method = headers.get(b":method") or b"GET"
        request = _Request(method, response)
        request.upgrade = upgrade_type(headers) is not None
        self._request = request
        target = headers.get(b":path") or b"/"
        if method == b"CONNECT":
            target = headers.get(b":authority") or b""
        lines = [method + b" " + target + b" HTTP/1.1"]
        authority = headers.get(b":authority")
        if authority and method != b"CONNECT":
            lines.append(b"host: " + authority)
        has_length = False
        for name, value in headers:
            if name.startswith(b":") or name == b"host":
                continue
            if name in HOP_BY_HOP and not (request.upgrade and name in _UPGRADE_KEPT):
                continue
            if name == b"content-length":
                has_length = True
            lines.append(name + b": " + value)
        if request.upgrade:
            # What follows is the client's, byte for byte (its framing included): no
            # chunking, no content-length of ours; the connection is never reused.
            request.keep_alive = False
        elif not end_stream and not has_length:
            lines.append(b"transfer-encoding: chunked")
            request.chunked = True
        elif end_stream and not has_length and method in (b"POST", b"PUT", b"PATCH"):
            lines.append(b"content-length: 0")
        if headers.get(b"te") == b"trailers":
            lines.append(b"te: trailers")
        self._state = "head"
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")  # type: ignore[union-attr]
        if end_stream:
            request.request_done = True

    def send_data(self, data: bytes, end_stream: bool) -> None:
        request = self._request
        if request is None or request.request_done or self.lost:
            return
        if request.upgrade:
            if data:
                self.transport.write(data)  # type: ignore[union-attr]
            return  # an upgrade's request side ends with the relay, never here
        if request.chunked:
            parts = [b"%x\r\n" % len(data), data, b"\r\n"] if data else []
            if end_stream:
                parts.append(b"0\r\n\r\n")
            if parts:
                self.transport.writeSequence(parts)  # type: ignore[union-attr]
        elif data:
            self.transport.write(data)  # type: ignore[union-attr]
        if end_stream:
            request.request_done = True
            self._maybe_idle()

    def send_trailers(self, trailers: Headers) -> None:
        request = self._request
        if request is None or request.request_done or self.lost:
            return
        if request.chunked:
            block = b"".join(n + b": " + v + b"\r\n" for n, v in trailers
                             if not n.startswith(b":"))
            self.transport.write(b"0\r\n" + block + b"\r\n")  # type: ignore[union-attr]
        request.request_done = True
        self._maybe_idle()

    def abort(self) -> None:
        """Give up the request: the connection cannot be reused."""
        self._request = None
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- the response -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._owner is not None:
            self._owner.dataReceived(data)
            return
        if self._switching:
            # Upgraded, not yet taken over: held (the transport is paused: one read at most).
            self._buffer += data
            return
        if self._request is None:
            if data:
                # Bytes nobody asked for: the connection is no longer in a known state.
                self.log.info("unexpected {n} bytes from an idle upstream connection", n=len(data))
                self.abort()
            return
        self._buffer += data
        try:
            self._parse()
        except UpstreamProtocolError as e:
            self._fail(f"malformed response: {e}")

    def _parse(self) -> None:
        while self._request is not None:
            state = self._state
            if state == "head":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_RESPONSE_HEAD:
                        raise UpstreamProtocolError("response head too large")
                    return
                head = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                self._head(head)
            elif state in ("body", "chunk-data"):
                if not self._buffer:
                    return
                take = min(self._remaining, len(self._buffer))
                chunk = bytes(self._buffer[:take])
                del self._buffer[:take]
                self._remaining -= take
                done = self._remaining == 0
                if state == "chunk-data":
                    if done:
                        self._state = "chunk-end"
                    self._request.response.decodeData(chunk, False)
                else:
                    if done:
                        self._state = "done"
                    self._request.response.decodeData(chunk, done)
                    if done:
                        self._response_done()
            elif state == "until-close":
                if self._buffer:
                    chunk = bytes(self._buffer)
                    self._buffer.clear()
                    self._request.response.decodeData(chunk, False)
                return
            elif state == "chunk-size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > 1024:
                        raise UpstreamProtocolError("chunk size line too long")
                    return
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not _CHUNK_SIZE.match(size_text):
                    raise UpstreamProtocolError(f"bad chunk size {line[:40]!r}")
                size = int(size_text, 16)
                if size:
                    self._remaining = size
                    self._state = "chunk-data"
                else:
                    self._state = "trailers"
            elif state == "chunk-end":
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise UpstreamProtocolError("chunk not followed by CRLF")
                del self._buffer[:2]
                self._state = "chunk-size"
            elif state == "trailers":
                if self._buffer[:2] == b"\r\n":
                    del self._buffer[:2]
                    self._state = "done"
                    self._request.response.decodeData(b"", True)
                    self._response_done()
                    continue
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_RESPONSE_HEAD:
                        raise UpstreamProtocolError("trailers too large")
                    return
                block = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                trailers = Headers()
                for line in block.split(b"\r\n"):
                    name, sep, value = line.partition(b":")
                    if not sep:
                        raise UpstreamProtocolError("malformed trailer")
                    trailers.add(name.strip(), value.strip(b" \t"))
                self._state = "done"
                self._request.response.decodeTrailers(trailers)
                self._response_done()
            else:
                return

    def _head(self, head: bytes) -> None:
        request = self._request
        assert request is not None
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() \
                or len(parts[1]) != 3:
            raise UpstreamProtocolError(f"bad status line {lines[0][:60]!r}")
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            return  # interim (100 Continue): the final response follows
        if status == 101 and request.upgrade:
            self._switch(request, lines)
            return
        headers = Headers([(b":status", parts[1])])
        regular = Headers()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or line[:1] in (b" ", b"\t"):
                raise UpstreamProtocolError("malformed header field")
            regular.add(name.strip(), value.strip(b" \t"))
        connection = {t.strip().lower() for t in
                      b",".join(regular.get_all(b"connection")).split(b",") if t.strip()}
        if parts[0] == b"HTTP/1.0":
            request.keep_alive = b"keep-alive" in connection
        else:
            request.keep_alive = b"close" not in connection
        if request.upgrade:
            request.keep_alive = False  # upgrade bytes may have gone: never reused
        te = regular.get_all(b"transfer-encoding")
        lengths = regular.get_all(b"content-length")
        no_body = request.method == b"HEAD" or status in (204, 304)
        for name, value in regular:
            if name in HOP_BY_HOP or name in connection:
                continue
            headers.add(name, value)
        if no_body:
            self._state = "done"
            request.response.decodeHeaders(headers, True)
            self._response_done()
            return
        if te:
            if [c.strip().lower() for c in b",".join(te).split(b",")][-1:] != [b"chunked"]:
                self._state = "until-close"
                request.keep_alive = False
            else:
                self._state = "chunk-size"
            headers.remove(b"content-length")
            request.response.decodeHeaders(headers, False)
            return
        if lengths:
            values = {v.strip() for joined in lengths for v in joined.split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise UpstreamProtocolError("bad Content-Length")
            length = int(next(iter(values)))
            if length == 0:
                self._state = "done"
                request.response.decodeHeaders(headers, True)
                self._response_done()
                return
            self._remaining = length
            self._state = "body"
            request.response.decodeHeaders(headers, False)
            return
        self._state = "until-close"
        request.keep_alive = False
        request.response.decodeHeaders(headers, False)

    def _switch(self, request: _Request, lines: list[bytes]) -> None:
        """
        101 to our upgrade: the rest of the connection is the upgraded protocol's, held here
        until the router hands it over (take_over).
        """
        headers = Headers([(b":status", b"101")])
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or line[:1] in (b" ", b"\t"):
                raise UpstreamProtocolError("malformed header field")
            name = name.strip().lower()
            if name not in HOP_BY_HOP or name == b"upgrade":
                headers.add(name, value.strip(b" \t"))
        headers.add(b"connection", b"upgrade")
        self._switching = True
        self._state = "switched"
        self.transport.pauseProducing()  # type: ignore[union-attr]
        request.response.decodeHeaders(headers, False)

    def take_over(self, protocol: Any) -> None:
        """
        The upgraded connection goes to ``protocol`` (the relay's upstream end): what arrived
        after the 101, then everything, EOF and loss included.  The pool never gets it back.
        """
        self._request = None
        self._switching = False
        self._owner = protocol
        protocol.makeConnection(self.transport)
        early, self._buffer = bytes(self._buffer), bytearray()
        if early:
            protocol.dataReceived(early)
        if self._eof:
            protocol.readConnectionLost()
        if self.lost:
            return
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def _response_done(self) -> None:
        request = self._request
        if request is None:
            return
        request.response_done = True
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        request = self._request
        if request is None or not (request.request_done and request.response_done):
            return
        self._request = None
        self._state = "idle"
        if not request.keep_alive or self._buffer:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self.on_idle is not None:
            self.on_idle(self)

    def _fail(self, why: str) -> None:
        request, self._request = self._request, None
        if request is not None and not request.response_done:
            request.response.onUpstreamReset(why)
        if not self.lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    # -- the connection -----------------------------------------------------------------------

    def readConnectionLost(self) -> None:
        if self._owner is not None:
            self._owner.readConnectionLost()
            return
        if self._switching:
            self._eof = True
            return
        if self._state == "until-close" and self._request is not None:
            request = self._request
            self._state = "done"
            request.response.decodeData(b"", True)
            request.request_done = True
            self._response_done()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        if self._owner is not None:
            self._owner.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self._owner is not None:
            self._owner.connectionLost(reason)
            if self.on_closed is not None:
                self.on_closed(self)
            return
        request, self._request = self._request, None
        if request is not None and not request.response_done:
            if self._state == "until-close" and reason.check(connectionDone.type):
                request.response.decodeData(b"", True)
            else:
                request.response.onUpstreamReset(
                    "connection closed before the response ended: " + reason.getErrorMessage()
                )
        if self.on_closed is not None:
            self.on_closed(self)


__all__ = ["Http1ClientCodec", "UpstreamProtocolError"]
