"""
Internal listeners: Envoy's "user-space sockets".  A cluster endpoint with an
``envoy_internal_address`` connects to a listener in the same process with no kernel socket;
both ends get a transport with the same interfaces as TCP (producer/consumer, half-close).

A small write (``SYNC_MAX``) is handed to the other end's protocol at once when nothing waits
before it (no queued bytes, the reader not paused, not already inside that protocol's
``dataReceived``): one reactor turn less per hop. Otherwise it is queued and delivered on the
next reactor turn, as a socket would, so order holds, no ``dataReceived`` is ever re-entered,
and two protocols writing to each other recurse at most one level deep. EOF is always
delivered on a later turn. Each direction queues at most ``buffer_size`` bytes before the
writer's producer is paused.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

import attrs
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.errors import UpstreamError
from hbonex.interfaces import IHalfCloseableTransport

_EOF = object()

#: Writes up to this size are handed over at once when nothing is queued (request/response
#: traffic: one reactor turn less per hop); larger ones (bulk) still wait a turn, where the
#: reader gets them coalesced and the two directions of a relay interleave, which measured
#: faster for bulk through an internal hop.
SYNC_MAX = 16 * 1024


@implementer(IAddress)
@attrs.frozen
class InternalEndpointAddress:
    """
    The address of one end of an internal connection: ``envoy://<listener>/<endpoint_id>``.
    """

    listener: str
    endpoint_id: str = ""

    @property
    def host(self) -> str:
        return f"envoy://{self.listener}/{self.endpoint_id}"

    @property
    def port(self) -> int:
        return 0

    def __str__(self) -> str:
        return self.host


CLIENT_ADDRESS = InternalEndpointAddress("internal_client_address")


@implementer(IHalfCloseableTransport, ITransport, IConsumer, IPushProducer)
class InternalTransport:
    """
    One end of an in-process connection.
    """

    disconnecting = False
    #: Deliver writes at once when nothing is queued (InternalListenerRegistry.connect turns
    #: it on once both protocols are connected; until then every write waits a turn).
    synchronous = False
    #: Inside our protocol's dataReceived: a write arriving now waits for the next turn.
    _delivering = False

    def __init__(
        self,
        reactor: Any,
        host: InternalEndpointAddress,
        peer: InternalEndpointAddress,
        buffer_size: int,
    ) -> None:
        self.reactor = reactor
        self._host = host
        self._peer_address = peer
        self.buffer_size = buffer_size
        self.other: InternalTransport | None = None
        self.protocol: IProtocol | None = None
        #: What the other end wrote, waiting for our protocol.
        self._queue: deque[Any] = deque()
        self._queued = 0
        self._paused = False  # our protocol's consumer asked us to stop delivering
        self._scheduled = False
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self._write_closed = False
        self._read_closed = False
        self.lost = False
        #: Context from the connecting side (the upstream request), for the listener's filters.
        self.upstream_request: Any = None

    # -- ITransport ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        other = self.other
        if self._write_closed or self.lost or other is None or other.lost or not data:
            return
        other._enqueue(data)
        if other._queued > self.buffer_size and self._producer is not None:
            if not self._producer_paused:
                self._producer_paused = True
                self._producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        if self._write_closed or self.lost:
            return
        self._write_closed = True
        if self.other is not None and not self.other.lost:
            self.other._enqueue(_EOF)
        self._maybe_lost()

    def loseConnection(self) -> None:
        self.disconnecting = True
        self.loseWriteConnection()
        # Our read side closes too: what the other end sends from now on is dropped.
        if not self._read_closed:
            self._read_closed = True
            self._queue.clear()
            self._queued = 0
        self._maybe_lost()

    def abortConnection(self) -> None:
        reason = Failure(ierror.ConnectionAborted("internal connection aborted"))
        other = self.other
        self._lose(reason)
        if other is not None:
            other._lose(Failure(ierror.ConnectionLost("internal connection reset by peer")))

    def getPeer(self) -> InternalEndpointAddress:
        return self._peer_address

    def getHost(self) -> InternalEndpointAddress:
        return self._host

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    # -- IConsumer ----------------------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer  # type: ignore[assignment]  # push producers only
        self._producer_paused = False
        if self.lost:
            producer.stopProducing()
        elif self.other is not None and self.other._queued > self.buffer_size:
            self._producer_paused = True
            self._producer.pauseProducing()  # type: ignore[union-attr]

    def unregisterProducer(self) -> None:
        self._producer = None

    # -- IPushProducer ------------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._schedule()

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- delivery -----------------------------------------------------------------------------

    def _enqueue(self, item: Any) -> None:
        if self._read_closed or self.lost:
            return
        if (
            self.synchronous
            and not self._queue
            and not self._paused
            and not self._delivering
            and item is not _EOF
            and len(item) <= SYNC_MAX
            and self.protocol is not None
        ):
            self._delivering = True
            try:
                self.protocol.dataReceived(item)
            finally:
                self._delivering = False
            return
        self._queue.append(item)
        if item is not _EOF:
            self._queued += len(item)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self.lost:
            self._scheduled = True
            self.reactor.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        protocol = self.protocol
        if protocol is None or self.lost:
            return
        if self._delivering:
            # A turn scheduled while our protocol is still in dataReceived (it resumed us from
            # inside it): the queue goes on the next turn, never into a nested dataReceived.
            self._schedule()
            return
        self._delivering = True
        try:
            self._deliver_queued(protocol)
        finally:
            self._delivering = False

    def _deliver_queued(self, protocol: IProtocol) -> None:
        queue = self._queue
        # Only what was queued when the turn began: a write made meanwhile (two protocols
        # echoing each other) waits for the next turn, so one turn never runs unbounded.
        budget = len(queue)
        while budget and queue and not self._paused and not self.lost:
            item = queue.popleft()
            budget -= 1
            if item is _EOF:
                self._read_closed = True
                if IHalfCloseableProtocol.providedBy(protocol):
                    protocol.readConnectionLost()  # type: ignore[attr-defined]
                    self._maybe_lost()
                else:
                    self.loseConnection()
                continue
            self._queued -= len(item)
            # Coalesce what is queued so the protocol sees few, large chunks.
            if budget and queue and queue[0] is not _EOF:
                chunks = [item]
                while budget and queue and queue[0] is not _EOF:
                    nxt = queue.popleft()
                    budget -= 1
                    self._queued -= len(nxt)
                    chunks.append(nxt)
                item = b"".join(chunks)
            protocol.dataReceived(item)
        other = self.other
        if other is not None and other._producer_paused and self._queued <= self.buffer_size // 2:
            other._producer_paused = False
            if other._producer is not None:
                other._producer.resumeProducing()

    def _maybe_lost(self) -> None:
        if self._write_closed and self._read_closed and not self._queue:
            self._lose(Failure(ierror.ConnectionDone("internal connection closed")))

    def _lose(self, reason: Failure) -> None:
        if self.lost:
            return
        self.lost = True
        self._queue.clear()
        self._queued = 0
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


def internal_pair(
    reactor: Any, listener: str, endpoint_id: str, buffer_size: int
) -> tuple[InternalTransport, InternalTransport]:
    """
    (client end, server end) of a new internal connection to ``listener``.
    """
    server_addr = InternalEndpointAddress(listener, endpoint_id)
    client = InternalTransport(reactor, CLIENT_ADDRESS, server_addr, buffer_size)
    server = InternalTransport(reactor, server_addr, CLIENT_ADDRESS, buffer_size)
    client.other, server.other = server, client
    return client, server


class InternalListenerRegistry:
    """
    Internal listeners by name, for the clusters that point at them.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, Any] = {}
        self.buffer_size = 1024 * 1024

    def register(self, name: str, listener: Any) -> None:
        self._listeners[name] = listener

    def unregister(self, name: str) -> None:
        self._listeners.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._listeners)

    def connect(
        self, address: Any, protocol: IProtocol, request: Any = None
    ) -> defer.Deferred[None]:
        listener = self._listeners.get(address.server_listener_name)
        if listener is None:
            return defer.fail(
                UpstreamError(503, f"no internal listener named {address.server_listener_name}")
            )
        client, server = internal_pair(
            listener.reactor, address.server_listener_name, address.endpoint_id,
            self.buffer_size,
        )
        server.upstream_request = request
        server_protocol = listener.factory.buildProtocol(server.getPeer())
        if server_protocol is None:
            return defer.fail(UpstreamError(503, "internal listener refused the connection"))
        server.protocol = server_protocol
        client.protocol = protocol
        server_protocol.makeConnection(server)
        protocol.makeConnection(client)  # type: ignore[arg-type]
        # Both protocols are connected: writes may now be handed over at once.
        client.synchronous = server.synchronous = True
        return defer.succeed(None)
