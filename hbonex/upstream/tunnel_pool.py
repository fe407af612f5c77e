"""
Pooled HTTP/2 connections to one HBONE peer.

A pool is keyed by (server address, expected server identity, own identity).  Tunnels go to a
ready connection with a free stream (never beyond our ``max_streams`` nor the peer's
MAX_CONCURRENT_STREAMS); when none has room, tunnels wait while just enough new connections are
opened for them, so a burst of first tunnels makes one connection, not a storm.  A connection
that received GOAWAY takes no new streams; streams it never processed are retried elsewhere.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hbonex.errors import UpstreamError
from hbonex.tunnel.client import H2TunnelClient

Connector = Callable[[], "defer.Deferred[H2TunnelClient]"]


@attrs.frozen
class PoolKey:
    address: str
    server_identity: str
    own_identity: str


@attrs.define
class PoolStats:
    connections_opened: int = 0
    connections_failed: int = 0
    tunnels_opened: int = 0
    tunnels_retried: int = 0
    #: Tunnels refused because max_pending were already waiting (Envoy's pending_overflow).
    pending_overflow: int = 0


class H2Pool:
    log = Logger()

    def __init__(
        self,
        key: PoolKey,
        connector: Connector,
        reactor: IReactorTime,
        max_streams: int = 100,
        idle_timeout: float = 300.0,
        max_connections: int = 1024,
        max_pending: int = 1024,
        max_attempts: int = 3,
        pending_timeout: float = 5.0,
    ) -> None:
        self.key = key
        self.connector = connector
        self.reactor = reactor
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        #: How long a tunnel may wait for a free stream (the cluster's connect timeout).
        self.pending_timeout = pending_timeout
        self.connections: list[H2TunnelClient] = []
        self._connecting = 0
        self._waiters: deque[defer.Deferred[H2TunnelClient]] = deque()
        self._waiter_timers: dict[defer.Deferred[H2TunnelClient], IDelayedCall] = {}
        self._idle_calls: dict[H2TunnelClient, IDelayedCall] = {}
        self.stats = PoolStats()
        self._closed = False

    def _room(self, conn: H2TunnelClient) -> int:
        return min(self.max_streams, conn.capacity + len(conn.streams)) - len(conn.streams)

    # -- tunnels ------------------------------------------------------------------------------

    def open_tunnel(
        self, authority: str, headers: list[tuple[str, str]], post_path: str | None = None
    ) -> defer.Deferred[Any]:
        """
        Fire with (stream, response headers) for a new tunnel, or fail with UpstreamError.
        (Plain callbacks, not inlineCallbacks: this runs once per tunnel.)
        """
        attempt = 0
        conn: H2TunnelClient | None = None
        current: defer.Deferred[Any] | None = None
        result: defer.Deferred[Any] = defer.Deferred(
            lambda _: current.cancel() if current is not None else None
        )

        def start() -> None:
            nonlocal attempt, current
            attempt += 1
            current = self.acquire_connection().addCallback(opening)
            current.addCallbacks(opened, failed)

        def opening(c: H2TunnelClient) -> defer.Deferred[Any]:
            nonlocal conn
            conn = c
            return c.open_tunnel(authority, headers, post_path)

        def opened(value: Any) -> None:
            self.stats.tunnels_opened += 1
            result.callback(value)

        def failed(failure: Any) -> None:
            e = failure.value
            if isinstance(e, UpstreamError) and not result.called:
                if e.unprocessed and conn is not None and _drained_after_progress(conn):
                    # The server served other streams on this connection, then sent GOAWAY
                    # before ours (e.g. its max requests per connection): the pool no longer
                    # uses that connection, so the retry goes to another one and costs no
                    # attempt.  Every such connection makes progress; the cluster's tunnel
                    # deadline still bounds the whole.
                    self.stats.tunnels_retried += 1
                    start()
                    return
                if e.retryable and attempt < self.max_attempts:
                    self.stats.tunnels_retried += 1
                    start()
                    return
            if not result.called:
                result.errback(failure)

        start()
        return result

    def acquire_connection(self) -> defer.Deferred[H2TunnelClient]:
        """
        A ready connection with a free stream; the caller opens its stream in the callback
        (synchronously), so the room is taken at once.
        """
        if self._closed:
            return defer.fail(UpstreamError(503, "pool closed"))
        for conn in self.connections:
            if self._room(conn) > 0:
                self._touch(conn)
                return defer.succeed(conn)
        if len(self._waiters) >= self.max_pending:
            self.stats.pending_overflow += 1
            return defer.fail(UpstreamError(503, "too many tunnels waiting for a connection",
                                            flag="UO"))
        d: defer.Deferred[H2TunnelClient] = defer.Deferred(lambda d: self._cancel_waiter(d))
        self._waiters.append(d)
        if self.pending_timeout > 0:
            self._waiter_timers[d] = self.reactor.callLater(
                self.pending_timeout, self._waiter_timed_out, d
            )
            d.addBoth(self._waiter_done, d)
        self._connect_more()
        return d

    def _waiter_done(self, result: Any, d: defer.Deferred[H2TunnelClient]) -> Any:
        timer = self._waiter_timers.pop(d, None)
        if timer is not None and timer.active():
            timer.cancel()
        return result

    def _waiter_timed_out(self, d: defer.Deferred[H2TunnelClient]) -> None:
        self._waiter_timers.pop(d, None)
        if d.called:
            return
        self._cancel_waiter(d)
        limits = sorted({c.peer_max_concurrent_streams for c in self.connections})
        why = f"no free stream to {self.key.address} within {self.pending_timeout:g}s"
        if limits:
            why += f" (the server allows {'/'.join(map(str, limits))} concurrent streams)"
        d.errback(UpstreamError(503, why))

    def _cancel_waiter(self, d: defer.Deferred[H2TunnelClient]) -> None:
        try:
            self._waiters.remove(d)
        except ValueError:
            pass

    def _connect_more(self) -> None:
        # Enough connections in progress to take every waiter, one stream slot each.  A
        # connection whose peer allows no streams at all (MAX_CONCURRENT_STREAMS 0, for now)
        # counts as one in progress: another one to the same peer would get the same answer,
        # and opening one per waiter would be a connection storm.
        blocked = sum(
            1 for c in self.connections
            if c.accepting_streams and c.peer_max_concurrent_streams <= 0
        )
        needed = (
            math.ceil(len(self._waiters) / max(1, self.max_streams)) - self._connecting - blocked
        )
        while needed > 0 and len(self.connections) + self._connecting < self.max_connections:
            needed -= 1
            self._connecting += 1
            self.stats.connections_opened += 1
            d = self.connector()
            d.addCallbacks(self._connected, self._connect_failed)
        if needed > 0 and not self._connecting and not self.connections:
            self._fail_waiters(UpstreamError(503, "connection limit reached", flag="UO"))

    def _connected(self, conn: H2TunnelClient) -> None:
        self._connecting -= 1
        if self._closed:
            conn.send_goaway()
            conn.close()
            return
        self.connections.append(conn)
        conn.on_capacity = self._capacity_changed
        conn.on_lost = self._lost
        self._serve_waiters()
        self._touch(conn)

    def adopt(self, conn: H2TunnelClient) -> None:
        """
        Take a ready connection opened elsewhere (auto_config's ALPN made it HTTP/2).
        """
        self._connecting += 1
        self.stats.connections_opened += 1
        self._connected(conn)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting -= 1
        self.stats.connections_failed += 1
        error = failure.value
        if not isinstance(error, UpstreamError):
            error = UpstreamError(503, f"cannot connect to {self.key.address}: {error}")
        self.log.warn(
            "HBONE connection to {address} failed: {error}", address=self.key.address,
            error=error.reason,
        )
        # Waiters beyond what the remaining attempts can take fail now.
        capacity = self._connecting * self.max_streams + sum(
            self._room(c) for c in self.connections
        )
        while len(self._waiters) > capacity:
            self._waiters.pop().errback(error)

    def _fail_waiters(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.errback(error)

    def _serve_waiters(self) -> None:
        for conn in list(self.connections):
            while self._waiters and self._room(conn) > 0:
                d = self._waiters.popleft()
                # Callbacks open the stream synchronously, so the room is taken at once.
                d.callback(conn)
        if self._waiters:
            self._connect_more()

    def _capacity_changed(self, conn: H2TunnelClient) -> None:
        if not conn.accepting_streams:
            # Draining (GOAWAY) or closed (a protocol error, say): never used again; the
            # next tunnel gets another connection.
            self._drop(conn)
            if not conn.streams:
                conn.close()
            if self._waiters:
                self._connect_more()
        elif self._waiters:
            self._serve_waiters()
        self._touch(conn)

    def _lost(self, conn: H2TunnelClient) -> None:
        self._drop(conn)
        if self._waiters:
            self._connect_more()

    def _drop(self, conn: H2TunnelClient) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        call = self._idle_calls.pop(conn, None)
        if call is not None and call.active():
            call.cancel()

    # -- idle connections ---------------------------------------------------------------------

    def _touch(self, conn: H2TunnelClient) -> None:
        call = self._idle_calls.pop(conn, None)
        if call is not None and call.active():
            call.cancel()
        if not conn.streams and conn in self.connections and self.idle_timeout > 0:
            self._idle_calls[conn] = self.reactor.callLater(
                self.idle_timeout, self._idle_close, conn
            )

    def _idle_close(self, conn: H2TunnelClient) -> None:
        self._idle_calls.pop(conn, None)
        if conn.streams:
            return
        self.log.info("closing idle HBONE connection to {address}", address=self.key.address)
        self._drop(conn)
        conn.send_goaway()
        conn.close()

    def close(self) -> None:
        """
        Stop taking tunnels; GOAWAY every connection (open tunnels finish on their own).
        """
        self._closed = True
        self._fail_waiters(UpstreamError(503, "pool closed"))
        for conn in list(self.connections):
            self._drop(conn)
            conn.send_goaway()
            if not conn.streams:
                conn.close()


def _drained_after_progress(conn: H2TunnelClient) -> bool:
    """
    Whether ``conn`` got a GOAWAY that covers streams the server did process.
    """
    last = getattr(conn, "last_stream_id_allowed", None)
    return bool(conn.goaway_received and last)


__all__ = ["H2Pool", "PoolKey"]
