"""
Small misbehaving peers for end-to-end tests, each a real server on 127.0.0.1:

* :class:`H2Peer`: an HBONE server built on the ``h2`` library over real TLS (the test PKI's
  ``server`` identity), whose behaviour per connection and per CONNECT a test chooses: answer
  and echo, answer and then send a bad frame, advertise MAX_CONCURRENT_STREAMS 0, end with
  close_notify in the middle of a stream...
* :class:`SilentServer`: accepts TCP connections and never says a word.
* :class:`BlackHole`: a port whose connects never complete (SYN_SENT), for "the upstream is
  still connecting" cases.
* :class:`RecordingTarget`: records what arrives and how each connection ended (FIN or
  reset); it can reset the connection itself after some bytes.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet import error as ierror
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support import TestPKI

#: WINDOW_UPDATE with a zero increment on stream 0: a connection error (RFC 9113 §6.9).
ZERO_WINDOW_UPDATE = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00"


class _ServerTLS:
    """A pyOpenSSL server context for ``reactor.listenSSL`` (ALPN h2, client cert asked)."""

    def __init__(self, pki: TestPKI) -> None:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_chain_file(str(pki.cert("server")))
        ctx.use_privatekey_file(str(pki.key("server")))
        ctx.load_verify_locations(str(pki.ca))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        ctx.set_alpn_select_callback(lambda conn, protos: b"h2")
        self.context = ctx

    def getContext(self) -> SSL.Context:
        return self.context


class H2PeerConnection(protocol.Protocol):
    """
    One connection of an :class:`H2Peer`.  ``on_request(conn, stream_id)`` decides what a
    CONNECT gets; by default a 200 and an echo of the stream's data.
    """

    factory: H2Peer

    def __init__(self, index: int) -> None:
        self.index = index
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
        ))
        self.echo: set[int] = set()
        self.lost: Failure | None = None
        #: Fires (with None) once the connection is gone; the reason is in ``lost``.
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        settings = {h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1}
        if self.factory.max_concurrent_streams is not None:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = (
                self.factory.max_concurrent_streams
            )
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.lost is None:
            self.transport.write(data)  # type: ignore[union-attr]

    def write_raw(self, data: bytes) -> None:
        self.flush()
        self.transport.write(data)  # type: ignore[union-attr]

    def answer(self, stream_id: int, status: int = 200) -> None:
        self.conn.send_headers(stream_id, [(b":status", str(status).encode())])
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        if self.lost is not None:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.factory.on_request(self, event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
                if event.stream_id in self.echo and event.data:
                    self.conn.send_data(event.stream_id, event.data)
                if self.factory.on_data is not None and event.data:
                    self.flush()
                    self.factory.on_data(self, event.stream_id, event.data)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.echo:
                self.conn.end_stream(event.stream_id)
        self.flush()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason
        self.closed.callback(None)


def answer_and_echo(conn: H2PeerConnection, stream_id: int) -> None:
    conn.echo.add(stream_id)
    conn.answer(stream_id)


class H2Peer(protocol.Factory):
    """
    A listening HBONE-over-TLS server made of ``h2``; ``connections`` in accept order.
    """

    noisy = False

    def __init__(
        self,
        on_request: Callable[[H2PeerConnection, int], None] = answer_and_echo,
        max_concurrent_streams: int | None = None,
    ) -> None:
        self.on_request = on_request
        #: Called with (connection, stream id, data) for each DATA payload received.
        self.on_data: Callable[[H2PeerConnection, int, bytes], None] | None = None
        self.max_concurrent_streams = max_concurrent_streams
        self.connections: list[H2PeerConnection] = []
        self.port = 0
        self.listening: Any = None

    def buildProtocol(self, addr: Any) -> H2PeerConnection:
        proto = H2PeerConnection(len(self.connections))
        proto.factory = self
        return proto

    def open_connections(self) -> list[H2PeerConnection]:
        return [c for c in self.connections if c.lost is None]


def start_h2_peer(test: Any, pki: TestPKI, peer: H2Peer) -> H2Peer:
    port = reactor.listenSSL(  # type: ignore[attr-defined]
        0, peer, _ServerTLS(pki), interface="127.0.0.1"
    )
    peer.port = port.getHost().port
    peer.listening = port

    def cleanup() -> defer.Deferred[Any]:
        for conn in peer.open_connections():
            conn.transport.abortConnection()  # type: ignore[union-attr]
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening)]
            + [c.closed for c in peer.connections if c.lost is None]
        )

    test.addCleanup(cleanup)
    return peer


class _Silent(protocol.Protocol):
    factory: SilentServer

    def connectionMade(self) -> None:
        self.factory.open.add(self)
        self.factory.accepted += 1

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.open.discard(self)


class SilentServer(protocol.Factory):
    """Accepts TCP connections, reads and ignores everything, never writes."""

    noisy = False
    protocol = _Silent

    def __init__(self) -> None:
        self.open: set[protocol.Protocol] = set()
        self.accepted = 0
        self.port = 0


def start_silent(test: Any) -> SilentServer:
    server = SilentServer()
    port = reactor.listenTCP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
    server.port = port.getHost().port

    def cleanup() -> defer.Deferred[Any]:
        for proto in list(server.open):
            proto.transport.abortConnection()  # type: ignore[union-attr]
        return defer.maybeDeferred(port.stopListening)

    test.addCleanup(cleanup)
    return server


class BlackHole:
    """
    A listening socket with a full accept queue that never accepts: connects to ``port`` stay
    in SYN_SENT until the connecting side gives up.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        # One connection fills the queue (backlog 0 holds one); later SYNs are dropped.
        self.filler = socket.create_connection(("127.0.0.1", self.port))

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


def start_black_hole(test: Any) -> BlackHole:
    hole = BlackHole()
    test.addCleanup(hole.close)
    return hole


@implementer(IHalfCloseableProtocol)
class _Recording(protocol.Protocol):
    factory: RecordingTarget

    def connectionMade(self) -> None:
        self.data = bytearray()
        self.fin = False
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        reset_after = self.factory.reset_after
        if reset_after is not None and len(self.data) >= reset_after:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.fin = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.ended.append((self, reason))
        waiters, self.factory.waiters = self.factory.waiters, []
        for d in waiters:
            d.callback((self, reason))

    @property
    def was_reset(self) -> bool:
        """Ended by a TCP reset from the other side (not a FIN, not our own abort)."""
        reason = self.factory.reason_of(self)
        return (
            reason is not None and not self.fin and self.factory.reset_after is None
            and reason.check(ierror.ConnectionLost) is not None
        )


class RecordingTarget(protocol.Factory):
    """
    Records every connection's bytes and end; with ``reset_after`` it resets (RST) a
    connection once that many bytes arrived.
    """

    noisy = False
    protocol = _Recording

    def __init__(self, reset_after: int | None = None) -> None:
        self.reset_after = reset_after
        self.connections: list[_Recording] = []
        self.ended: list[tuple[_Recording, Failure]] = []
        self.waiters: list[defer.Deferred[Any]] = []
        self.port = 0

    def reason_of(self, conn: _Recording) -> Failure | None:
        for c, reason in self.ended:
            if c is conn:
                return reason
        return None

    def wait_ended(self) -> defer.Deferred[Any]:
        """Fire with (connection, reason) for the first connection that ends (or has)."""
        if self.ended:
            return defer.succeed(self.ended[0])
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiters.append(d)
        return d


def start_recorder(test: Any, reset_after: int | None = None) -> RecordingTarget:
    target = RecordingTarget(reset_after)
    port = reactor.listenTCP(0, target, interface="127.0.0.1")  # type: ignore[attr-defined]
    target.port = port.getHost().port

    def cleanup() -> defer.Deferred[Any]:
        for conn in target.connections:
            if target.reason_of(conn) is None:
                conn.transport.abortConnection()  # type: ignore[union-attr]
        return defer.maybeDeferred(port.stopListening)

    test.addCleanup(cleanup)
    return target


# --- raw HTTP/2 frames ------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Frame type codes (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x2, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9
)
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame as bytes, whatever a well-behaved library would refuse to build."""
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags])
        + stream_id.to_bytes(4, "big") + payload
    )


def connect_block(authority: bytes) -> bytes:
    """An HPACK header block for CONNECT to ``authority`` (literals, no indexing)."""
    import hpack

    return hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", authority)])


class RawFrameClient(protocol.Protocol):
    """
    Sends bytes as a test writes them (preface and SETTINGS first unless told otherwise) and
    parses what comes back into frames without any HTTP/2 state machine: ``goaway_code`` is
    the first GOAWAY's error code, ``resets`` maps stream ids to RST_STREAM codes.
    """

    def __init__(self, preface: bool = True) -> None:
        from h2.frame_buffer import FrameBuffer

        self.preface = preface
        self.frames: list[Any] = []
        self.goaway_code: int | None = None
        self.resets: dict[int, int] = {}
        self.lost: Failure | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self._buffer = FrameBuffer(server=False)
        self._buffer.max_frame_size = 2**24 - 1
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def connectionMade(self) -> None:
        if self.preface:
            self.transport.write(PREFACE + frame(SETTINGS, 0, 0))  # type: ignore[union-attr]

    def send(self, *frames: bytes) -> None:
        if self.lost is None:
            self.transport.write(b"".join(frames))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        from hyperframe.frame import GoAwayFrame, RstStreamFrame, SettingsFrame

        try:
            self._buffer.add_data(data)
            for f in self._buffer:
                self.frames.append(f)
                if isinstance(f, GoAwayFrame) and self.goaway_code is None:
                    self.goaway_code = f.error_code
                elif isinstance(f, RstStreamFrame):
                    self.resets.setdefault(f.stream_id, f.error_code)
                elif isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                    self.send(frame(SETTINGS, ACK, 0))
        except Exception:  # noqa: BLE001 - a garbled answer is a test failure elsewhere
            pass
        self._check()

    def wait(self, predicate: Callable[[], bool], what: str,
             timeout: float = 10.0) -> defer.Deferred[None]:
        from tests.support import _timeout_deferred

        if predicate():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((predicate, d))
        return _timeout_deferred(d, timeout, lambda: f"{what}; frames {self.frames[-5:]}")

    def _check(self) -> None:
        for item in list(self._waiters):
            predicate, d = item
            if predicate() and item in self._waiters:
                self._waiters.remove(item)
                d.callback(None)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason
        self._check()
        waiters, self._waiters = self._waiters, []
        for _predicate, d in waiters:
            if not d.called:
                d.errback(AssertionError(f"connection lost: {reason.getErrorMessage()}"))
        self.done.callback(None)
