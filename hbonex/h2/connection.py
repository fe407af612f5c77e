"""
The HTTP/2 connection shared by the tunnel client and server, and the stream transport.

An ``H2Stream`` is a Twisted transport (ITransport + IConsumer + IPushProducer, half-closeable),
so a relay or any Protocol runs over a CONNECT stream exactly as over a TCP socket.  Flow control
is tied to producer/consumer backpressure in both directions:

* receive: DATA is handed to the stream's protocol at once unless the stream is paused (its
  consumer is full); the HTTP/2 window is reopened only for data actually handed over, so what
  we buffer per stream is bounded by the window we advertised;
* send: the stream writes as much as the peer's window allows and queues the rest; past a small
  high-water mark it pauses the producer feeding it.  The connection is the single (fan-in)
  producer registered on the TLS transport; when the socket is full, every stream's producer
  is paused.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Iterable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from twisted.internet import error as ierror
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.h2 import fastpath
from hbonex.h2.flood import Flood, FloodGuard, LimitedFrameBuffer
from hbonex.h2.settings import H2Settings
from hbonex.interfaces import IHalfCloseableTransport
from hbonex.observability.stats import STATS

ErrorCodes = h2.errors.ErrorCodes

#: Pause the producer feeding a stream once this much is queued beyond the peer's window.
STREAM_HIGH_WATER = 256 * 1024
STREAM_LOW_WATER = 64 * 1024


#: After we close a connection, how long the peer gets to answer (TLS close_notify) before we
#: close the socket ourselves (Envoy's delayed_close_timeout, 1 s by default) ...
CLOSE_GRACE = 1.0
#: ... and how long the socket then gets to deliver what is still queued before it is cut.
CLOSE_LINGER = 30.0


def _tcp_under(transport: Any) -> Any:
    """The TCP transport under ``transport`` (TLS or not), or None."""
    from twisted.internet import tcp

    while transport is not None and not isinstance(transport, tcp.Connection):
        transport = getattr(transport, "transport", None)
    return transport


def error_code_name(code: int) -> str:
    """``NO_ERROR``, ``CONNECT_ERROR``...; unknown codes in hex (RFC 9113 §7)."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


class StreamReset(ierror.ConnectionLost):
    """
    The stream was reset (RST_STREAM) by the peer or by us.
    """

    def __init__(self, code: int, by_peer: bool) -> None:
        self.code = code
        self.by_peer = by_peer
        super().__init__(
            f"stream reset {'by peer' if by_peer else 'locally'}: {error_code_name(code)}"
        )


class ConnectionClosed(ierror.ConnectionLost):
    """
    The HTTP/2 connection went away under a stream that had not ended in both directions:
    whatever the stream still carried is lost, so this is never a clean end, however the
    connection itself ended (TLS close_notify included).
    """


class ConnectionState(enum.Enum):
    """
    One lifecycle per connection; every send path, the keepalive and the pool ask it.
    """

    #: Streams come and go.
    OPEN = "open"
    #: GOAWAY sent or received: the streams it covers finish, no new ones start.
    DRAINING = "draining"
    #: Nothing more is sent (a protocol error, an error GOAWAY, close(), or the transport is
    #: gone); every stream still open has been failed.
    CLOSED = "closed"


_TX_RESET = STATS.counter("http2.tx_reset")
_RX_RESET = STATS.counter("http2.rx_reset")
_GOAWAY_SENT = STATS.counter("http2.goaway_sent")


class CompressionError(h2.exceptions.ProtocolError):
    """A header block that HPACK cannot decode."""

    error_code = ErrorCodes.COMPRESSION_ERROR


class LeanEncoder(hpack.Encoder):
    """
    HPACK without Huffman coding: in pure Python the Huffman pass costs more CPU per request
    than the quarter of header bytes it saves is worth on the links tunnels run over (the
    decoder side gets cheaper too).

    ``encode`` is hpack's own, inlined for bytes names and values (a tenth of the calls per
    header; it ran for every tunnel's CONNECT and 200): the same table searches and additions
    in the same order, so the same bytes and the same dynamic table.  Anything else (a dict,
    str names or values) goes through hpack's code.  The hpack internals used are pinned by
    tests/test_h2_fastheaders.py, which also compares the output with hpack's.
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if isinstance(headers, dict):
            return super().encode(headers, huffman=False)  # type: ignore[no-any-return]
        table = self.header_table
        block = []
        if table.resized:
            block.append(self._encode_table_size_change())
            table.resized = False
        for header in headers:
            name, value = header[0], header[1]
            if isinstance(header, hpack.HeaderTuple):
                sensitive = not header.indexable
            else:
                sensitive = len(header) > 2 and header[2]
            if name.__class__ is not bytes or value.__class__ is not bytes:
                to_bytes = hpack.hpack._to_bytes
                block.append(self.add((to_bytes(name), to_bytes(value)), sensitive, False))
                continue
            match = table.search(name, value)
            if match is None:
                # Literal name and value; indexed unless sensitive.
                block.append(b"\x10" if sensitive else b"\x40")
                block.append(_length(name))
                block.append(name)
                block.append(_length(value))
                block.append(value)
                if not sensitive:
                    table.add(name, value)
            elif match[2] is not None and (match[2] or _EMPTY_INDEXED):
                block.append(_prefixed(match[0], 7, 0x80))  # indexed
            else:
                # Indexed name, literal value.
                if sensitive:
                    block.append(_prefixed(match[0], 4, 0x10))
                else:
                    block.append(_prefixed(match[0], 6, 0x40))
                block.append(_length(value))
                block.append(value)
                if not sensitive:
                    table.add(name, value)
        return b"".join(block)


#: hpack 4.0 sends a full match with an empty value (``:authority: ""``) as a literal and indexes
#: it again ("if perfect:"), later releases as an index: do as the installed hpack does.
_EMPTY_INDEXED = hpack.Encoder().encode([(b":authority", b"")], huffman=False) == b"\x81"


def _prefixed(number: int, bits: int, flags: int) -> bytes:
    """An HPACK integer with a ``bits``-bit prefix (RFC 7541 §5.1), ``flags`` in its first byte."""
    limit = (1 << bits) - 1
    if number < limit:
        return bytes((flags | number,))
    out = bytearray(hpack.hpack.encode_integer(number, bits))
    out[0] |= flags
    return bytes(out)


def _length(data: bytes) -> bytes:
    """A string literal's length, without Huffman (RFC 7541 §5.2)."""
    n = len(data)
    return bytes((n,)) if n < 127 else bytes(hpack.hpack.encode_integer(n, 7))


class QuietH2Connection(h2.connection.H2Connection):
    """
    h2's connection, minus the eager ``repr(frame)`` on every received frame.

    h2 formats ``repr(frame)`` for a trace log call even when nothing logs; for a DATA frame
    that serializes and hexlifies the whole payload (a 1 MiB frame costs a 2 MiB string), which
    dominated CPU in profiles.  This is h2 4.x's ``_receive_frame`` without that argument.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.encoder = LeanEncoder()
        #: Flood counters (set by the owning connection), and why they tripped on a reset
        #: of ours (raised only from inside receive_data, where h2 turns it into GOAWAY).
        self.guard: FloodGuard | None = None
        self.flood: str | None = None

    def limit_header_block(self, size: int) -> None:
        """Cap received header blocks (HEADERS + CONTINUATION) and decoded header lists."""
        self.incoming_buffer = LimitedFrameBuffer(not self.config.client_side, size)
        self.decoder.max_header_list_size = size

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        try:
            super().reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            # Closed meanwhile (h2 itself reset it for a later frame of the batch whose
            # events are being handled, say): nothing is left to reset.
            return
        _TX_RESET.inc()
        if self.guard is not None and self.flood is None:
            self.flood = self.guard.stream_reset(stream_id, error_code)

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        if frame.__class__ is RstStreamFrame:
            _RX_RESET.inc()
        guard = self.guard
        if guard is not None:
            guard.received(
                frame,
                new_stream=frame.stream_id > self.highest_inbound_stream_id
                and frame.stream_id not in self.streams,
            )
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Any]]:
        try:
            return super()._receive_headers_frame(frame)  # type: ignore[no-any-return]
        except h2.exceptions.TooManyStreamsError:
            return self._refuse_stream(frame)
        except h2.exceptions.ProtocolError as e:
            cause = e.__cause__ or e.__context__  # h2 4.1 raises without "from"
            if type(e) is h2.exceptions.ProtocolError and isinstance(cause, hpack.HPACKError):
                # RFC 9113 §4.3: a field block that does not decode is COMPRESSION_ERROR.
                raise CompressionError(str(e)) from e
            raise

    def _refuse_stream(self, frame: HeadersFrame) -> tuple[list[Frame], list[Any]]:
        """
        A stream beyond our MAX_CONCURRENT_STREAMS is refused alone with REFUSED_STREAM, which
        the peer may retry (RFC 9113 §5.1.2); h2 would fail the whole connection.  The header
        block is still decoded (HPACK state is connection-wide) and the stream id is used up,
        as for any stream that opened and was reset at once.
        """
        h2.connection._decode_headers(self.decoder, frame.data)
        self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
        stream = self._get_or_create_stream(
            frame.stream_id, h2.connection.AllowedStreamIDs(not self.config.client_side)
        )
        stream.state_machine.process_input(h2.stream.StreamInputs.RECV_HEADERS)
        if "END_STREAM" in frame.flags:
            stream.state_machine.process_input(h2.stream.StreamInputs.RECV_END_STREAM)
        frames = stream.reset_stream(ErrorCodes.REFUSED_STREAM)
        if self.guard is not None:
            why = self.guard.stream_reset(frame.stream_id, ErrorCodes.REFUSED_STREAM)
            if why is not None:
                raise Flood(why, "premature_reset")
        return frames, []

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Any]]:
        """
        A graceful GOAWAY (NO_ERROR) leaves the connection open for the streams it covers
        (RFC 9113 §6.8); h2 would close it and drop their queued data.
        """
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)  # type: ignore[no-any-return]
        event = h2.events.ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def graceful_goaway(self) -> None:
        """
        Send GOAWAY(NO_ERROR) without closing: streams already opened by the peer go on.
        """
        f = GoAwayFrame(0)
        f.last_stream_id = self.highest_inbound_stream_id
        f.error_code = ErrorCodes.NO_ERROR
        self._prepare_for_sending([f])


class _Trailers:
    """Trailers waiting in a paused stream's inbound queue, behind the data before them."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers


@implementer(IHalfCloseableTransport, ITransport, IConsumer, IPushProducer)
class H2Stream:
    """
    One HTTP/2 stream used as a byte-stream transport (a CONNECT tunnel).
    """

    disconnecting = False
    disconnected = False
    #: Once our END_STREAM is out, a peer that has not ended its side is told to stop with
    #: RST_STREAM(NO_ERROR) (RFC 9113 §8.1), as Envoy does when it answered a request before
    #: its end: set on an extended CONNECT's stream until it is switched (a class default,
    #: so that tunnels do not pay for it).
    stop_peer_after_end = False

    def __init__(self, connection: H2TunnelConnection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.protocol: IProtocol | None = None
        #: Set by the owner: called once when the stream is gone, with the reason.
        self.on_closed: Callable[[Failure], None] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        # send side
        # Lists, not deques: an idle tunnel's empty deque costs ~600 bytes, a list 56.
        self._outbound: list[fastpath.Chunk] = []
        self._outbound_size = 0
        self._end_requested = False  # loseWriteConnection() called
        #: Trailers to end our side with, after the queued data (instead of END_STREAM DATA).
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._ended_local = False  # END_STREAM sent
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        # receive side
        self._inbound: list[tuple[bytes, int]] = []
        self._paused = False
        self._ended_remote = False  # END_STREAM received
        self._read_closed = False  # protocol told (readConnectionLost)
        self._reset: StreamReset | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<H2Stream {self.stream_id} on {self.connection.describe()}>"

    # -- wiring -----------------------------------------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """
        Connect ``protocol`` to this stream (calls its makeConnection).
        """
        self.protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        self._deliver()

    # -- ITransport ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._end_requested or self._reset is not None or self._closed or not data:
            return
        self._outbound.append(data)
        self._outbound_size += len(data)
        self.connection._send_stream_data(self)
        if self._outbound_size > STREAM_HIGH_WATER:
            self._update_producer()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        """
        A HEADERS frame on this stream (a response, for a stream carrying a request); with
        ``end_stream`` our side ends with it.
        """
        if self._end_requested or self._reset is not None or self._closed:
            return
        self.connection._send_headers(self, headers, end_stream)

    def writeTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        End our side with trailers once the queued data has gone (flow control permitting).
        """
        if self._end_requested or self._closed:
            return
        self._trailers = trailers
        self.loseWriteConnection()

    def loseWriteConnection(self) -> None:
        if self._end_requested or self._closed:
            return
        self._end_requested = True
        self.connection._send_stream_data(self)

    def loseConnection(self) -> None:
        """
        End our side after the queued data (END_STREAM); the stream closes once the peer has
        ended its side too.
        """
        self.disconnecting = True
        self.loseWriteConnection()

    def abortConnection(self) -> None:
        """
        What a relay calls when the TCP connection on its other side failed: RFC 9113 §8.5
        signals a TCP error (a reset above all) as CONNECT_ERROR.
        """
        self.reset(ErrorCodes.CONNECT_ERROR)

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        if self._closed:
            return
        self.connection._reset_stream(self, code)

    def getPeer(self) -> Any:
        return self.connection.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> Any:
        return self.connection.transport.getHost()  # type: ignore[union-attr]

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    # -- IConsumer ----------------------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"{self!r} already has a producer")
        if not streaming:
            raise ValueError("H2Stream only takes push producers")
        self._producer = producer  # type: ignore[assignment]  # push producers only
        self._producer_paused = False
        if self._closed:
            producer.stopProducing()
            return
        self._update_producer()

    def unregisterProducer(self) -> None:
        self._producer = None

    def _update_producer(self) -> None:
        """
        Pause the producer feeding us while our queue is above the high-water mark or the
        connection's socket is full; resume it below the low-water mark.
        """
        producer = self._producer
        if producer is None:
            return
        if self._producer_paused:
            if self._outbound_size <= STREAM_LOW_WATER and not self.connection._paused:
                self._producer_paused = False
                producer.resumeProducing()
        elif self._outbound_size > STREAM_HIGH_WATER or self.connection._paused:
            self._producer_paused = True
            producer.pauseProducing()

    # -- IPushProducer (the inbound bytes) ----------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._deliver()

    def stopProducing(self) -> None:
        self.reset(ErrorCodes.CANCEL)

    # -- called by the connection -------------------------------------------------------------

    def _data_received(self, data: bytes, flow_length: int) -> None:
        self.bytes_received += len(data)
        if self._paused or self._inbound or self.protocol is None:
            self._inbound.append((data, flow_length))
            return
        self.protocol.dataReceived(data)
        # The protocol may have ended the stream from inside dataReceived.
        if not self._closed:
            self.connection._ack(self.stream_id, flow_length)

    def _trailers_received(self, headers: list[tuple[bytes, bytes]]) -> None:
        """
        Trailers end the peer's side: a protocol that takes them (``trailersReceived``) gets
        them in order, after the data before them; END_STREAM follows as EOF.
        """
        taker = getattr(self.protocol, "trailersReceived", None)
        if taker is None:
            return
        if self._paused or self._inbound:
            self._inbound.append((_Trailers(headers), 0))  # type: ignore[arg-type]
            return
        taker(headers)

    def _remote_ended(self) -> None:
        self._ended_remote = True
        self._deliver()

    def _deliver(self) -> None:
        """
        Hand buffered inbound data (and then EOF) to the protocol while it is not paused.
        """
        protocol = self.protocol
        if protocol is None:
            return
        inbound = self._inbound
        while inbound and not self._paused:
            data, flow_length = inbound.pop(0)
            if isinstance(data, _Trailers):
                protocol.trailersReceived(data.headers)  # type: ignore[attr-defined]
                continue
            protocol.dataReceived(data)
            if self._closed:
                # Finished from inside dataReceived (the protocol aborted, say): it has had
                # its connectionLost and gets nothing more.
                return
            self.connection._ack(self.stream_id, flow_length)
        if inbound or self._paused:
            return
        if self._ended_remote and not self._read_closed:
            self._read_closed = True
            if IHalfCloseableProtocol.providedBy(protocol):
                protocol.readConnectionLost()  # type: ignore[attr-defined]
            else:
                # A protocol that cannot half-close loses the whole connection at EOF, as
                # Twisted's TCP transport does.
                self.loseConnection()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._closed:
            return
        if (self.stop_peer_after_end and self._ended_local and not self._ended_remote
                and self._reset is None):
            self.stop_peer_after_end = False
            self.reset(ErrorCodes.NO_ERROR)
            return
        if self._reset is not None:
            # Clean resets (NO_ERROR/CANCEL after END_STREAM) still deliver what arrived, to a
            # protocol that is there to take it; a stream nobody is attached to yet (the
            # server still connecting upstream) ends now, so that connect is cancelled.
            clean = self._reset.code in (ErrorCodes.NO_ERROR, ErrorCodes.CANCEL)
            if clean and self._ended_remote and self.protocol is not None:
                if self._inbound or not self._read_closed:
                    return
                self._finish(Failure(ierror.ConnectionDone("stream closed by peer")))
                return
            self._finish(Failure(self._reset))
            return
        if self._ended_local and self._read_closed:
            self._finish(Failure(ierror.ConnectionDone("stream closed cleanly")))

    def _was_reset(self, code: int, by_peer: bool) -> None:
        if self._reset is not None or self._closed:
            return
        self._reset = StreamReset(code, by_peer)
        self._outbound.clear()
        self._outbound_size = 0
        clean = by_peer and self._ended_remote and code in (ErrorCodes.NO_ERROR, ErrorCodes.CANCEL)
        if clean and self.protocol is not None:
            # RST_STREAM(NO_ERROR/CANCEL) after END_STREAM: what arrived is still delivered.
            self._deliver()
            return
        self._drop_inbound()
        self._maybe_finish()

    def _drop_inbound(self) -> None:
        # Dropped bytes still count against the connection window: give that back.
        for _data, flow_length in self._inbound:
            self.connection._ack(self.stream_id, flow_length)
        self._inbound.clear()

    def _connection_closed(self, reason: Failure) -> None:
        """
        The connection can carry nothing more for this stream.
        """
        self._outbound.clear()
        self._outbound_size = 0
        self._reset = self._reset or StreamReset(ErrorCodes.CANCEL, by_peer=False)
        self._finish(reason)

    def _finish(self, reason: Failure) -> None:
        if self._closed:
            return
        self._closed = True
        self.disconnected = True
        # Bytes never handed over (e.g. early data on a refused tunnel) must still give their
        # connection window back, or a few such streams starve the whole connection.
        self._drop_inbound()
        self.connection._forget_stream(self)
        producer = self._producer
        if producer is not None:
            self._producer = None
            producer.stopProducing()
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)
        if self.on_closed is not None:
            callback, self.on_closed = self.on_closed, None
            callback(reason)


class H2TunnelConnection(Protocol):
    """
    The HTTP/2 machinery common to both ends: frame I/O, flow control, keepalive, the
    connection's lifecycle (:class:`ConnectionState`), and the fan-in producer that pauses
    every stream when the socket is full.
    """

    log = Logger()
    client_side = False
    #: Established streams' DATA and WINDOW_UPDATE frames bypass h2's per-frame machinery
    #: (hbonex.h2.fastpath); off, h2 handles every frame (the tests compare both).
    fast_path = True

    def __init__(self, settings: H2Settings, reactor: IReactorTime) -> None:
        self.settings = settings
        self.reactor = reactor
        self.conn = QuietH2Connection(
            h2.config.H2Configuration(
                client_side=self.client_side,
                header_encoding=None,
                # We validate requests ourselves so a malformed CONNECT is a stream error
                # (RST_STREAM PROTOCOL_ERROR), not h2's GOAWAY for the whole connection.
                validate_inbound_headers=self.client_side,
                normalize_inbound_headers=False,
                # What we send is built here from parsed values (lowercase names, no
                # connection headers); re-checking it cost a tenth of a tunnel's setup CPU.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.guard = FloodGuard(settings, reactor, server=not self.client_side)
        self.conn.guard = self.guard
        self.conn.limit_header_block(settings.max_header_list_size)
        self.streams: dict[int, H2Stream] = {}
        self.state = ConnectionState.OPEN
        #: Why the connection is CLOSED (what the streams it failed were told).
        self.close_reason: str | None = None
        self._paused = False
        self._lost = False
        self._receiving = False
        #: Frames built by the fast path (with what h2 had queued before them), written by
        #: _flush ahead of h2's own output.
        self._out: list[fastpath.Chunk] = []
        #: The start of a frame the fast path may take, until ``_rx_need`` bytes are here.
        self._rx_parts: list[bytes] = []
        self._rx_size = 0
        self._rx_need = 0
        self.goaway_received = False
        self.goaway_sent = False
        self._ping_call: IDelayedCall | None = None
        self._ping_timeout_call: IDelayedCall | None = None
        self._close_call: IDelayedCall | None = None
        self._closing = False  # close() or abort() has been called on the transport
        self._registered = False
        self._last_activity = 0.0
        self.peer_max_concurrent_streams = 100

    def describe(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        host = getattr(peer, "host", "?")
        port = getattr(peer, "port", "?")
        return f"h2 {host}:{port}"

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def may_send(self) -> bool:
        """
        Whether anything (frames, WINDOW_UPDATEs, PINGs) may still be sent.
        """
        return self.state is not ConnectionState.CLOSED

    @property
    def accepting_streams(self) -> bool:
        """
        Whether new streams may start on this connection.
        """
        return self.state is ConnectionState.OPEN

    def _drain(self) -> None:
        if self.state is ConnectionState.OPEN:
            self.state = ConnectionState.DRAINING
            self.state_changed()

    def _shut(self, why: str) -> bool:
        """
        Enter CLOSED: stop keepalive and fail every stream still open with ``why``.  False if
        the connection was closed already.
        """
        if self.state is ConnectionState.CLOSED:
            return False
        self.state = ConnectionState.CLOSED
        self.close_reason = why
        self._cancel_ping()
        failure = Failure(ConnectionClosed(why))
        for stream in list(self.streams.values()):
            if stream._ended_remote and stream._ended_local and stream._reset is None:
                # Both directions ended at the HTTP/2 level: every byte is here, only the
                # delivery to a paused protocol is pending.  It goes on without the connection
                # and the stream ends cleanly (a drained server closes right after its last
                # END_STREAM; that is no truncation).
                continue
            stream._connection_closed(failure)
        self.streams.clear()
        self.state_changed()
        return True

    def close(self, why: str = "HTTP/2 connection closed") -> None:
        """
        Close the connection after what h2 has queued (a GOAWAY, say); streams still open
        are failed with ``why``.  A peer that does not close its side within CLOSE_GRACE is cut.
        """
        self._flush(force=True)
        self._shut(why)
        transport = self.transport
        if transport is None or self._lost or self._closing:
            return
        self._closing = True
        # Twisted's TLS transport only sends close_notify (and closes) once no producer is
        # registered: a connection that stays registered never closes.
        if self._registered:
            self._registered = False
            transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.loseConnection()
        self._close_call = self.reactor.callLater(CLOSE_GRACE, self._close_timed_out, None)

    def _close_timed_out(self, stage: int | None) -> None:
        """
        The peer has not answered our close within CLOSE_GRACE (a TLS close_notify goes
        unanswered while it still reads the data before it): close the socket ourselves, the
        ordinary way, so the kernel still delivers what it holds, then a FIN.  A peer that
        does not read at all is cut after CLOSE_LINGER.
        """
        self._close_call = None
        if self._lost or self.transport is None:
            return
        if stage is None:
            tcp = _tcp_under(self.transport)
            if tcp is not None and not tcp.disconnected:
                tcp.loseConnection()
                self._close_call = self.reactor.callLater(CLOSE_LINGER,
                                                          self._close_timed_out, 1)
                return
        self.log.info(
            "{conn}: peer did not close within {linger}s of our close; aborting",
            conn=self.describe(), linger=CLOSE_GRACE + CLOSE_LINGER,
        )
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def abort(self, why: str) -> None:
        """
        Cut the connection now (RST); streams still open are failed with ``why``.
        """
        self._flush(force=True)
        self._shut(why)
        if self.transport is not None and not self._lost:
            self._closing = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def state_changed(self) -> None:
        """
        Hook: the connection went DRAINING or CLOSED.
        """

    def connectionMade(self) -> None:
        s = self.settings
        values = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.initial_stream_window_size,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        }
        if not self.client_side:
            # Envoy sends :protocol=bytestream CONNECTs (RFC 8441 extended CONNECT).
            values[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        # Initial values (not update()): they go out in the preface and take effect for our
        # receive side at once, as RFC 9113 lets the sender assume.
        self.conn.local_settings = h2.settings.Settings(
            client=self.client_side, initial_values=values
        )
        self.conn.max_inbound_frame_size = s.max_frame_size
        self.conn.initiate_connection()
        extra = s.initial_connection_window_size - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._registered = True
        self._flush()
        self._last_activity = self.reactor.seconds()
        self._schedule_ping()

    def dataReceived(self, data: bytes) -> None:
        if not self.may_send:
            return
        self._last_activity = self.reactor.seconds()
        if self._rx_parts:
            self._rx_parts.append(data)
            self._rx_size += len(data)
            if self._rx_size < self._rx_need:
                return
            data = b"".join(self._rx_parts)
            self._rx_parts = []
        conn = self.conn
        fast: list[fastpath.Item] = []
        if self.fast_path and fastpath.ready(conn):
            taken, fast, h2_end, need = fastpath.receive(conn, self.guard, data)
            if need:
                # A frame cut by the read: held here (not in h2's buffer, which would keep
                # every later read on h2's path until a read ends on a frame boundary).
                rest = data[h2_end:]
                self._rx_parts = [rest]
                self._rx_size = len(rest)
                self._rx_need = need
            if taken or need:
                data = data[taken:h2_end]
        events: list[h2.events.Event] = []
        try:
            if data:
                events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            kind = "flood" if isinstance(e, Flood) else "protocol error"
            if isinstance(e, Flood):
                STATS.counter(f"http2.{e.stat}").inc()
            why = f"HTTP/2 {kind} from peer: {e}"
            if self.conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                # h2 checks the preface before its own GOAWAY handling: a bad one would end
                # the connection without saying why (RFC 9113 §3.4 allows that; we say it).
                self.conn.close_connection(error_code=e.error_code)
            self.log.warn("{conn}: {why}; GOAWAY {code}", conn=self.describe(), why=why,
                          code=error_code_name(e.error_code))
            self.close(why)  # after the GOAWAY h2 prepared
            return
        self._receiving = True
        try:
            # h2 has taken the whole batch before any of it is dispatched, as without the
            # fast path: the fast frames' effects come first, in order.
            for sid, payload, size in fast:
                if payload is None:
                    if size:
                        self._window_opened(sid)
                    else:
                        self._zero_window_increment(sid)
                else:
                    stream = self.streams.get(sid)
                    if stream is None:
                        self._ack(sid, size)
                    else:
                        stream._data_received(payload, size)
                if not self.may_send:
                    break
            else:
                for event in events:
                    self._dispatch(event)
                    if not self.may_send:
                        break
        finally:
            self._receiving = False
        self._flush()
        self._check_flood()

    def _zero_window_increment(self, stream_id: int) -> None:
        self.log.warn(
            "{conn}: WINDOW_UPDATE with a zero increment on stream {sid}; "
            "RST_STREAM PROTOCOL_ERROR", conn=self.describe(), sid=stream_id,
        )
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)
        else:
            self.conn.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _check_flood(self) -> None:
        """
        Our own resets tripped a flood limit (a peer making us reset its streams).
        """
        why = self.conn.flood
        if why is None or not self.may_send:
            return
        self.log.warn("{conn}: HTTP/2 flood from peer: {why}; GOAWAY ENHANCE_YOUR_CALM",
                      conn=self.describe(), why=why)
        STATS.counter("http2.premature_reset").inc()
        self.goaway_sent = True
        self.conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
        self.close(f"HTTP/2 flood from peer: {why}")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        why = reason.getErrorMessage()
        if reason.check(ierror.ConnectionDone):
            why = "peer closed the connection"
        self._shut(f"HTTP/2 connection lost before the stream ended ({why})")

    # -- events -------------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                # Data on a stream we have already forgotten: keep the connection window open.
                self._ack(event.stream_id, event.flow_controlled_length)
                return
            stream._data_received(event.data, event.flow_controlled_length)
            if event.stream_ended is not None:
                stream._remote_ended()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream._ended_remote:
                stream._remote_ended()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._was_reset(event.error_code, by_peer=event.remote_reset)
            else:
                self.stream_reset_before_attach(event)
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_opened(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings
            mcs = changed.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
            if mcs is not None:
                self.peer_max_concurrent_streams = mcs.new_value
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                self._window_opened(0)
            self.settings_changed()
        elif isinstance(event, h2.events.PingAckReceived):
            if self._ping_timeout_call is not None and self._ping_timeout_call.active():
                self._ping_timeout_call.cancel()
            self._ping_timeout_call = None
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway_received(event)
        elif isinstance(event, h2.events.RequestReceived):
            self.request_received(event)
        elif isinstance(event, h2.events.ResponseReceived):
            self.response_received(event)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._trailers_received(event.headers)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            pass

    def _goaway_received(self, event: h2.events.ConnectionTerminated) -> None:
        self.goaway_received = True
        code = error_code_name(event.error_code or 0)
        self.log.info(
            "{conn}: GOAWAY from peer ({code}), last stream {last}",
            conn=self.describe(), code=code, last=event.last_stream_id,
        )
        self._drain()
        self.goaway(event)
        if event.error_code != ErrorCodes.NO_ERROR:
            # An error GOAWAY ends the connection (h2 is closed already): nothing more can be
            # sent on any stream.
            self.close(f"GOAWAY from peer: {code}")
        else:
            self._close_if_drained()

    # Hooks for the client and server subclasses.
    def request_received(self, event: h2.events.RequestReceived) -> None:
        self.conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)

    def response_received(self, event: h2.events.ResponseReceived) -> None:
        pass

    def stream_reset_before_attach(self, event: h2.events.StreamReset) -> None:
        pass

    def goaway(self, event: h2.events.ConnectionTerminated) -> None:
        pass

    def settings_changed(self) -> None:
        pass

    # -- sending ------------------------------------------------------------------------------

    def _flush(self, force: bool = False) -> None:
        # While a received batch is processed, output is gathered and written once at its end
        # (one TLS record and one send instead of one per frame acknowledged or answered).
        if self._receiving and not force:
            return
        out = self._out
        if out:
            if self.conn._data_to_send:
                out.append(self.conn.data_to_send())
            data = b"".join(out)
            self._out = []
        elif self.conn._data_to_send:
            data = self.conn.data_to_send()
        else:
            return
        if self.transport is not None and not self._lost:
            if self._paused:
                # The socket is full: what we write now queues.  A peer that keeps sending
                # PINGs or SETTINGS (or opens streams) without reading must not grow that queue
                # without bound.
                why = self.guard.queued(data)
                if why is not None:
                    STATS.counter(
                        "http2.outbound_control_flood" if "control" in why
                        else "http2.outbound_flood"
                    ).inc()
                    self.log.warn("{conn}: {why}; aborting", conn=self.describe(), why=why)
                    self.abort(f"outbound flood: {why}")
                    return
            self.transport.write(data)

    def add_stream(self, stream: H2Stream) -> None:
        self.streams[stream.stream_id] = stream

    def _send_headers(
        self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        if not self.may_send:
            return
        try:
            self.conn.send_headers(stream.stream_id, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            stream._was_reset(ErrorCodes.STREAM_CLOSED, by_peer=False)
            return
        if end_stream:
            stream._end_requested = True
            stream._ended_local = True
        self._flush()
        if end_stream:
            stream._maybe_finish()

    def _send_stream_data(self, stream: H2Stream) -> None:
        """
        Send what the peer's windows allow from the stream's queue (and END_STREAM after it).
        """
        if stream._ended_local or stream._reset is not None or stream._closed:
            return
        if not self.may_send:
            return
        conn = self.conn
        sid = stream.stream_id
        outbound = stream._outbound
        sent_any = False
        frames = 0
        try:
            h2stream = fastpath.sendable(conn, sid) if outbound and self.fast_path else None
            if h2stream is not None:
                size, frames = fastpath.send(conn, h2stream, outbound, self._out)
                if size:
                    stream._outbound_size -= size
                    stream.bytes_sent += size
                    sent_any = True
            elif outbound:
                window = conn.local_flow_control_window(sid)
                max_frame = conn.max_outbound_frame_size
                while outbound and window > 0:
                    chunk = outbound[0]
                    size = min(len(chunk), window, max_frame)
                    if size < len(chunk):
                        outbound[0] = chunk[size:]
                        chunk = chunk[:size]
                    else:
                        del outbound[0]
                    conn.send_data(sid, chunk)
                    frames += 1
                    window -= size
                    stream._outbound_size -= size
                    stream.bytes_sent += size
                    sent_any = True
            if not outbound and stream._end_requested:
                if stream._trailers is not None:
                    conn.send_headers(sid, stream._trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
                stream._ended_local = True
                sent_any = True
        except h2.exceptions.StreamClosedError as e:
            if conn._stream_closed_by(sid) is h2.stream.StreamClosedBy.RECV_RST_STREAM:
                # The peer's RST_STREAM is in the batch being processed: its event tells the
                # stream how it ended (a clean NO_ERROR must not turn into our own error).
                return
            self.log.debug("{stream}: cannot send: {e}", stream=stream, e=e)
            stream._was_reset(ErrorCodes.STREAM_CLOSED, by_peer=False)
            return
        if sent_any:
            self.guard.data_frames_sent += frames
            self._flush()
            if stream._producer_paused:
                stream._update_producer()
            if stream._ended_local:
                stream._maybe_finish()

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream._outbound:
                self._send_stream_data(stream)
            return
        for stream in list(self.streams.values()):
            if stream._outbound:
                self._send_stream_data(stream)

    def _reset_stream(self, stream: H2Stream, code: int) -> None:
        if self.may_send:
            try:
                self.conn.reset_stream(stream.stream_id, code)
            except h2.exceptions.StreamClosedError:
                pass
            self._flush()
        stream._was_reset(code, by_peer=False)
        if not self._receiving:
            self._check_flood()

    def _ack(self, stream_id: int, flow_length: int) -> None:
        """
        Data was consumed: give its window back (h2 batches the WINDOW_UPDATEs).
        """
        if flow_length and self.may_send:
            if self.fast_path and fastpath.acknowledge(self.conn, stream_id, flow_length):
                return  # no WINDOW_UPDATE due yet
            try:
                self.conn.acknowledge_received_data(flow_length, stream_id)
            except h2.exceptions.StreamClosedError:
                # Closed meanwhile: h2 still returns the connection-level window itself.
                return
            self._flush()

    def _forget_stream(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.stream_forgotten(stream)
        self._close_if_drained()

    def stream_forgotten(self, stream: H2Stream) -> None:
        pass

    # -- fan-in producer ----------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        for stream in list(self.streams.values()):
            stream._update_producer()

    def resumeProducing(self) -> None:
        self._paused = False
        self.guard.drained()
        for stream in list(self.streams.values()):
            stream._update_producer()

    def stopProducing(self) -> None:
        # The transport is going away; its connectionLost follows with the reason, which
        # is what the streams are told.
        pass

    # -- keepalive ----------------------------------------------------------------------------

    def _schedule_ping(self, delay: float | None = None) -> None:
        interval = self.settings.keepalive_interval
        if interval > 0 and self.may_send:
            self._ping_call = self.reactor.callLater(
                interval if delay is None else delay, self._send_ping
            )

    def _send_ping(self) -> None:
        self._ping_call = None
        if not self.may_send:
            return
        # Only a connection that has been quiet for a whole interval needs probing.
        quiet = self.reactor.seconds() - self._last_activity
        if quiet < self.settings.keepalive_interval:
            self._schedule_ping(self.settings.keepalive_interval - quiet)
            return
        if self._ping_timeout_call is None:
            self.conn.ping(b"hbonex\x00\x00")
            self._flush()
            self._ping_timeout_call = self.reactor.callLater(
                self.settings.keepalive_timeout, self._ping_timed_out
            )
        self._schedule_ping()

    def _ping_timed_out(self) -> None:
        self._ping_timeout_call = None
        why = f"no PING ack within {self.settings.keepalive_timeout:g}s"
        self.log.warn("{conn}: {why}, closing", conn=self.describe(), why=why)
        self.abort(why)

    def _cancel_ping(self) -> None:
        for call in (self._ping_call, self._ping_timeout_call):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._ping_timeout_call = None

    # -- graceful shutdown --------------------------------------------------------------------

    def send_goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """
        GOAWAY: graceful (NO_ERROR) lets open streams finish, then the connection closes; an
        error code closes it at once.
        """
        if not self.may_send or self.goaway_sent:
            return
        self.goaway_sent = True
        _GOAWAY_SENT.inc()
        if code == ErrorCodes.NO_ERROR:
            self.conn.graceful_goaway()
            self._flush()
            self._drain()
            self._close_if_drained()
        else:
            self.conn.close_connection(error_code=code)
            self.close(f"GOAWAY sent: {error_code_name(code)}")

    def _close_if_drained(self) -> None:
        if self.state is ConnectionState.DRAINING and not self.streams:
            self.close("drained")

    @property
    def open_stream_count(self) -> int:
        return len(self.streams)


def headers_dict(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """
    Header list to a dict (later duplicates are joined with ', ', as HTTP allows).
    """
    result: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in result:
            result[name] = result[name] + b", " + value
        else:
            result[name] = value
    return result


__all__ = [
    "ConnectionClosed",
    "ConnectionState",
    "ErrorCodes",
    "H2Stream",
    "H2TunnelConnection",
    "QuietH2Connection",
    "StreamReset",
    "error_code_name",
    "headers_dict",
]
