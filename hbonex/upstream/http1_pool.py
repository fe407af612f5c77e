"""
Kept-alive upstream HTTP/1.1 connections for one cluster: a request takes an idle connection,
or a new one while under ``max_connections``, or waits (up to ``max_pending``, Envoy's circuit
breakers: past them a request is refused at once, 503 ``UO``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from hbonex.errors import UpstreamError
from hbonex.upstream.http1_client import Http1ClientCodec

Connector = Callable[[Http1ClientCodec], "defer.Deferred[Any]"]


class Overflow(UpstreamError):
    """A circuit breaker is open (Envoy's response flag UO)."""


class Http1Pool:
    def __init__(
        self,
        reactor: Any,
        connect: Connector,
        max_connections: int = 1024,
        max_pending: int = 1024,
        idle_timeout: float = 3600.0,
    ) -> None:
        self.reactor = reactor
        self.connect = connect
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.idle_timeout = idle_timeout
        self.idle: list[Http1ClientCodec] = []
        self.connections: set[Http1ClientCodec] = set()
        self._waiters: deque[defer.Deferred[Http1ClientCodec]] = deque()
        self._idle_calls: dict[Http1ClientCodec, IDelayedCall] = {}
        self.connecting = 0

    def acquire(self) -> defer.Deferred[Http1ClientCodec]:
        while self.idle:
            codec = self.idle.pop()
            self._stop_idle_timer(codec)
            if not codec.lost:
                return defer.succeed(codec)
        if len(self.connections) + self.connecting < self.max_connections:
            return self._new_connection()
        if len(self._waiters) >= self.max_pending:
            return defer.fail(Overflow(503, "too many requests waiting for a connection"))
        d: defer.Deferred[Http1ClientCodec] = defer.Deferred(self._waiters.remove)
        self._waiters.append(d)
        return d

    def _new_connection(self) -> defer.Deferred[Http1ClientCodec]:
        codec = Http1ClientCodec(on_idle=self._idle, on_closed=self._closed)
        self.connecting += 1
        d = self.connect(codec)

        def connected(_: Any) -> Http1ClientCodec:
            self.connecting -= 1
            self.connections.add(codec)
            return codec

        def failed(f: Any) -> Any:
            self.connecting -= 1
            return f

        return d.addCallbacks(connected, failed)

    def _idle(self, codec: Http1ClientCodec) -> None:
        if self._waiters:
            self._waiters.popleft().callback(codec)
            return
        self.idle.append(codec)
        if self.idle_timeout > 0:
            self._idle_calls[codec] = self.reactor.callLater(
                self.idle_timeout, self._idle_expired, codec
            )

    def _idle_expired(self, codec: Http1ClientCodec) -> None:
        self._idle_calls.pop(codec, None)
        if codec in self.idle:
            self.idle.remove(codec)
            codec.transport.loseConnection()  # type: ignore[union-attr]

    def _stop_idle_timer(self, codec: Http1ClientCodec) -> None:
        call = self._idle_calls.pop(codec, None)
        if call is not None and call.active():
            call.cancel()

    def _closed(self, codec: Http1ClientCodec) -> None:
        self.connections.discard(codec)
        if codec in self.idle:
            self.idle.remove(codec)
        self._stop_idle_timer(codec)
        if self._waiters and len(self.connections) + self.connecting < self.max_connections:
            waiter = self._waiters.popleft()
            self._new_connection().chainDeferred(waiter)

    def close(self) -> None:
        for codec in list(self.idle):
            codec.transport.loseConnection()  # type: ignore[union-attr]
        self.idle.clear()


__all__ = ["Http1Pool", "Overflow"]
