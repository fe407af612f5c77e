"""
Splicing two byte-stream transports together, as ``twisted.protocols.portforward`` does, with
half-close and producers wired back to back: each transport is the producer of the other, so a
slow reader on one side pauses the socket (or HTTP/2 stream) on the other.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import error as ierror
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.tls.fasttls import TCP_TYPES, tune_tcp, write_now

#: RST_STREAM CANCEL (RFC 9113 §7), for HTTP/2 stream transports.
CANCEL = 0x8


@implementer(IHalfCloseableProtocol, IPushProducer)
class RelayEnd(Protocol):
    """
    One side of a relay.  Bytes it receives are written to the other side's transport.

    It is also the producer registered on the other side's transport, passing pause and
    resume on to its own transport.  A transport that goes away calls ``stopProducing`` first
    and says why only in ``connectionLost``: the relay acts on the reason there (a FIN is
    passed on as EOF, a reset as a reset, CONNECT_ERROR on an HTTP/2 stream).
    """

    # Two per tunnel in each proxy, alive as long as it is: slots, set in a fixed order (a
    # per-instance dict cost more than the rest of the object). The instance dict Protocol
    # brings stays empty unless someone patches a method on the instance (Cluster._track).
    __slots__ = ("relay", "name", "peer", "bytes_in", "pauses", "eof_received", "eof_sent",
                 "lost", "reason", "_early", "_started", "_tcp", "transport", "connected",
                 "untrack")

    def __init__(self, relay: Relay, name: str) -> None:
        self.transport: Any = None
        self.connected = 0
        self.relay = relay
        self.name = name
        self.peer: RelayEnd | None = None
        self.bytes_in = 0
        #: How often this end's transport was paused (its reader is the slower side).
        self.pauses = 0
        self.eof_received = False
        self.eof_sent = False
        self.lost = False
        self.reason: Failure | None = None
        #: Bytes that arrived before the relay started (bounded by the pause); made when the
        #: first such bytes arrive.
        self._early: list[bytes] | None = None
        self._started = False
        #: Our transport is a plain TCP one: writes go out at once (fasttls.write_now).
        self._tcp = False
        #: (cluster, address) counting this connection as active until it is lost: what
        #: Cluster._track would otherwise wrap around connectionLost on the instance.
        self.untrack: tuple[Any, Any] | None = None

    def connectionMade(self) -> None:
        tune_tcp(self.transport)
        self._tcp = type(self.transport) in TCP_TYPES

    def write(self, data: bytes) -> None:
        if self._tcp:
            write_now(self.transport, data)
        else:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.relay.last_activity = self.relay.reactor.seconds()
        peer = self.peer
        if peer is None or peer.transport is None:
            if not self._started:
                if self._early is None:
                    self._early = []
                self._early.append(data)
            return
        peer.write(data)

    def readConnectionLost(self) -> None:
        self.eof_received = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.send_eof()
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self._maybe_close()

    def send_eof(self) -> None:
        if self.eof_sent or self.lost:
            return
        self.eof_sent = True
        transport = self.transport
        # No more data will come from the peer: drop it as producer first, or Twisted's TCP
        # transport resumes it instead of shutting down the write side.
        transport.unregisterProducer()  # type: ignore[union-attr]
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        # A transport that cannot half-close stays open: closing it would cut the other
        # direction, which may still have bytes to deliver.  It closes once that direction
        # ends too (_maybe_close), or at the idle timeout.
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.eof_received and self.eof_sent and not self.lost:
            self.transport.loseConnection()  # type: ignore[union-attr]

    # -- IPushProducer, for the other side's transport ------------------------------------------

    def pauseProducing(self) -> None:
        if self.transport is not None and not self.lost:
            self.pauses += 1
            stats = self.relay.stats
            if stats is not None:
                stats.count_pause(self.name)
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        # The other side's connectionLost follows with the reason; Relay._end_lost acts on it.
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        untrack = self.untrack
        if untrack is not None:
            self.untrack = None
            untrack[0].untrack(untrack[1])
        if self.lost:
            return
        self.lost = True
        self.reason = reason
        self.relay._end_lost(self, reason)


class Relay:
    """
    A pair of RelayEnds.  ``a`` is usually the downstream (accepting) side.
    """

    __slots__ = ("reactor", "a", "b", "idle_timeout", "on_done", "last_activity", "started",
                 "_idle_call", "done", "flush_call", "stats", "close_reason", "first_lost")

    def __init__(
        self,
        reactor: IReactorTime,
        idle_timeout: float = 0,
        on_done: Callable[[Relay], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.a = RelayEnd(self, "downstream")
        self.b = RelayEnd(self, "upstream")
        self.a.peer = self.b
        self.b.peer = self.a
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.last_activity = reactor.seconds()
        self.started = reactor.seconds()
        self._idle_call: IDelayedCall | None = None
        self.done = False
        #: A tunnel's next periodic access record (TunnelLog), cancelled when it ends.
        self.flush_call: Any = None
        #: Who counts flow-control pauses (``count_pause(end name)``), e.g. tcp_proxy's stats.
        self.stats: Any = None
        self.close_reason = ""
        #: The end that was lost first: its reason is the tunnel's.
        self.first_lost: RelayEnd | None = None

    def end_reason(self) -> str:
        """
        Why the relay ended, for its log line: the reason given (``close_reason``), else the
        cause on the end lost first (the other end's loss is its consequence), else a clean
        close.
        """
        if self.close_reason:
            return self.close_reason
        first = self.first_lost
        ends = (first, first.peer) if first is not None and first.peer is not None else ()
        for end in (*ends, self.a, self.b):
            if end.reason is not None and not end.reason.check(ierror.ConnectionDone):
                return f"{end.name}: {end.reason.getErrorMessage()}"
        return "closed cleanly"

    def start(self) -> None:
        """
        Both ends are connected: wire the producers and flush early bytes.
        """
        a, b = self.a, self.b
        assert a.transport is not None and b.transport is not None
        for src, dst in ((a, b), (b, a)):
            early, src._early = src._early or [], None
            src._started = True
            for data in early:
                dst.transport.write(data)  # type: ignore[union-attr]
        if not a.eof_received:
            b.transport.registerProducer(a, True)  # type: ignore[union-attr,attr-defined]
        else:
            b.send_eof()
        if not b.eof_received:
            a.transport.registerProducer(b, True)  # type: ignore[union-attr,attr-defined]
        else:
            a.send_eof()
        if self.idle_timeout > 0:
            self._idle_call = self.reactor.callLater(self.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_call = None
        if self.done:
            return
        idle = self.reactor.seconds() - self.last_activity
        if idle >= self.idle_timeout:
            self.close_reason = f"idle timeout ({self.idle_timeout:g}s)"
            self.abort()
            return
        self._idle_call = self.reactor.callLater(self.idle_timeout - idle, self._check_idle)

    def abort(self) -> None:
        """
        Cut both ends (the idle timeout): an HTTP/2 stream is reset with CANCEL, not with the
        CONNECT_ERROR its abortConnection means for a failed TCP connection.
        """
        for end in (self.a, self.b):
            if end.transport is not None and not end.lost:
                reset = getattr(end.transport, "reset", None)
                if reset is not None:
                    reset(CANCEL)
                else:
                    end.transport.abortConnection()  # type: ignore[attr-defined]

    def _end_lost(self, end: RelayEnd, reason: Failure) -> None:
        if self.first_lost is None:
            self.first_lost = end
        other = end.peer
        assert other is not None
        if other.transport is not None and not other.lost:
            if reason.check(ierror.ConnectionDone) is not None:
                # Nothing more can be written to the lost side: finish the other one after
                # what is already queued for it.
                other.send_eof()
                other.transport.loseConnection()  # type: ignore[union-attr]
            else:
                other.transport.abortConnection()  # type: ignore[attr-defined]
        if self.a.lost and self.b.lost or other.transport is None:
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self.on_done is not None:
            self.on_done(self)
