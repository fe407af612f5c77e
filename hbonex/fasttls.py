"""
Twisted's TLS transport, with fewer and larger hand-offs.

``TLSMemoryBIOProtocol`` encrypts in 16 KiB slices (one ``transport.write`` each) and hands
every decrypted TLS record (at most 16 KiB) to the protocol separately.  For tunnels carrying
bulk data that multiplies the per-call cost of everything above it (h2 frame parsing above all).
Here a write is encrypted in one call and leaves in one ``transport.write``, and everything
decrypted from one socket read reaches the protocol as one ``dataReceived``.  Behaviour is
otherwise Twisted's.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import tcp
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

#: Socket read size (and write high-water mark) for tunnel TCP connections: Twisted's 64 KiB
#: default makes four times the reactor and framing work per byte.
TCP_BUFFER_SIZE = 256 * 1024
_RECORD = 16384
_TCP_TYPES = (tcp.Server, tcp.Client)


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
        type(transport) in _TCP_TYPES
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


def pending_write_bytes(transport: Any) -> int | None:
    """
    Bytes the TCP transport under ``transport`` (TLS or not) still has to send, or None when
    there is no such transport to ask.
    """
    while transport is not None and not isinstance(transport, tcp.Connection):
        transport = getattr(transport, "transport", None)
    if transport is None:
        return None
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore


def writer_for(transport: Any) -> Any:
    """
    The fastest correct write function for ``transport``.
    """
    if type(transport) in _TCP_TYPES:
        return lambda data: write_now(transport, data)
    return transport.write


class FastTLSProtocol(TLSMemoryBIOProtocol):
    def makeConnection(self, transport: Any) -> None:
        tune_tcp(transport)
        super().makeConnection(transport)

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
        while not self._lostTLSConnection:
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
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
        elif failure is not None:
            self._tlsShutdownFinished(failure)
        self._flushSendBIO()


class FastTLSFactory(TLSMemoryBIOFactory):
    protocol = FastTLSProtocol
    noisy = False
