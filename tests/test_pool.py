"""hbonex.upstream.tunnel_pool: pooled HTTP/2 connections with fake connections and connector."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hbonex.errors import UpstreamError
from hbonex.upstream.tunnel_pool import H2Pool, PoolKey

KEY = PoolKey("10.0.0.1:15008", "identity spiffe://td/server", "spiffe://td/client")


class FakeConnection:
    """
    Duck-typed like H2TunnelClient, as far as the pool looks at it.  ``open_tunnel`` opens a
    stream at once (fake stream objects) unless ``refuse_with`` is set.
    """

    def __init__(self, name: str, peer_max_concurrent_streams: int = 100) -> None:
        self.name = name
        self.peer_max_concurrent_streams = peer_max_concurrent_streams
        self.streams: dict[int, object] = {}
        self.goaway_received = False
        self.goaway_sent = False
        self.transport = StringTransport()
        self.on_capacity: Any = None
        self.on_lost: Any = None
        self.refuse_with: UpstreamError | None = None
        self.goaway_on_refusal = False
        self.closed = False
        self.authorities: list[str] = []
        self._next_id = 1

    def close(self) -> None:
        # H2TunnelConnection.close(): flush, then lose the transport.
        self.transport.loseConnection()

    def __repr__(self) -> str:
        return f"<FakeConnection {self.name}>"

    @property
    def accepting_streams(self) -> bool:
        return not (self.goaway_received or self.goaway_sent or self.closed)

    @property
    def capacity(self) -> int:
        if not self.accepting_streams:
            return 0
        return self.peer_max_concurrent_streams - len(self.streams)

    def open_tunnel(self, authority: str, headers: list, post_path: str | None = None) -> Any:
        self.authorities.append(authority)
        if self.refuse_with is not None:
            error, self.refuse_with = self.refuse_with, None
            if self.goaway_on_refusal:
                self.goaway_received = True
            return defer.fail(error)
        if self.capacity <= 0:
            raise AssertionError(f"{self!r}: the pool opened a stream beyond capacity")
        stream_id, self._next_id = self._next_id, self._next_id + 2
        stream = (self.name, stream_id)
        self.streams[stream_id] = stream
        return defer.succeed((stream, {b":status": b"200"}))

    def close_stream(self, stream_id: int) -> None:
        del self.streams[stream_id]
        if self.on_capacity is not None:
            self.on_capacity(self)

    def send_goaway(self) -> None:
        self.goaway_sent = True


class FakeConnector:
    """
    The pool's connector: each call is a Deferred the test fires with ``connect()``/``fail()``.
    """

    def __init__(self, peer_max_concurrent_streams: int = 100) -> None:
        self.peer_max = peer_max_concurrent_streams
        self.pending: list[defer.Deferred[Any]] = []
        self.made: list[FakeConnection] = []
        self.calls = 0

    def __call__(self) -> defer.Deferred[Any]:
        self.calls += 1
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d


    def connect(
        self, peer_max: int | None = None, refuse_with: UpstreamError | None = None,
        goaway_on_refusal: bool = False,
    ) -> FakeConnection:
        conn = FakeConnection(
            f"c{len(self.made) + 1}", self.peer_max if peer_max is None else peer_max
        )
        conn.refuse_with = refuse_with
        conn.goaway_on_refusal = goaway_on_refusal
        self.made.append(conn)
        self.pending.pop(0).callback(conn)
        return conn

    def fail(self, error: Exception) -> None:
        self.pending.pop(0).errback(error)


def make_pool(
    max_streams: int = 100, peer_max: int = 100, **kwargs: Any
) -> tuple[H2Pool, FakeConnector, Clock]:
    clock = Clock()
    connector = FakeConnector(peer_max)
    pool = H2Pool(KEY, connector, clock, max_streams=max_streams, **kwargs)
    return pool, connector, clock


def open_many(pool: H2Pool, n: int) -> list[defer.Deferred[Any]]:
    return [pool.open_tunnel(f"10.1.0.{i}:80", []) for i in range(n)]


class BurstTests(unittest.TestCase):
    def test_burst_of_first_tunnels_makes_one_connection(self) -> None:
        pool, connector, _ = make_pool(max_streams=100)
        tunnels = open_many(pool, 50)
        self.assertEqual(connector.calls, 1)
        self.assertEqual([d.called for d in tunnels], [False] * 50)
        conn = connector.connect()
        results = [self.successResultOf(d) for d in tunnels]
        self.assertEqual({stream[0] for stream, _ in results}, {"c1"})
        self.assertEqual(len(conn.streams), 50)
        self.assertEqual(pool.stats.tunnels_opened, 50)
        self.assertEqual(pool.stats.connections_opened, 1)

    def test_150_tunnels_make_two_connections(self) -> None:
        pool, connector, _ = make_pool(max_streams=100)
        tunnels = open_many(pool, 150)
        self.assertEqual(connector.calls, 2)
        first = connector.connect()
        self.assertEqual(sum(d.called for d in tunnels), 100)
        second = connector.connect()
        for d in tunnels:
            self.successResultOf(d)
        self.assertEqual((len(first.streams), len(second.streams)), (100, 50))
        self.assertEqual(connector.calls, 2)

    def test_ready_connection_is_reused(self) -> None:
        pool, connector, _ = make_pool()
        open_many(pool, 1)
        conn = connector.connect()
        for d in open_many(pool, 10):
            self.successResultOf(d)
        self.assertEqual(connector.calls, 1)
        self.assertEqual(len(conn.streams), 11)

    def test_full_connection_opens_a_new_one(self) -> None:
        pool, connector, _ = make_pool(max_streams=2)
        open_many(pool, 1)
        first = connector.connect()
        self.successResultOf(pool.open_tunnel("a:1", []))
        self.assertEqual(len(first.streams), 2)
        third = pool.open_tunnel("a:1", [])
        self.assertNoResult(third)
        self.assertEqual(connector.calls, 2)
        second = connector.connect()
        stream, _ = self.successResultOf(third)
        self.assertEqual(stream[0], "c2")
        self.assertEqual(len(second.streams), 1)
        self.assertEqual(len(first.streams), 2)


class PeerLimitTests(unittest.TestCase):
    def test_peer_max_concurrent_streams_is_respected(self) -> None:
        pool, connector, _ = make_pool(max_streams=100, peer_max=6)
        tunnels = open_many(pool, 10)
        self.assertEqual(connector.calls, 1)
        first = connector.connect()
        self.assertEqual(len(first.streams), 6)
        self.assertEqual(sum(d.called for d in tunnels), 6)
        # The other four wait for a second connection rather than fail.
        self.assertEqual(connector.calls, 2)
        second = connector.connect()
        for d in tunnels:
            self.successResultOf(d)
        self.assertEqual(len(second.streams), 4)

    def test_waiters_wait_for_a_free_stream_at_the_connection_limit(self) -> None:
        pool, connector, _ = make_pool(max_streams=100, peer_max=6, max_connections=1)
        tunnels = open_many(pool, 8)
        conn = connector.connect()
        self.assertEqual(connector.calls, 1)
        waiting = [d for d in tunnels if not d.called]
        self.assertEqual(len(waiting), 2)
        conn.close_stream(1)
        self.assertTrue(waiting[0].called)
        self.assertNoResult(waiting[1])
        conn.close_stream(3)
        self.successResultOf(waiting[1])
        self.assertEqual(len(conn.streams), 6)

    def test_peer_raising_its_limit_serves_waiters(self) -> None:
        pool, connector, _ = make_pool(peer_max=1, max_connections=1)
        tunnels = open_many(pool, 3)
        conn = connector.connect()
        self.assertEqual(sum(d.called for d in tunnels), 1)
        conn.peer_max_concurrent_streams = 3
        conn.on_capacity(conn)  # what a SETTINGS change does
        for d in tunnels:
            self.successResultOf(d)

    def test_our_max_streams_below_peer_limit(self) -> None:
        pool, connector, _ = make_pool(max_streams=3, peer_max=100)
        open_many(pool, 5)
        first = connector.connect()
        self.assertEqual(len(first.streams), 3)
        second = connector.connect()
        self.assertEqual(len(second.streams), 2)


class ZeroLimitTests(unittest.TestCase):
    def test_peer_allowing_no_streams_gets_one_connection_not_a_storm(self) -> None:
        """
        MAX_CONCURRENT_STREAMS 0: the tunnel waits on the one connection (no new connection
        per waiter), then fails with 503 naming why after the pending timeout.
        """
        pool, connector, clock = make_pool(peer_max=100, pending_timeout=2.0)
        [d] = open_many(pool, 1)
        connector.connect(peer_max=0)
        self.assertEqual(connector.calls, 1)
        self.assertNoResult(d)
        clock.advance(1.9)
        self.assertEqual(connector.calls, 1)
        self.assertNoResult(d)
        clock.advance(0.1)
        error = self.failureResultOf(d, UpstreamError).value
        self.assertEqual(error.status, 503)
        self.assertIn("no free stream to 10.0.0.1:15008 within 2s", error.reason)
        self.assertIn("allows 0 concurrent streams", error.reason)
        self.assertEqual(connector.calls, 1)
        self.assertEqual(pool._waiter_timers, {})

    def test_zero_limit_raised_later_serves_the_waiter(self) -> None:
        pool, connector, clock = make_pool(pending_timeout=2.0)
        [d] = open_many(pool, 1)
        conn = connector.connect(peer_max=0)
        self.assertNoResult(d)
        conn.peer_max_concurrent_streams = 5
        conn.on_capacity(conn)
        self.successResultOf(d)
        clock.advance(10)  # the served waiter's timer is gone
        self.assertEqual(len(conn.streams), 1)


class ClosedConnectionTests(unittest.TestCase):
    def test_closed_connection_leaves_the_pool_at_once(self) -> None:
        """
        A connection that hit a protocol error (CLOSED, transport not yet gone) takes no
        more tunnels: the next one gets a new connection.
        """
        pool, connector, _ = make_pool()
        [first_tunnel] = open_many(pool, 1)
        first = connector.connect()
        self.successResultOf(first_tunnel)
        first.closed = True
        first.on_capacity(first)  # what the connection's state change does
        self.assertNotIn(first, pool.connections)
        [d] = open_many(pool, 1)
        self.assertEqual(connector.calls, 2)
        second = connector.connect()
        stream, _headers = self.successResultOf(d)
        self.assertEqual(stream[0], second.name)


class RetryAndGoawayTests(unittest.TestCase):
    def test_retryable_error_is_retried_on_another_connection(self) -> None:
        pool, connector, _ = make_pool()
        d = pool.open_tunnel("10.9.9.9:80", [])
        # The first connection takes the CONNECT, then a GOAWAY says it was never processed.
        refused = UpstreamError(503, "server sent GOAWAY", retryable=True)
        first = connector.connect(refuse_with=refused, goaway_on_refusal=True)
        self.assertNoResult(d)
        self.assertEqual(connector.calls, 2)
        second = connector.connect()
        stream, headers = self.successResultOf(d)
        self.assertEqual(stream[0], "c2")
        self.assertEqual(first.authorities, ["10.9.9.9:80"])
        self.assertEqual(second.authorities, ["10.9.9.9:80"])
        self.assertEqual(pool.stats.tunnels_retried, 1)

    def test_retryable_error_on_a_connection_with_room_retries_there(self) -> None:
        pool, connector, _ = make_pool()
        d = pool.open_tunnel("a:1", [])
        conn = connector.connect(refuse_with=UpstreamError(503, "refused", retryable=True))
        self.successResultOf(d)
        self.assertEqual(conn.authorities, ["a:1", "a:1"])
        self.assertEqual(connector.calls, 1)

    def test_retries_are_bounded(self) -> None:
        pool, connector, _ = make_pool(max_attempts=2)
        d = pool.open_tunnel("a:1", [])
        connector.connect(refuse_with=UpstreamError(503, "one", retryable=True),
                          goaway_on_refusal=True)
        connector.connect(refuse_with=UpstreamError(503, "two", retryable=True),
                          goaway_on_refusal=True)
        failure = self.failureResultOf(d, UpstreamError)
        self.assertEqual(failure.value.reason, "two")
        self.assertEqual(connector.calls, 2)

    def test_non_retryable_error_is_not_retried(self) -> None:
        pool, connector, _ = make_pool()
        d = pool.open_tunnel("a:1", [])
        conn = connector.connect(refuse_with=UpstreamError(403, "forbidden"))
        failure = self.failureResultOf(d, UpstreamError)
        self.assertEqual(failure.value.status, 403)
        self.assertEqual(conn.authorities, ["a:1"])
        self.assertEqual(pool.stats.tunnels_retried, 0)

    def test_goaway_connection_is_dropped(self) -> None:
        pool, connector, _ = make_pool()
        open_many(pool, 1)
        conn = connector.connect()
        conn.goaway_received = True
        conn.on_capacity(conn)
        self.assertNotIn(conn, pool.connections)
        # It still has a stream: it stays open for it.
        self.assertFalse(conn.transport.disconnecting)
        tunnel = pool.open_tunnel("a:1", [])
        self.assertEqual(connector.calls, 2)
        fresh = connector.connect()
        stream, _ = self.successResultOf(tunnel)
        self.assertEqual(stream[0], fresh.name)

    def test_goaway_connection_without_streams_is_closed(self) -> None:
        pool, connector, _ = make_pool()
        open_many(pool, 1)
        conn = connector.connect()
        conn.streams.clear()
        conn.goaway_received = True
        conn.on_capacity(conn)
        self.assertNotIn(conn, pool.connections)
        self.assertTrue(conn.transport.disconnecting)

    def test_lost_connection_is_dropped(self) -> None:
        pool, connector, _ = make_pool()
        open_many(pool, 1)
        conn = connector.connect()
        conn.on_lost(conn)
        self.assertEqual(pool.connections, [])
        pool.open_tunnel("a:1", [])
        self.assertEqual(connector.calls, 2)


class IdleTests(unittest.TestCase):
    def test_idle_connection_is_closed_after_idle_timeout(self) -> None:
        pool, connector, clock = make_pool(idle_timeout=30)
        open_many(pool, 1)
        conn = connector.connect()
        clock.advance(60)
        self.assertIn(conn, pool.connections)  # a stream is open: not idle
        conn.close_stream(1)
        clock.advance(29)
        self.assertFalse(conn.transport.disconnecting)
        clock.advance(1)
        self.assertNotIn(conn, pool.connections)
        self.assertTrue(conn.goaway_sent)
        self.assertTrue(conn.transport.disconnecting)

    def test_new_tunnel_postpones_idle_close(self) -> None:
        pool, connector, clock = make_pool(idle_timeout=30)
        open_many(pool, 1)
        conn = connector.connect()
        conn.close_stream(1)
        clock.advance(20)
        self.successResultOf(pool.open_tunnel("a:1", []))
        conn.close_stream(3)
        clock.advance(20)  # 40s since the first stream closed, 20s since the second
        self.assertIn(conn, pool.connections)
        self.assertFalse(conn.transport.disconnecting)
        clock.advance(10)
        self.assertTrue(conn.transport.disconnecting)

    def test_dropped_connection_has_no_idle_timer(self) -> None:
        pool, connector, clock = make_pool(idle_timeout=30)
        open_many(pool, 1)
        conn = connector.connect()
        conn.close_stream(1)
        conn.on_lost(conn)
        self.assertEqual(clock.getDelayedCalls(), [])


class ConnectFailureTests(unittest.TestCase):
    def test_connect_failure_fails_waiters_with_503(self) -> None:
        pool, connector, _ = make_pool()
        tunnels = open_many(pool, 3)
        connector.fail(ConnectionRefusedError())
        for d in tunnels:
            failure = self.failureResultOf(d, UpstreamError)
            self.assertEqual(failure.value.status, 503)
            self.assertIn(KEY.address, failure.value.reason)
        self.assertEqual(pool.stats.connections_failed, 1)

    def test_upstream_error_from_connector_is_kept(self) -> None:
        pool, connector, _ = make_pool()
        d = pool.open_tunnel("a:1", [])
        connector.fail(UpstreamError(503, "TLS handshake with server failed: bad identity"))
        failure = self.failureResultOf(d, UpstreamError)
        self.assertIn("bad identity", failure.value.reason)

    def test_failure_keeps_waiters_that_another_attempt_can_take(self) -> None:
        pool, connector, _ = make_pool(max_streams=100)
        tunnels = open_many(pool, 150)
        connector.fail(ConnectionRefusedError())
        # One connection attempt is still in flight: it can take 100 of the 150.
        self.assertEqual(sum(d.called for d in tunnels), 50)
        connector.connect()
        for d in tunnels[:100]:
            self.successResultOf(d)
        for d in tunnels[100:]:
            self.failureResultOf(d, UpstreamError)

    def test_next_tunnel_after_failure_reconnects(self) -> None:
        pool, connector, _ = make_pool()
        self.failureResultOf(self._failed_tunnel(pool, connector), UpstreamError)
        d = pool.open_tunnel("a:1", [])
        self.assertEqual(connector.calls, 2)
        connector.connect()
        self.successResultOf(d)

    def _failed_tunnel(self, pool: H2Pool, connector: FakeConnector) -> defer.Deferred[Any]:
        d = pool.open_tunnel("a:1", [])
        connector.fail(ConnectionRefusedError())
        return d

    def test_too_many_waiters(self) -> None:
        pool, connector, _ = make_pool(max_pending=2)
        first, second, third = open_many(pool, 3)
        failure = self.failureResultOf(third, UpstreamError)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(pool.stats.pending_overflow, 1)  # Envoy's upstream_rq_pending_overflow
        self.assertNoResult(first)
        self.assertNoResult(second)

    def test_cancelled_waiter_is_forgotten(self) -> None:
        pool, connector, _ = make_pool()
        d = pool.open_tunnel("a:1", [])
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        conn = connector.connect()
        self.assertEqual(conn.streams, {})


class CloseTests(unittest.TestCase):
    def test_close_fails_waiters_and_goaways_connections(self) -> None:
        pool, connector, _ = make_pool()
        open_many(pool, 1)
        busy = connector.connect()
        pool.close()
        self.assertTrue(busy.goaway_sent)
        self.assertFalse(busy.transport.disconnecting)  # its tunnel finishes on its own
        self.assertEqual(pool.connections, [])
        failure = self.failureResultOf(pool.open_tunnel("a:1", []), UpstreamError)
        self.assertEqual(failure.value.reason, "pool closed")

    def test_connection_completing_after_close_is_closed(self) -> None:
        pool, connector, _ = make_pool()
        d = pool.open_tunnel("a:1", [])
        pool.close()
        self.failureResultOf(d, UpstreamError)
        late = connector.connect()
        self.assertTrue(late.goaway_sent)
        self.assertTrue(late.transport.disconnecting)
        self.assertEqual(pool.connections, [])


class RealConnectionTests(unittest.TestCase):
    """The pool over real H2TunnelClients, each connected in memory to an H2TunnelServer."""

    def test_server_stream_limit_with_real_connections(self) -> None:
        from hbonex.h2.settings import H2Settings
        from tests.test_h2stream import H2Pair

        pairs: list[H2Pair] = []

        def connector() -> defer.Deferred[Any]:
            pair = H2Pair(server_settings=H2Settings(max_concurrent_streams=6))
            pairs.append(pair)
            return pair.client.ready  # fired: the SETTINGS exchange is done

        pool = H2Pool(KEY, connector, Clock(), max_streams=100)
        tunnels = open_many(pool, 10)
        self.assertEqual(len(pairs), 2)
        for pair in pairs:
            pair.pump()
            self.assertLessEqual(len(pair.server.streams), 6)
            while pair.cluster.pending:
                pair.cluster.pending.pop(0).connect()
            pair.pump()
        streams = [self.successResultOf(d)[0] for d in tunnels]
        self.assertEqual(len({s.stream_id for s in streams if s.connection is pairs[0].client}),
                         6)
        self.assertEqual(sum(s.connection is pairs[1].client for s in streams), 4)
        self.assertEqual(pool.stats.tunnels_retried, 0)


class DrainedConnectionRetryTests(unittest.TestCase):
    """
    A stream the server never processed because it drained the connection after serving
    others (GOAWAY, e.g. max requests per connection) is retried without costing an attempt.
    """

    def setUp(self) -> None:
        self.addCleanup(lambda: vars(FakeConnection).get("last_stream_id_allowed") is None
                        or delattr(FakeConnection, "last_stream_id_allowed"))

    def refuse(self, connector: FakeConnector, last_stream_id: int) -> FakeConnection:
        # The GOAWAY's last stream id, as H2TunnelClient records it (set on the class: the fake
        # connection refuses as soon as it is connected).
        FakeConnection.last_stream_id_allowed = last_stream_id  # type: ignore[attr-defined]
        return connector.connect(
            refuse_with=UpstreamError(503, "server sent GOAWAY", retryable=True,
                                      unprocessed=True),
            goaway_on_refusal=True,
        )

    def test_drained_refusals_do_not_count_as_attempts(self) -> None:
        pool, connector, _ = make_pool(max_attempts=2)
        d = pool.open_tunnel("a:1", [])
        for _ in range(3):
            self.refuse(connector, last_stream_id=5)
            self.assertNoResult(d)
        connector.connect()
        stream, _headers = self.successResultOf(d)
        self.assertEqual(stream[0], "c4")
        self.assertEqual(pool.stats.tunnels_retried, 3)

    def test_goaway_without_progress_counts(self) -> None:
        pool, connector, _ = make_pool(max_attempts=2)
        d = pool.open_tunnel("a:1", [])
        self.refuse(connector, last_stream_id=0)
        self.refuse(connector, last_stream_id=0)
        failure = self.failureResultOf(d, UpstreamError)
        self.assertTrue(failure.value.unprocessed)
        self.assertEqual(connector.calls, 2)
