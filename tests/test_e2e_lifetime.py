"""
Connection lifetime and resets, end to end: real ``twistd`` processes, real TLS, and small
misbehaving HTTP/2 peers (tests/peers.py).  Socket leaks are counted in the processes' own
socket tables (tests.support.sockets_of).
"""

from __future__ import annotations

import re
from typing import Any

import h2.errors
import h2.events
import h2.settings
from twisted.internet import error as ierror

from tests.peers import (
    ZERO_WINDOW_UPDATE,
    H2Peer,
    H2PeerConnection,
    start_black_hole,
    start_h2_peer,
    start_recorder,
    start_silent,
)
from tests.support import (
    TUNNEL_CLOSED_RE,
    RawH2Client,
    RawTLSClient,
    StreamClient,
    TwistdProcess,
    connect_tcp,
    connect_tls,
    connections_to,
    e2e,
    exchange,
    gather,
    pseudorandom,
    response_status,
    start_echo,
    wait_until,
)
from tests.test_e2e_tunnel import E2ETestCase

ErrorCodes = h2.errors.ErrorCodes


def pid_of(proc: TwistdProcess) -> int:
    return proc.transport.pid  # type: ignore[union-attr,no-any-return]


def is_reset(c: StreamClient) -> bool:
    """The connection ended with an error (a TCP reset), not a FIN."""
    return c.reason is not None and not c.closed_cleanly


def lift_stream_limit(h2c: RawH2Client) -> None:
    """Let the raw client open streams beyond the server's MAX_CONCURRENT_STREAMS."""
    settings = h2c.conn.remote_settings
    settings.acknowledge()
    settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
    settings.acknowledge()


class RawClientMixin(E2ETestCase):
    async def raw_client(self, server: TwistdProcess) -> RawH2Client:
        creator = RawTLSClient(
            self.pki.ca, self.pki.cert("client"), self.pki.key("client"), alpn=(b"h2",)
        )
        h2c = RawH2Client()
        await connect_tls(server.port, creator, h2c)
        self.addCleanup(h2c.close)
        await h2c.ready
        return h2c

    def connect(self, h2c: RawH2Client, port: int) -> int:
        return h2c.request(
            [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{port}".encode())]
        )

    def peer_client(self, peer: H2Peer, target: str, *args: str) -> Any:
        """An hbone-client forwarding one port to ``target`` through ``peer``."""
        return self.start_client_to(peer.port, target, *args)

    def start_client_to(self, port: int, target: str, *args: str) -> Any:
        from tests.support import start_twistd

        return start_twistd(
            self, "hbone-client",
            [f"--forward=127.0.0.1:0={target}", "--server", f"127.0.0.1:{port}",
             *self.pki.args("client"), *args],
            name="hbone-client",
        )


class ClosingTests(RawClientMixin):
    """Bug 1: close() must close a TLS connection (the producer used to keep it open)."""

    @e2e
    async def test_idle_pooled_connections_really_close(self) -> None:
        echo, server = await gather([start_echo(self), self.start_server()])
        client = await self.start_client(server, [echo.port], "--pool-idle-timeout", "0.3")
        for i in range(3):
            payload = pseudorandom(10_000 + i, seed=i)
            c = await exchange(self.forward_port(client), payload)
            self.assert_echoed(c, payload, server, client)
            await client.wait_for_count(r"closing idle HBONE connection", i + 1)
            # Both processes drop the socket: no ESTABLISHED leftover per idle cycle.
            await wait_until(
                lambda: connections_to(pid_of(client), server.port) == 0,
                lambda: f"the client's sockets to the server to close "
                        f"({connections_to(pid_of(client), server.port)} open)",
                timeout=5,
            )
        self.assertEqual(connections_to(pid_of(client), server.port,
                                        ("ESTABLISHED", "CLOSE_WAIT")), 0)

    @e2e
    async def test_one_request_per_connection_leaves_no_sockets(self) -> None:
        echo, server = await gather([
            start_echo(self), self.start_server("--max-requests-per-connection", "1"),
        ])
        client = await self.start_client(server, [echo.port])
        for i in range(3):
            payload = pseudorandom(5000, seed=10 + i)
            c = await exchange(self.forward_port(client), payload)
            self.assert_echoed(c, payload, server, client)
        await wait_until(
            lambda: connections_to(pid_of(client), server.port) == 0,
            lambda: f"no sockets left; {connections_to(pid_of(client), server.port)} open",
            timeout=5,
        )
        lines = await self.closed_tunnels(server, 3)
        self.assertEqual(len({m["peer"] for m in lines}), 3)

    @e2e
    async def test_stop_with_idle_connections_does_not_wait_for_the_drain_deadline(
        self,
    ) -> None:
        """
        SIGTERM with only idle connections: GOAWAY, the connections close, the server
        exits, long before its 30 s drain deadline (it used to wait it out and abort).
        """
        echo, server = await gather([
            start_echo(self), self.start_server("--drain-timeout", "30"),
        ])
        client = await self.start_client(server, [echo.port])
        payload = b"before the stop"
        c = await exchange(self.forward_port(client), payload)
        self.assert_echoed(c, payload, server, client)
        self.assertEqual(connections_to(pid_of(client), server.port), 1)  # pooled, idle
        await server.stop(timeout=8)
        self.assertFalse(server.killed, server.output(last=30))
        # The client heard a graceful GOAWAY, by its name, and dropped the connection.
        await client.wait_for(r"GOAWAY from peer \(NO_ERROR\)")
        await wait_until(lambda: connections_to(pid_of(client), server.port) == 0,
                         "the client's socket to the stopped server to close", timeout=5)

    @e2e
    async def test_drain_deadline_names_itself(self) -> None:
        echo, server = await gather([
            start_echo(self), self.start_server("--drain-timeout", "0.5"),
        ])
        client = await self.start_client(server, [echo.port])
        c = StreamClient()
        await connect_tcp(self.forward_port(client), c)
        c.transport.write(b"open")
        await c.wait_received(4)
        await server.stop()
        m = await server.wait_for(TUNNEL_CLOSED_RE)
        self.assertIn("closed at the drain deadline", m["reason"])
        await c.done
        self.assertTrue(is_reset(c), c.reason)


class ProtocolErrorTests(RawClientMixin):
    @e2e
    async def test_protocol_error_closes_at_once_and_keepalive_stays_quiet(self) -> None:
        """
        Bug 2: after WINDOW_UPDATE(0) the server sends GOAWAY(PROTOCOL_ERROR) and closes the
        connection; its keepalive does not fire into the closed h2 state machine.
        """
        echo, server = await gather([
            start_echo(self),
            self.start_server("--keepalive-interval", "1", "--keepalive-timeout", "1"),
        ])
        h2c = await self.raw_client(server)
        h2c.transport.write(ZERO_WINDOW_UPDATE)
        event = await h2c.wait_event(
            lambda e: isinstance(e, h2.events.ConnectionTerminated), "GOAWAY"
        )
        self.assertEqual(event.error_code, ErrorCodes.PROTOCOL_ERROR)
        reason = await h2c.done
        self.assertIsInstance(reason, ierror.ConnectionDone)  # closed by the server, cleanly
        # Another connection idles until the server's keepalive PINGs it: by then the first
        # connection's keepalive timer would have fired too.
        other = await self.raw_client(server)
        await other.wait_event(lambda e: isinstance(e, h2.events.PingReceived),
                               "a keepalive PING", timeout=5)
        self.assertEqual(server.crashes(), [])
        self.assertEqual(server.matches(r"SEND_PING"), [])
        self.assertEqual(connections_to(pid_of(server), 0), 0)

    @e2e
    async def test_bad_frame_from_server_fails_that_connection_only(self) -> None:
        """
        Bug 3: the server answers the first CONNECT, then sends a bad frame.  That tunnel is
        reset; the pool drops the connection at once and the next tunnel gets a new one.
        """
        def bad_once_tunnelling(conn: H2PeerConnection, stream_id: int, data: bytes) -> None:
            # After the tunnel carried bytes (so it was surely up at the client).
            if conn.index == 0:
                conn.write_raw(ZERO_WINDOW_UPDATE)

        peer = start_h2_peer(self, self.pki, H2Peer())
        peer.on_data = bad_once_tunnelling
        client = await self.start_client_to(peer.port, "127.0.0.1:9")
        port = self.forward_port(client)
        c = StreamClient()
        await connect_tcp(port, c)
        c.transport.write(b"hello")
        await c.done
        self.assertTrue(is_reset(c), f"first tunnel ended with {c.reason}")
        await client.wait_for(r"HTTP/2 protocol error from peer")
        await peer.connections[0].closed
        payload = pseudorandom(50_000, seed=3)
        c2 = await exchange(port, payload)
        self.assert_echoed(c2, payload, client)
        self.assertEqual(len(peer.connections), 2)
        self.assertNotRegex(client.output(), r"state ConnectionState\.CLOSED")

    @e2e
    async def test_late_upstream_connect_after_a_connection_error(self) -> None:
        """
        Bug 7: a protocol error while the server still connects upstream: the connect is
        given up (no SYN_SENT left) and nothing is sent on the closed connection.
        """
        hole = start_black_hole(self)
        server = await self.start_server("--connect-timeout", "30",
                                         "--allow-target", "127.0.0.1/32")
        h2c = await self.raw_client(server)
        self.connect(h2c, hole.port)
        await wait_until(
            lambda: connections_to(pid_of(server), hole.port, ("SYN_SENT",)) == 1,
            "the server's upstream connect to start", timeout=5,
        )
        h2c.transport.write(ZERO_WINDOW_UPDATE)
        await h2c.done
        await wait_until(
            lambda: connections_to(pid_of(server), hole.port, ("SYN_SENT",)) == 0,
            "the upstream connect to be given up", timeout=5,
        )
        self.assertEqual(server.crashes(), [])


class TruncationTests(RawClientMixin):
    """Bug 4: a connection that ends (close_notify included) under an open stream."""

    @e2e
    async def test_close_notify_mid_stream_resets_the_target(self) -> None:
        target = start_recorder(self)
        server = await self.start_server()
        h2c = await self.raw_client(server)
        sid = self.connect(h2c, target.port)
        self.assertEqual(response_status(await h2c.wait_answer(sid)), 200)
        h2c.send(sid, b"x" * 5000)  # no END_STREAM
        await wait_until(lambda: bool(target.connections) and
                         len(target.connections[0].data) == 5000, "5000 bytes at the target")
        h2c.transport.loseConnection()  # TLS close_notify, then FIN
        conn, reason = await target.wait_ended()
        self.assertEqual(bytes(conn.data), b"x" * 5000)
        self.assertFalse(conn.fin, "the target got a clean FIN for a truncated stream")
        self.assertTrue(reason.check(ierror.ConnectionLost), reason)
        m = await server.wait_for(TUNNEL_CLOSED_RE)
        self.assertNotEqual(m["reason"], "closed cleanly")
        self.assertIn("lost before the stream ended", m["reason"])

    @e2e
    async def test_goaway_and_close_notify_mid_stream_resets_the_app(self) -> None:
        def answer_then_leave(conn: H2PeerConnection, stream_id: int) -> None:
            conn.answer(stream_id)
            conn.conn.send_data(stream_id, b"y" * 5000)
            conn.conn.close_connection(last_stream_id=stream_id)
            conn.flush()
            conn.transport.loseConnection()  # type: ignore[union-attr]

        peer = start_h2_peer(self, self.pki, H2Peer(answer_then_leave))
        client = await self.start_client_to(peer.port, "127.0.0.1:9")
        c = StreamClient()
        await connect_tcp(self.forward_port(client), c)
        c.transport.write(b"hello")
        await c.done
        self.assertEqual(c.data, b"y" * 5000)
        self.assertFalse(c.eof, "a truncated stream reached the app as EOF")
        self.assertTrue(is_reset(c), c.reason)


class StreamLimitTests(RawClientMixin):
    @e2e
    async def test_stream_over_the_limit_is_refused_alone(self) -> None:
        """
        Bug 5: a CONNECT beyond MAX_CONCURRENT_STREAMS gets RST_STREAM(REFUSED_STREAM); the
        connection and its two tunnels go on.
        """
        echo, server = await gather([
            start_echo(self), self.start_server("--max-concurrent-streams", "2"),
        ])
        h2c = await self.raw_client(server)
        lift_stream_limit(h2c)
        sids = [self.connect(h2c, echo.port) for _ in range(2)]
        for sid in sids:
            self.assertEqual(response_status(await h2c.wait_answer(sid)), 200)
        extra = self.connect(h2c, echo.port)
        event = await h2c.wait_answer(extra)
        self.assertIsInstance(event, h2.events.StreamReset)
        self.assertEqual(event.error_code, ErrorCodes.REFUSED_STREAM)
        for i, sid in enumerate(sids):
            payload = pseudorandom(20_000, seed=40 + i)
            h2c.send(sid, payload, end_stream=True)
            await h2c.wait_event(
                lambda e, sid=sid: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid,
                f"the echo's END_STREAM on {sid}",
            )
            self.assertEqual(h2c.body(sid), payload)
        self.assertFalse(any(isinstance(e, h2.events.ConnectionTerminated) for e in h2c.events))

    @e2e
    async def test_refused_connects_do_not_count_against_the_limit(self) -> None:
        """
        Two 403s and one good CONNECT at a limit of 2: the refusals are closed with
        RST_STREAM(NO_ERROR) after their response, so the third stream is served.
        """
        echo, server = await gather([
            start_echo(self), self.start_server("--max-concurrent-streams", "2"),
        ])
        h2c = await self.raw_client(server)
        for _ in range(2):
            sid = h2c.request([(b":method", b"CONNECT"), (b":authority", b"192.0.2.1:80")])
            self.assertEqual(response_status(await h2c.wait_answer(sid)), 403)
            reset = await h2c.wait_event(
                lambda e, sid=sid: isinstance(e, h2.events.StreamReset)
                and e.stream_id == sid, "RST_STREAM after the 403",
            )
            self.assertEqual(reset.error_code, ErrorCodes.NO_ERROR)
        good = self.connect(h2c, echo.port)
        self.assertEqual(response_status(await h2c.wait_answer(good)), 200)
        h2c.send(good, b"served", end_stream=True)
        await h2c.wait_event(
            lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == good, "echo end"
        )
        self.assertEqual(h2c.body(good), b"served")

    @e2e
    async def test_end_stream_then_cancel_before_the_upstream_connects(self) -> None:
        """
        Bug 6: END_STREAM, then RST_STREAM(CANCEL), while the server still connects upstream:
        the connect is cancelled at once (it used to live on, then leak).
        """
        hole = start_black_hole(self)
        server = await self.start_server("--connect-timeout", "30")
        h2c = await self.raw_client(server)
        sid = self.connect(h2c, hole.port)
        await wait_until(
            lambda: connections_to(pid_of(server), hole.port, ("SYN_SENT",)) == 1,
            "the server's upstream connect to start", timeout=5,
        )
        h2c.send(sid, b"early", end_stream=True)
        h2c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        h2c._flush()
        await wait_until(
            lambda: connections_to(pid_of(server), hole.port, ("SYN_SENT", "ESTABLISHED"))
            == 0, "the upstream connect to be cancelled", timeout=5,
        )
        # The connection itself is fine.
        echo = await start_echo(self)
        good = self.connect(h2c, echo.port)
        self.assertEqual(response_status(await h2c.wait_answer(good)), 200)
        self.assertEqual(server.crashes(), [], server.output())


class PoolFailureTests(RawClientMixin):
    @e2e
    async def test_readiness_timeout_closes_the_connection(self) -> None:
        """
        Bug 8: a server that accepts TCP and never answers: each tunnel fails with 503 after
        --connect-timeout, and the half-made connections are closed, not left ESTABLISHED.
        """
        silent = start_silent(self)
        client = await self.start_client_to(silent.port, "127.0.0.1:9", "--connect-timeout", "1")
        clients = [StreamClient() for _ in range(3)]
        await gather([connect_tcp(self.forward_port(client), c) for c in clients])
        await gather([c.done for c in clients])
        await client.wait_for_count(r"failed: 503 .*not ready within 1s|failed: 503", 3)
        await wait_until(lambda: not silent.open,
                         lambda: f"{len(silent.open)} connections still open at the silent "
                                 f"server", timeout=5)
        self.assertGreaterEqual(silent.accepted, 1)
        self.assertEqual(connections_to(pid_of(client), silent.port), 0)

    @e2e
    async def test_peer_allowing_no_streams_gets_one_connection(self) -> None:
        """
        Bug 9: MAX_CONCURRENT_STREAMS 0: one connection, the tunnel waits for room and then
        fails with 503 (it used to open dozens of connections a second).
        """
        peer = start_h2_peer(self, self.pki, H2Peer(max_concurrent_streams=0))
        client = await self.start_client_to(peer.port, "127.0.0.1:9", "--connect-timeout", "1")
        c = StreamClient()
        await connect_tcp(self.forward_port(client), c)
        await c.done
        m = await client.wait_for(r"failed: 503 (?P<why>.*); closing")
        self.assertIn("no free stream", m["why"])
        self.assertIn("allows 0 concurrent streams", m["why"])
        self.assertEqual(len(peer.connections), 1)


class ConnectErrorTests(RawClientMixin):
    """Bug 10: TCP resets and CONNECT_ERROR map onto each other (RFC 9113 §8.5)."""

    @e2e
    async def test_upstream_reset_is_connect_error(self) -> None:
        target = start_recorder(self, reset_after=3)
        server = await self.start_server()
        h2c = await self.raw_client(server)
        sid = self.connect(h2c, target.port)
        self.assertEqual(response_status(await h2c.wait_answer(sid)), 200)
        h2c.send(sid, b"abc")
        event = await h2c.wait_event(
            lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == sid, "a reset"
        )
        self.assertEqual(event.error_code, ErrorCodes.CONNECT_ERROR)

    @e2e
    async def test_connect_error_resets_the_target(self) -> None:
        target = start_recorder(self)
        server = await self.start_server()
        h2c = await self.raw_client(server)
        sid = self.connect(h2c, target.port)
        self.assertEqual(response_status(await h2c.wait_answer(sid)), 200)
        h2c.send(sid, b"abc")
        await wait_until(lambda: bool(target.connections) and
                         bytes(target.connections[0].data) == b"abc", "3 bytes at the target")
        h2c.conn.reset_stream(sid, ErrorCodes.CONNECT_ERROR)
        h2c._flush()
        conn, reason = await target.wait_ended()
        self.assertTrue(conn.was_reset, f"target saw {reason} (FIN: {conn.fin})")

    @e2e
    async def test_target_reset_reaches_the_app_as_a_reset(self) -> None:
        target = start_recorder(self, reset_after=5)
        server = await self.start_server()
        client = await self.start_client(server, [target.port])
        c = StreamClient()
        await connect_tcp(self.forward_port(client), c)
        c.transport.write(b"hello")
        await c.done
        self.assertFalse(c.eof)
        self.assertTrue(is_reset(c), c.reason)
        m = await server.wait_for(TUNNEL_CLOSED_RE)
        self.assertRegex(m["reason"], re.compile("upstream: .*", re.I))


class DrainTests(RawClientMixin):
    """SIGTERM drains every kind of tunnel: open ones finish, then the server exits 0."""

    timeout = 60

    async def tunnel_through_sigterm(self, *client_args: str) -> None:
        echo, server = await gather([
            start_echo(self), self.start_server("--drain-timeout", "30"),
        ])
        client = await self.start_client(server, [echo.port], *client_args)
        payload = pseudorandom(64 * 1024 * 1024, seed=64)
        c = StreamClient(keep=False)
        await connect_tcp(self.forward_port(client), c)
        c.send(payload).addCallback(lambda ok: c.close_write() if ok else None)
        await c.wait_received(1024 * 1024)  # the tunnel is up and carrying bytes
        server.signal("TERM")
        await server.wait_for(r"Received SIGTERM")
        await c.done
        self.assert_echoed(c, payload, server, client)
        reason = await server.wait_exit()
        self.assertIsInstance(reason, ierror.ProcessDone, server.output(last=20))
        self.assertFalse(server.killed)

    @e2e
    async def test_http2_tunnel_finishes_through_sigterm(self) -> None:
        await self.tunnel_through_sigterm()

    @e2e
    async def test_http11_tunnel_finishes_through_sigterm(self) -> None:
        await self.tunnel_through_sigterm("--http1")
