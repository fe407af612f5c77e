"""
The HTTP filter chain of one request (Envoy's FilterManager).

Decoding (the request) runs the ``http_filters`` in configuration order, encoding (the
response) in reverse.  Each callback returns a status: ``Continue`` passes on to the next
filter; a ``Stop...`` status holds what arrived at that filter until the filter resumes it
(``continueDecoding()`` / ``continueEncoding()``, e.g. when an asynchronous check fires) or
returns ``Continue`` for a later body chunk.  What a stopped filter holds is bounded by the
buffer limit (the listener's ``per_connection_buffer_limit_bytes``): past it a request gets
413, a response 500 (or a reset, once the response has started).

The last decoder filter is normally the router: it sends the request upstream and produces
the response through its callbacks' ``encodeHeaders``/``encodeData``/``encodeTrailers``.  Any
decoder filter may instead answer with ``sendLocalReply``.  What leaves the last encoder filter
goes to the downstream codec through an :class:`IResponseSink`.
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import Any, Callable, Sequence

from twisted.logger import Logger
from zope.interface import Interface, implementer

from hbonex.http.headers import Headers
from hbonex.http.stream_info import StreamInfo
from hbonex.interfaces import (
    IConnectionInfo,
    IStreamDecoderFilter,
    IStreamDecoderFilterCallbacks,
    IStreamEncoderFilter,
    IStreamEncoderFilterCallbacks,
)


class FilterHeadersStatus(enum.Enum):
    #: Pass the headers to the next filter.
    Continue = "Continue"
    #: Hold the headers here; body chunks still reach this filter (not the next ones).
    StopIteration = "StopIteration"
    #: Hold the headers, and buffer body and trailers here without calling this filter.
    StopAllIterationAndBuffer = "StopAllIterationAndBuffer"


class FilterDataStatus(enum.Enum):
    #: Pass the chunk on (after anything held here, headers included).
    Continue = "Continue"
    #: Keep the chunk here (with those before it) until the filter continues.
    StopIterationAndBuffer = "StopIterationAndBuffer"
    #: The filter took the chunk: it goes no further.
    StopIterationNoBuffer = "StopIterationNoBuffer"


class FilterTrailersStatus(enum.Enum):
    Continue = "Continue"
    StopIteration = "StopIteration"


class IResponseSink(Interface):
    """
    The downstream side of one request: where the response leaves the filter chain (the
    codec writes it to the client).
    """

    def sendHeaders(headers: Headers, endStream: bool) -> None:
        """Response headers."""

    def sendData(data: bytes, endStream: bool) -> None:
        """A response body chunk."""

    def sendTrailers(trailers: Headers) -> None:
        """Response trailers (the end of the response)."""

    def reset() -> None:
        """Abort the request (RST_STREAM; an HTTP/1.1 connection is closed)."""

    def registerProducer(producer: Any) -> None:
        """
        Backpressure for the response: ``producer`` (an IPushProducer, e.g. the upstream
        connection) is paused while the client cannot take more.
        """

    def unregisterProducer() -> None:
        """The response producer is done."""

    def requestProducer() -> Any:
        """
        An IPushProducer for the request body: pausing it stops reading from the client.
        """

    def switchProtocols(protocol: Any) -> bool:
        """
        After a 101 to an upgrade request: the downstream connection (or stream) is handed to
        ``protocol`` (makeConnection, then its bytes, EOF and loss); False if it is gone.
        """


#: Envoy's local reply texts for the statuses it generates.
REASONS = {
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
    413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


def reason_phrase(status: int) -> str:
    """An HTTP/1.1 status line's reason: Envoy's texts above, else the standard phrase."""
    phrase = REASONS.get(status)
    if phrase is not None:
        return phrase
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Side:
    """One filter's place on one path: what it holds while iteration is stopped there."""

    __slots__ = ("filter", "name", "callbacks", "headers_passed", "stopped", "stop_all",
                 "buffer", "trailers_held")

    def __init__(self, filter: Any, name: str = "") -> None:
        self.filter = filter
        #: The filter's name in http_filters (for typed_per_filter_config); "" for our own.
        self.name = name
        self.callbacks: Any = None
        #: The headers went beyond this filter.
        self.headers_passed = False
        #: Iteration is stopped at this filter.
        self.stopped = False
        #: StopAllIterationAndBuffer: body and trailers are buffered without calling it.
        self.stop_all = False
        self.buffer: bytearray | None = None
        self.trailers_held = False


class _Path:
    """
    One direction's iteration (decoding or encoding) over its filters; ``deliver`` is what
    happens past the last one.
    """

    def __init__(self, manager: FilterManager, decoding: bool, sides: list[_Side]) -> None:
        self.manager = manager
        self.decoding = decoding
        self.sides = sides
        self.headers: Headers | None = None
        self.trailers: Headers | None = None
        #: The direction ended (END_STREAM seen on headers, data or trailers).
        self.ended = False
        #: Nothing more is done on this path (local reply, reset, or complete).
        self.done = False
        self.delivered_headers = False
        self.delivered_end = False

    # -- the three events, from filter ``start`` on ----------------------------------------------

    def run_headers(self, start: int, end_stream: bool) -> None:
        assert self.headers is not None
        for index in range(start, len(self.sides)):
            if self.done:
                return
            side = self.sides[index]
            f = side.filter
            status = (f.decodeHeaders if self.decoding else f.encodeHeaders)(
                self.headers, end_stream
            )
            if self.done:
                return
            if status is FilterHeadersStatus.Continue or status is None:
                side.headers_passed = True
                continue
            side.stopped = True
            side.stop_all = status is FilterHeadersStatus.StopAllIterationAndBuffer
            return
        self.deliver_headers(end_stream)

    def run_data(self, start: int, data: bytes, end_stream: bool) -> None:
        for index in range(start, len(self.sides)):
            if self.done:
                return
            side = self.sides[index]
            if side.stop_all:
                self.hold(side, data)
                return
            f = side.filter
            status = (f.decodeData if self.decoding else f.encodeData)(data, end_stream)
            if self.done:
                return
            if status is FilterDataStatus.Continue or status is None:
                if side.stopped or not side.headers_passed:
                    # Continue after a stop: what is held here goes on first, then this chunk.
                    self.hold(side, data)
                    self.resume(index)
                    return
                continue
            side.stopped = True
            if status is FilterDataStatus.StopIterationAndBuffer:
                self.hold(side, data)
            return
        self.deliver_data(data, end_stream)

    def run_trailers(self, start: int) -> None:
        assert self.trailers is not None
        for index in range(start, len(self.sides)):
            if self.done:
                return
            side = self.sides[index]
            if side.stop_all:
                side.trailers_held = True
                return
            f = side.filter
            status = (f.decodeTrailers if self.decoding else f.encodeTrailers)(self.trailers)
            if self.done:
                return
            if status is FilterTrailersStatus.StopIteration:
                side.stopped = True
                side.trailers_held = True
                return
            if side.stopped or not side.headers_passed:
                # Continue at the end of the stream: everything held here goes on.
                side.trailers_held = True
                self.resume(index, trailers_seen=True)
                return
        self.deliver_trailers()

    # -- holding and resuming ------------------------------------------------------------------

    def hold(self, side: _Side, data: bytes) -> None:
        if side.buffer is None:
            side.buffer = bytearray()
        side.buffer += data
        self.manager._check_buffer(self, sum(len(s.buffer) for s in self.sides if s.buffer))

    def resume(self, index: int, trailers_seen: bool = False) -> None:
        """
        The filter at ``index`` lets what it holds go on: headers (if held), then the buffered
        body, then trailers, END_STREAM on the last of them.  After StopAllIterationAndBuffer
        the filter itself has seen neither body nor trailers: they start with it (as Envoy).
        """
        side = self.sides[index]
        if self.done:
            return
        from_here = side.stop_all
        side.stopped = False
        side.stop_all = False
        body = bytes(side.buffer) if side.buffer is not None else None
        side.buffer = None
        trailers = side.trailers_held
        side.trailers_held = False
        if not side.headers_passed:
            side.headers_passed = True
            self.run_headers(
                index + 1, self.ended and body is None and self.trailers is None
            )
        if body is not None and not self.done:
            self.run_data(index if from_here else index + 1, body,
                          self.ended and self.trailers is None)
        if trailers and not self.done:
            self.run_trailers(index if from_here and not trailers_seen else index + 1)

    # -- past the last filter ------------------------------------------------------------------

    def deliver_headers(self, end_stream: bool) -> None:
        self.delivered_headers = True
        self.delivered_end = end_stream
        if not self.decoding:
            assert self.headers is not None
            self.manager._send_headers(self.headers, end_stream)

    def deliver_data(self, data: bytes, end_stream: bool) -> None:
        self.delivered_end = self.delivered_end or end_stream
        if not self.decoding:
            self.manager._send_data(data, end_stream)

    def deliver_trailers(self) -> None:
        self.delivered_end = True
        if not self.decoding:
            assert self.trailers is not None
            self.manager._send_trailers(self.trailers)


class _StreamCallbacks:
    """
    What decoder and encoder filters share (Envoy's StreamFilterCallbacks), and their own
    side of the chain: ``_path()`` is the decoding or the encoding path.
    """

    def __init__(self, manager: FilterManager, index: int) -> None:
        self._manager = manager
        self._index = index

    def _path(self) -> _Path:
        raise NotImplementedError

    def connection(self) -> Any:
        return self._manager.connection_info

    def streamInfo(self) -> StreamInfo:
        return self._manager.stream_info

    def route(self) -> Any:
        return self._manager.route()

    def clearRouteCache(self) -> None:
        self._manager.clear_route_cache()

    def perFilterConfig(self) -> Any:
        name = self._path().sides[self._index].name
        route = self._manager.route()
        per_filter = getattr(route, "per_filter_config", None)
        if not name or not per_filter:
            return None
        entry = per_filter.get(name)
        return None if entry is None else entry.config

    def perFilterConfigs(self) -> tuple[Any, ...]:
        name = self._path().sides[self._index].name
        levels = getattr(self._manager.route(), "per_filter_levels", ()) if name else ()
        found = (level.get(name) for level in levels)
        return tuple(entry.config for entry in found
                     if entry is not None and entry.config is not None)

    def resetStream(self) -> None:
        self._manager.reset()

    def _continue(self) -> None:
        path = self._path()
        side = path.sides[self._index]
        if side.stopped or side.stop_all or not side.headers_passed:
            path.resume(self._index)

    def _buffer(self) -> bytes | None:
        buffer = self._path().sides[self._index].buffer
        return None if buffer is None else bytes(buffer)

    def _add(self, data: bytes) -> None:
        path = self._path()
        path.hold(path.sides[self._index], data)

    def _modify(self, data: bytes) -> None:
        self._path().sides[self._index].buffer = bytearray(data)


@implementer(IStreamDecoderFilterCallbacks)
class _DecoderCallbacks(_StreamCallbacks):
    def _path(self) -> _Path:
        return self._manager.decoding

    def continueDecoding(self) -> None:
        self._continue()

    def decodingBuffer(self) -> bytes | None:
        return self._buffer()

    def addDecodedData(self, data: bytes, streaming: bool) -> None:
        self._add(data)

    def modifyDecodingBuffer(self, data: bytes) -> None:
        self._modify(data)

    def sendLocalReply(
        self, status: int, body: bytes = b"", modifyHeaders: Any = None, details: str = "",
        responseFlag: str = "",
    ) -> None:
        self._manager.send_local_reply(status, body, modifyHeaders, details, responseFlag)

    def encodeHeaders(self, headers: Any, endStream: bool) -> None:
        self._manager.encode_headers(headers, endStream)

    def encodeData(self, data: bytes, endStream: bool) -> None:
        self._manager.encode_data(data, endStream)

    def encodeTrailers(self, trailers: Any) -> None:
        self._manager.encode_trailers(trailers)

    def registerResponseProducer(self, producer: Any) -> None:
        self._manager.sink.registerProducer(producer)

    def unregisterResponseProducer(self) -> None:
        self._manager.sink.unregisterProducer()

    def requestBodyProducer(self) -> Any:
        return self._manager.sink.requestProducer()

    def switchProtocols(self, protocol: Any, onSwitched: Callable[[bool], None]) -> None:
        self._manager.switch_protocols(protocol, onSwitched)

    def upgradeFinished(self, bytesReceived: int, bytesSent: int) -> None:
        self._manager.upgrade_finished(bytesReceived, bytesSent)


@implementer(IStreamEncoderFilterCallbacks)
class _EncoderCallbacks(_StreamCallbacks):
    def _path(self) -> _Path:
        return self._manager.encoding

    def continueEncoding(self) -> None:
        self._continue()

    def encodingBuffer(self) -> bytes | None:
        return self._buffer()

    def addEncodedData(self, data: bytes, streaming: bool) -> None:
        self._add(data)

    def modifyEncodingBuffer(self, data: bytes) -> None:
        self._modify(data)


class FilterManager:
    """
    One request's filter chain.  The codec calls ``decodeHeaders``/``decodeData``/
    ``decodeTrailers`` as the request arrives; the response leaves through ``sink``.
    """

    log = Logger()

    def __init__(
        self,
        filters: Sequence[Any],
        sink: Any,
        connection_info: IConnectionInfo | None = None,
        route_resolver: Callable[[Headers, Any], Any] | None = None,
        buffer_limit: int = 1024 * 1024,
        stream_info: StreamInfo | None = None,
        names: Sequence[str] = (),
        disabled: frozenset[str] | None = None,
    ) -> None:
        self.filters = list(filters)
        self.sink = sink
        self.connection_info = connection_info
        self.route_resolver = route_resolver
        self.buffer_limit = buffer_limit
        self.stream_info = stream_info if stream_info is not None else StreamInfo()
        #: Filters off unless a route enables them (http_filters' ``disabled``); None: no
        #: filter can be switched per route, so the route is not looked at for that.
        self.disabled = disabled
        named = list(zip(self.filters, [*names, *[""] * (len(self.filters) - len(names))],
                         strict=True))
        decoders = [_Side(f, n) for f, n in named if IStreamDecoderFilter.providedBy(f)]
        # Encoding runs the chain backwards: the filter nearest the upstream sees it first.
        encoders = [_Side(f, n) for f, n in reversed(named)
                    if IStreamEncoderFilter.providedBy(f)]
        self.decoding = _Path(self, True, decoders)
        self.encoding = _Path(self, False, encoders)
        for i, side in enumerate(decoders):
            side.callbacks = _DecoderCallbacks(self, i)
            side.filter.setDecoderFilterCallbacks(side.callbacks)
        for i, side in enumerate(encoders):
            side.callbacks = _EncoderCallbacks(self, i)
            side.filter.setEncoderFilterCallbacks(side.callbacks)
        self._route: Any = None
        self._route_cached = False
        self.response_started = False
        #: Called once when the request is over (completed or reset): the access log.
        self.on_destroy: Callable[[FilterManager], None] | None = None
        self._in_local_reply = False
        self.complete = False
        self._destroyed = False
        #: A switch waiting for its 101 to reach the codec: (protocol, onSwitched).
        self._switch: tuple[Any, Callable[[bool], None]] | None = None
        #: The downstream connection went to the upgraded protocol.
        self.switched = False

    # -- the request, from the codec ------------------------------------------------------------

    def decodeHeaders(self, headers: Headers, end_stream: bool) -> None:
        path = self.decoding
        path.headers = headers
        path.ended = end_stream
        if self.disabled is not None:
            self._drop_disabled()
        path.run_headers(0, end_stream)

    def _drop_disabled(self) -> None:
        """
        Filters the route switches off (``typed_per_filter_config`` FilterConfig ``disabled``,
        or ``disabled`` in http_filters unless the route enables them) leave the chain before
        any of them runs, as Envoy leaves them out when it builds the chain.
        """
        per_filter = getattr(self.route(), "per_filter_config", None) or {}
        off = set(self.disabled or ())
        for name, entry in per_filter.items():
            if entry.disabled:
                off.add(name)
            else:
                off.discard(name)
        if not off:
            return
        for path in (self.decoding, self.encoding):
            path.sides = [s for s in path.sides if s.name not in off]
            for index, side in enumerate(path.sides):
                side.callbacks._index = index

    def decodeData(self, data: bytes, end_stream: bool) -> None:
        path = self.decoding
        if path.done:
            return
        self.stream_info.bytes_received += len(data)
        path.ended = path.ended or end_stream
        path.run_data(0, data, end_stream)

    def decodeTrailers(self, trailers: Headers) -> None:
        path = self.decoding
        if path.done:
            return
        path.trailers = trailers
        path.ended = True
        path.run_trailers(0)

    def reset(self) -> None:
        """
        The stream is gone (the client reset it, or a filter asked): stop both paths.
        """
        if self._destroyed:
            return
        self.decoding.done = self.encoding.done = True
        self.stream_info.response_flags.add("DC" if not self.response_started else "UC")
        self.sink.reset()
        self._destroy()

    def finish(self) -> None:
        """
        The stream ended where the filters do not see it (a CONNECT's relay closed after its
        200): the request is complete, and the chain is destroyed.
        """
        if not self._destroyed:
            self._response_complete()

    # -- the response, from the router (or a filter acting as the upstream) ---------------------

    def encode_headers(self, headers: Headers, end_stream: bool) -> None:
        path = self.encoding
        if path.done or path.headers is not None:
            return
        path.headers = headers
        path.ended = end_stream
        status = headers.get(b":status")
        if status is not None and status.isdigit():
            self.stream_info.response_code = int(status)
        path.run_headers(0, end_stream)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        path = self.encoding
        if path.done:
            return
        path.ended = path.ended or end_stream
        path.run_data(0, data, end_stream)

    def encode_trailers(self, trailers: Headers) -> None:
        path = self.encoding
        if path.done:
            return
        path.trailers = trailers
        path.ended = True
        path.run_trailers(0)

    def send_local_reply(
        self, status: int, body: bytes = b"", modify_headers: Any = None, details: str = "",
        response_flag: str = "", through_filters: bool = True,
    ) -> None:
        """
        Answer the request here: decoding stops, and the reply runs through every encoder
        filter (as Envoy's local replies do) unless the encoder filters are what failed.
        Once a response has started downstream, all that can be done is a reset.
        """
        self.decoding.done = True
        if response_flag:
            self.stream_info.response_flags.add(response_flag)
        self.stream_info.response_code_details = details or REASONS.get(status, "local_reply")
        if self.response_started:
            self.reset()
            return
        if not body and status >= 400:
            body = f"{REASONS.get(status, 'Error')}".encode()
        headers = Headers([(b":status", str(status).encode())])
        if body:
            headers.add(b"content-length", str(len(body)).encode())
            headers.add(b"content-type", b"text/plain")
        if modify_headers is not None:
            modify_headers(headers)
        if not through_filters or self._in_local_reply:
            self.encoding.done = True
            self.stream_info.response_code = status
            self._send_headers(headers, not body)
            if body:
                self._send_data(body, True)
            return
        # A fresh encoding path: whatever an upstream response had started is dropped.
        self._in_local_reply = True
        self.encoding = _Path(self, False, [self._fresh(s) for s in self.encoding.sides])
        self.encode_headers(headers, not body)
        if body:
            self.encode_data(body, True)

    def _fresh(self, side: _Side) -> _Side:
        fresh = _Side(side.filter, side.name)
        fresh.callbacks = side.callbacks
        return fresh

    # -- limits ---------------------------------------------------------------------------------

    def _check_buffer(self, path: _Path, size: int) -> None:
        if size <= self.buffer_limit:
            return
        if path.decoding:
            self.log.info("request body over the buffer limit ({limit} bytes): 413",
                          limit=self.buffer_limit)
            self.send_local_reply(413, details="request_payload_too_large")
        else:
            self.log.info("response body over the buffer limit ({limit} bytes): 500",
                          limit=self.buffer_limit)
            path.done = True
            self.send_local_reply(500, details="response_payload_too_large",
                                  through_filters=False)

    # -- routing --------------------------------------------------------------------------------

    def route(self) -> Any:
        if not self._route_cached:
            headers = self.decoding.headers
            if self.route_resolver is None or headers is None:
                return None
            self._route = self.route_resolver(headers, self.connection_info)
            self._route_cached = True
            if self._route is not None:
                # As Envoy's stream info: %ROUTE_NAME% once a route is chosen, even when a
                # filter answers before the router.
                self.stream_info.route_name = getattr(self._route, "name", "") or ""
        return self._route

    def clear_route_cache(self) -> None:
        self._route = None
        self._route_cached = False

    # -- upgrades -------------------------------------------------------------------------------

    def switch_protocols(self, protocol: Any, on_switched: Callable[[bool], None]) -> None:
        """
        Hand the downstream to ``protocol`` once the 101 went out (an encoder filter may
        still hold it); a different response, or none, refuses the switch.
        """
        if self._destroyed:
            on_switched(False)
            return
        self._switch = (protocol, on_switched)
        if self.encoding.delivered_headers:
            self._do_switch(self.encoding.headers)

    def _do_switch(self, headers: Headers | None) -> None:
        pending, self._switch = self._switch, None
        if pending is None:
            return
        protocol, on_switched = pending
        ok = (headers is not None and headers.get(b":status") == b"101"
              and not self._destroyed and bool(self.sink.switchProtocols(protocol)))
        self.switched = ok
        on_switched(ok)

    def upgrade_finished(self, bytes_received: int, bytes_sent: int) -> None:
        """The upgraded connection ended: the request is over (one access-log record)."""
        self.stream_info.bytes_received += bytes_received
        self.stream_info.bytes_sent += bytes_sent
        self._response_complete()

    # -- to the codec ---------------------------------------------------------------------------

    def _send_headers(self, headers: Headers, end_stream: bool) -> None:
        self.response_started = True
        self.sink.sendHeaders(headers, end_stream)
        if end_stream:
            self._response_complete()
        if self._switch is not None:
            self._do_switch(headers)

    def _send_data(self, data: bytes, end_stream: bool) -> None:
        self.stream_info.bytes_sent += len(data)
        self.sink.sendData(data, end_stream)
        if end_stream:
            self._response_complete()

    def _send_trailers(self, trailers: Headers) -> None:
        self.sink.sendTrailers(trailers)
        self._response_complete()

    def _response_complete(self) -> None:
        self.complete = True
        self.encoding.done = True
        self.decoding.done = True
        self._destroy()

    def _destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        pending, self._switch = self._switch, None
        if pending is not None:
            pending[1](False)
        if self.on_destroy is not None:
            self.on_destroy(self)
        seen: set[int] = set()
        for f in self.filters:
            if id(f) not in seen:
                seen.add(id(f))
                try:
                    f.onDestroy()
                except Exception:
                    self.log.failure("HTTP filter {f!r} failed in onDestroy", f=f)


__all__ = [
    "FilterDataStatus",
    "FilterHeadersStatus",
    "FilterManager",
    "FilterTrailersStatus",
    "IResponseSink",
    "reason_phrase",
]
