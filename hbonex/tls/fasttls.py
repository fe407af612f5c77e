"""
Twisted's TLS transport, with fewer and larger hand-offs.

``TLSMemoryBIOProtocol`` encrypts in 16 KiB slices (one ``transport.write`` each) and hands
every decrypted TLS record (at most 16 KiB) to the protocol separately.  For tunnels carrying
bulk data that multiplies the per-call cost of everything above it (h2 frame parsing above all).
Here a write is encrypted in one call and leaves in one ``transport.write``, and everything
decrypted from one socket read reaches the protocol as one ``dataReceived``.

It also carries half-close, as RFC 8446 §6.1 allows and Envoy's TLS transport socket does,
when the protocol above is an ``IHalfCloseableProtocol``: ``loseWriteConnection`` sends
close_notify (then a TCP FIN) and keeps reading; a received close_notify is the peer's EOF
(``readConnectionLost``) while we keep writing.  A TCP FIN without close_notify is a truncation
and ends the connection with ConnectionLost, never as a clean EOF.  ``abortConnection`` sends no
close_notify: the peer must see a reset, not a clean end.  For other protocols behaviour is
Twisted's.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: Socket read size (and write high-water mark) for tunnel TCP connections: Twisted's 64 KiB
#: default makes four times the reactor and framing work per byte.
TCP_BUFFER_SIZE = 256 * 1024
_RECORD = 16384
#: The transports write_now sends on at once (type(transport) in TCP_TYPES).
TCP_TYPES = (tcp.Server, tcp.Client)


def tune_tcp(transport: Any) -> None:
    """
    Larger socket reads and no Nagle delay (as Envoy) for a TCP transport, or the TCP
    transport under a TLS one: a relay must not hold back a small write waiting for an ACK.
    """
    while transport is not None and not isinstance(transport, tcp.Connection):
        transport = getattr(transport, "transport", None)
    if transport is not None:
        transport.bufferSize = TCP_BUFFER_SIZE
        try:
            transport.setTcpNoDelay(True)
        except OSError:  # pragma: no cover - e.g. the socket is already gone
            pass


def write_now(transport: Any, data: bytes) -> None:
    """
    ``transport.write(data)``, but when nothing is queued on a TCP transport the bytes go to the
    socket at once instead of on the reactor's next turn: for small request/response traffic
    relayed through two proxies that turn (an epoll round and two epoll_ctl calls per message)
    is most of the latency.  Whatever the socket does not take, and every unusual state, goes
    through Twisted's own buffered write.
    """
    if (
        type(transport) in TCP_TYPES
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = bytes(memoryview(data)[sent:])
    transport.write(data)


@implementer(IHalfCloseableProtocol)
class FastTLSProtocol(TLSMemoryBIOProtocol):
    #: close_notify received (the peer's EOF, handed to a half-closeable protocol).
    _read_eof = False
    #: loseWriteConnection() was called; close_notify is sent once pending writes are out.
    _write_eof = False
    _close_notify_sent = False

    def makeConnection(self, transport: Any) -> None:
        tune_tcp(transport)
        super().makeConnection(transport)

    def _half_closeable(self) -> bool:
        return IHalfCloseableProtocol.providedBy(self.wrappedProtocol)  # type: ignore[no-any-return]

    # -- half-close --------------------------------------------------------------------------

    def loseWriteConnection(self) -> None:
        """
        Send close_notify and a TCP FIN after what is already written; keep reading.
        """
        if self._write_eof or self.disconnecting or self._lostTLSConnection:
            return
        self._write_eof = True
        if not self._handshakeDone:
            # close_notify mid-handshake cannot be sent cleanly (see loseConnection).
            self.loseConnection()
            return
        if not self._appSendBuffer:
            self._send_close_notify()

    def _send_close_notify(self) -> None:
        if self._close_notify_sent or self._lostTLSConnection:
            return
        self._close_notify_sent = True
        try:
            both = self._tlsConnection.shutdown()
        except Error:
            both = False
        self._flushSendBIO()
        transport: Any = self.transport
        if both:
            # The peer's close_notify came first: nothing is left in either direction.
            transport.loseConnection()
        else:
            transport.loseWriteConnection()

    def _unbufferPendingWrites(self) -> None:
        super()._unbufferPendingWrites()
        if self._write_eof and not self._appSendBuffer:
            self._send_close_notify()

    def readConnectionLost(self) -> None:
        """
        TCP FIN.  After close_notify it says nothing new; without one the stream was cut
        (RFC 8446 §6.1: a truncation), which the protocol must see as an error.
        """
        if self._read_eof or self._lostTLSConnection:
            return
        # Every complete record was handled as it arrived; what is left is a partial one.
        if self._reason is None:
            # (Set here: _tlsShutdownFinished only understands OpenSSL errors.)
            self._reason = Failure(ierror.ConnectionLost(
                "TLS connection ended without close_notify"
            ))
        self._tlsShutdownFinished(None)

    def writeConnectionLost(self) -> None:
        # Our FIN went out after close_notify: tell a protocol that waits for it.
        if self._half_closeable():
            self.wrappedProtocol.writeConnectionLost()  # type: ignore[attr-defined]

    def loseConnection(self) -> None:
        if self._read_eof and self.connected and not self.disconnecting:
            # The peer has ended its side already: answer its close_notify (if ours is not
            # out yet) and close, as Twisted does when close_notify arrives.
            self.disconnecting = True
            if not self._close_notify_sent:
                self._close_notify_sent = True
                try:
                    self._tlsConnection.shutdown()
                except Error:
                    pass
                self._flushSendBIO()
            self._lostTLSConnection = True
            # (With our write side already shut, this calls connectionLost at once.)
            transport: Any = self.transport
            transport.loseConnection()
            return
        super().loseConnection()

    def abortConnection(self) -> None:
        # Twisted sends close_notify before the TCP abort; the peer would then take a cut
        # connection for a clean EOF.  A reset must look like one.
        self._aborted = True
        self.disconnecting = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _peer_closed(self) -> None:
        """
        close_notify received.
        """
        if self._lostTLSConnection or self._read_eof:
            return
        if self._half_closeable() and not self.disconnecting:
            # The peer's EOF; our direction stays open.  Once the protocol has ended its own
            # side too it calls loseConnection (above).
            self._read_eof = True
            self.wrappedProtocol.readConnectionLost()  # type: ignore[attr-defined]
            return
        self._shutdownTLS()
        self._tlsShutdownFinished(None)

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent_total = 0
        while sent_total < len(view):
            try:
                sent = self._tlsConnection.send(view[sent_total:])
            except WantReadError:
                self._bufferedWrite(bytes(view[sent_total:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            else:
                sent_total += sent
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        if self._tlsConnection is None:  # connectionLost ran (a close from inside a callback)
            return
        chunks = []
        while True:
            try:
                chunk = self._tlsConnection.bio_read(TCP_BUFFER_SIZE)
            except WantReadError:
                break
            chunks.append(chunk)
            # A memory BIO hands out all it has up to the size asked for: a shorter chunk
            # means it is empty, and asking again would only raise (and cost) WantReadError.
            if len(chunk) < TCP_BUFFER_SIZE:
                break
        if chunks and self.transport is not None:
            write_now(self.transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _flushReceiveBIO(self) -> None:
        chunks = []
        eof = False
        failure = None
        while not self._lostTLSConnection and not self._read_eof:
            try:
                chunks.append(self._tlsConnection.recv(_RECORD))
            except WantReadError:
                break
            except ZeroReturnError:
                eof = True
                break
            except Error:
                failure = Failure()
                break
        if chunks and not self._aborted:
            ProtocolWrapper.dataReceived(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof:
            self._peer_closed()
        elif failure is not None:
            self._tlsShutdownFinished(failure)
        self._flushSendBIO()


class FastTLSFactory(TLSMemoryBIOFactory):
    protocol = FastTLSProtocol
    noisy = False
