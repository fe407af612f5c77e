"""
End-to-end tests: real ``twistd hbone-client`` / ``twistd hbone-server`` processes, real
certificates made with hbonex.tls.pki, real loopback sockets (127.0.0.1 only).

    downstream (this process) -> hbone-client -> HBONE (mTLS, HTTP/2 or HTTP/1.1 CONNECT)
        -> hbone-server -> target (this process: echo / sink / source)
"""

from __future__ import annotations

import re
from typing import Any

import h2.errors
import h2.events
from twisted.internet import defer
from twisted.trial import unittest

from tests.support import (
    IMPOSTOR_ID,
    SERVER_ID,
    TUNNEL_CLOSED_RE,
    TUNNEL_REFUSED_RE,
    RawH2Client,
    RawTLSClient,
    StreamClient,
    Target,
    TwistdProcess,
    connect_tcp,
    connect_tls,
    e2e,
    exchange,
    gather,
    make_pki,
    port_of,
    pseudorandom,
    response_status,
    sha256,
    start_echo,
    start_sink,
    start_source,
    start_twistd,
    unused_port,
)

MiB = 1024 * 1024


def client_failed_re(target: str, status: int) -> str:
    """The hbone-client's warning for a tunnel to ``target`` that failed with ``status``."""
    return (
        rf"tunnel for \S+ to {re.escape(target)} via cluster hbone failed: {status} "
        r"(?P<why>.*); closing the downstream connection"
    )




class E2ETestCase(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pki = make_pki(self)

    def start_server(self, *args: str, identity: str = "server") -> defer.Deferred[Any]:
        return start_twistd(
            self,
            "hbone-server",
            ["--listen", "127.0.0.1:0", *self.pki.args(identity), "--drain-timeout", "2",
             *args],
            name="hbone-server",
        )

    def start_client(
        self,
        server: TwistdProcess,
        targets: list[int],
        *args: str,
        identity: str = "client",
        other_ca: bool = False,
        backlog: int | None = None,
    ) -> defer.Deferred[Any]:
        """
        hbone-client with one ``--forward`` per target port; ``backlog``: listen with an
        endpoint string with that backlog instead of ``127.0.0.1:0``.
        """
        listen = "127.0.0.1:0"
        if backlog is not None:
            listen = f"tcp:0:interface=127.0.0.1:backlog={backlog}"
        forwards = [f"--forward={listen}=127.0.0.1:{port}" for port in targets]
        return start_twistd(
            self,
            "hbone-client",
            [*forwards, "--server", f"127.0.0.1:{server.port}",
             *self.pki.args(identity, other_ca), *args],
            listeners=len(targets),
            name="hbone-client",
        )

    def forward_port(self, client: TwistdProcess, index: int = 0) -> int:
        return client.ports[f"forward_{index}"]

    def assert_echoed(
        self, c: StreamClient, payload: bytes, *procs: TwistdProcess
    ) -> None:
        if c.nbytes != len(payload):
            self.fail(
                f"{c.nbytes} bytes echoed of {len(payload)} ({c.reason}); "
                + "\n".join(f"{p.name}:\n{p.output(last=40)}" for p in procs)
            )
        self.assertEqual(c.hexdigest, sha256(payload))
        self.assertTrue(c.eof, "no EOF after the echo")
        self.assertTrue(c.closed_cleanly, f"connection ended with {c.reason}")

    async def closed_tunnels(self, server: TwistdProcess, count: int) -> list[Any]:
        """The server's first ``count`` tunnel-closed lines, waiting for them."""
        return await server.wait_for_count(TUNNEL_CLOSED_RE, count)

    def assert_no_client_failures(self, client: TwistdProcess) -> None:
        failures = client.matches(r"tunnel for .* failed")
        self.assertEqual(failures, [], client.output(last=100))


class TunnelDataTests(E2ETestCase):
    @e2e
    async def test_64mib_each_way(self) -> None:
        """
        64 MiB up and 64 MiB back through client -> server -> echo, hashed at both ends.
        """
        echo, server = await gather([start_echo(self), self.start_server()])
        client = await self.start_client(server, [echo.port])
        payload = pseudorandom(64 * MiB, seed=64)
        c = StreamClient(keep=False, chunk=256 * 1024)
        await connect_tcp(self.forward_port(client), c)
        sent = await c.send(payload)
        self.assertTrue(sent)
        c.close_write()
        await c.done
        self.assertEqual(c.sent, 64 * MiB)
        self.assert_echoed(c, payload, server, client)
        [line] = await self.closed_tunnels(server, 1)
        self.assertEqual((int(line["up"]), int(line["down"])), (64 * MiB, 64 * MiB))
        self.assertEqual(line["target"], f"127.0.0.1:{echo.port}")
        self.assertEqual(line["identity"], "spiffe://cluster.local/ns/default/sa/client")
        self.assertEqual(line["reason"], "closed cleanly")

    @e2e
    async def test_200_concurrent_tunnels_one_connection(self) -> None:
        """
        200 concurrent tunnels with distinct payloads all ride one HTTP/2 connection.
        """
        echo, server = await gather([start_echo(self), self.start_server()])
        # Twisted's default listen backlog (50) overflows when 200 connections arrive at
        # once, and the kernel may reset overflowed connections: give the forward a bigger one.
        client = await self.start_client(
            server, [echo.port], "--max-streams", "1000", backlog=1024
        )
        payloads = [pseudorandom(64 * 1024, seed=1000 + i) for i in range(200)]
        port = self.forward_port(client)
        results = await gather([exchange(port, p) for p in payloads])
        for c, payload in zip(results, payloads, strict=True):
            self.assert_echoed(c, payload, server, client)
        lines = await self.closed_tunnels(server, 200)
        self.assertEqual(len(server.matches(TUNNEL_CLOSED_RE)), 200)
        self.assertEqual({(int(m["up"]), int(m["down"])) for m in lines}, {(65536, 65536)})
        source_ports = {port_of(m["peer"]) for m in lines}
        self.assertEqual(len(source_ports), 1, f"tunnels came over {source_ports}")
        self.assertEqual(echo.connections_made, 200)
        self.assert_no_client_failures(client)

    @e2e
    async def test_half_close(self) -> None:
        """
        The client sends, shuts down writing, and still gets the reply the target sends after
        EOF (the SHA-256 of what it received).
        """
        sink, server = await gather([start_sink(self), self.start_server()])
        client = await self.start_client(server, [sink.port])
        payload = pseudorandom(3 * MiB + 17, seed=3)
        c = await exchange(self.forward_port(client), payload)
        self.assertEqual(c.data, sha256(payload).encode("ascii"))
        self.assertTrue(c.eof)
        self.assertTrue(c.closed_cleanly, str(c.reason))
        self.assertEqual(sink.records, [(len(payload), sha256(payload))])
        [line] = await self.closed_tunnels(server, 1)
        self.assertEqual((int(line["up"]), int(line["down"])), (len(payload), 64))

    @e2e
    async def test_reverse_half_close(self) -> None:
        """
        Targets that send and then close (fully, or only their write side): the client gets
        every byte and then EOF while its own write side is still open; after a half-closing
        target's EOF the client can still send, and the target gets those bytes.
        """
        closing, half, server = await gather([
            start_source(self, 2 * MiB + 5, seed=7),
            start_source(self, 1 * MiB + 3, seed=8, half_close=True),
            self.start_server(),
        ])
        client = await self.start_client(server, [closing.port, half.port])

        # 1. The target closes: all bytes, then EOF; our side is still open at that point.
        states: list[tuple[int, bool, bool]] = []

        def at_eof(c: StreamClient) -> None:
            states.append((c.nbytes, c.reason is None, c.write_closed))
            c.close_write()

        c1 = StreamClient()
        c1.on_eof = at_eof
        await connect_tcp(self.forward_port(client, 0), c1)
        await c1.done
        self.assertEqual(states, [(len(closing.payload), True, False)])
        self.assertEqual(c1.hexdigest, sha256(closing.payload))
        self.assertTrue(c1.closed_cleanly, str(c1.reason))

        # 2. The target half-closes: after its EOF we send a reply, then EOF.
        reply = pseudorandom(300 * 1024 + 1, seed=9)

        def reply_at_eof(c: StreamClient) -> None:
            states.append((c.nbytes, c.reason is None, c.write_closed))
            c.send(reply).addCallback(lambda ok: c.close_write() if ok else None)

        c2 = StreamClient()
        c2.on_eof = reply_at_eof
        await connect_tcp(self.forward_port(client, 1), c2)
        await c2.done
        self.assertEqual(states[1], (len(half.payload), True, False))
        self.assertEqual(c2.hexdigest, sha256(half.payload))
        self.assertEqual(c2.sent, len(reply))
        self.assertTrue(c2.closed_cleanly, str(c2.reason))
        records = await half.wait_records(1)
        self.assertEqual(
            records, [{"sent": len(half.payload), "received": len(reply),
                       "sha256": sha256(reply)}]
        )
        lines = await self.closed_tunnels(server, 2)
        by_target = {m["target"]: (int(m["up"]), int(m["down"])) for m in lines}
        self.assertEqual(by_target, {
            f"127.0.0.1:{closing.port}": (0, len(closing.payload)),
            f"127.0.0.1:{half.port}": (len(reply), len(half.payload)),
        })


class RefusalTests(E2ETestCase):
    async def refused_downstream(self, port: int) -> StreamClient:
        """Connect to a forward whose tunnel will be refused: no data, just the close."""
        c = StreamClient()
        await connect_tcp(port, c)
        c.send(b"hello, is anybody there?\n")
        await c.done
        self.assertEqual(c.nbytes, 0, f"got data from a refused tunnel: {c.data!r}")
        return c

    @e2e
    async def test_upstream_refused(self) -> None:
        """Nothing listens on the target: the server answers 503, the downstream closes."""
        dead, server = await gather([unused_port(self), self.start_server()])
        client = await self.start_client(server, [dead])
        await self.refused_downstream(self.forward_port(client))
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual(m["target"], f"127.0.0.1:{dead}")
        self.assertEqual(m["status"], "503")
        self.assertIn("connection refused", m["reason"])
        await client.wait_for(client_failed_re(f"127.0.0.1:{dead}", 503))
        self.assertEqual(server.matches(TUNNEL_CLOSED_RE), [])

    @e2e
    async def test_target_outside_policy(self) -> None:
        """
        A target outside --allow-target is refused with 403 and never connected to, even
        though something listens there.
        """
        echo, server = await gather([
            start_echo(self), self.start_server("--allow-target", "127.0.0.2/32"),
        ])
        client = await self.start_client(server, [echo.port])
        await self.refused_downstream(self.forward_port(client))
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual((m["target"], m["status"]), (f"127.0.0.1:{echo.port}", "403"))
        self.assertIn("outside the allowed targets", m["reason"])
        await client.wait_for(client_failed_re(f"127.0.0.1:{echo.port}", 403))
        self.assertEqual(echo.connections_made, 0)


class MutualTLSTests(E2ETestCase):
    @e2e
    async def test_client_without_certificate(self) -> None:
        """A TLS client that presents no certificate never gets a CONNECT answered."""
        echo, server = await gather([start_echo(self), self.start_server()])
        creator = RawTLSClient(self.pki.ca, alpn=(b"http/1.1",))
        c = StreamClient()
        await connect_tls(server.port, creator, c)
        local_port = c.transport.getHost().port
        c.transport.write(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
        await c.done
        self.assertEqual(c.nbytes, 0, c.data)
        m = await server.wait_for(
            rf"TLS handshake from 127\.0\.0\.1:{local_port} failed: (?P<why>.*)"
        )
        self.assertRegex(m["why"], "peer did not return a certificate|certificate required")
        self.assertEqual(echo.connections_made, 0)
        self.assertEqual(server.matches(r"tunnel from"), [])

    @e2e
    async def test_handshake_timeout(self) -> None:
        """
        A client that connects and never starts TLS is cut at --handshake-timeout, and the log
        says so (not the abort's "lost in a non-clean fashion").
        """
        server = await self.start_server("--handshake-timeout", "0.3")
        c = StreamClient()
        await connect_tcp(server.port, c)
        local_port = c.transport.getHost().port
        await c.done
        m = await server.wait_for(
            rf"TLS handshake from 127\.0\.0\.1:{local_port} failed: (?P<why>.*)"
        )
        self.assertEqual(m["why"], "handshake timed out after 0.3 s")
        self.assertEqual(server.matches("non-clean"), [])
        self.assertEqual(len(server.matches("TLS handshake from")), 1, server.output())

    @e2e
    async def test_client_certificate_from_other_ca(self) -> None:
        """An hbone-client whose certificate another CA signed is refused in the handshake."""
        echo, server = await gather([start_echo(self), self.start_server()])
        client = await self.start_client(server, [echo.port], other_ca=True)
        c = await exchange(self.forward_port(client), b"let me in")
        self.assertEqual(c.nbytes, 0, c.data)
        m = await server.wait_for(r"TLS handshake from 127\.0\.0\.1:\d+ failed: (?P<why>.*)")
        self.assertRegex(m["why"], "certificate verify failed|unknown ca|issuer")
        m = await client.wait_for(client_failed_re(f"127.0.0.1:{echo.port}", 503))
        # TLS 1.3: the client finished its handshake; the server's alert ends the connection.
        self.assertIn("unknown ca", m["why"])
        self.assertEqual(echo.connections_made, 0)
        self.assertEqual(server.matches(r"tunnel from"), [])

    @e2e
    async def test_server_with_wrong_identity(self) -> None:
        """
        The client wants .../sa/server; a server presenting .../sa/impostor (same CA) is
        refused by the client and the downstream connection closes.
        """
        echo, server = await gather([start_echo(self), self.start_server(identity="impostor")])
        client = await self.start_client(server, [echo.port], "--server-identity", SERVER_ID)
        c = await exchange(self.forward_port(client), b"secret")
        self.assertEqual(c.nbytes, 0, c.data)
        m = await client.wait_for(client_failed_re(f"127.0.0.1:{echo.port}", 503))
        self.assertIn("TLS handshake with server failed", m["why"])
        self.assertIn(IMPOSTOR_ID, m["why"])
        self.assertIn("not allowed", m["why"])
        self.assertEqual(echo.connections_made, 0)
        self.assertEqual(server.matches(r"tunnel from"), [])


class MalformedRequestTests(E2ETestCase):
    async def h2_connection(self) -> tuple[RawH2Client, TwistdProcess, Target]:
        echo, server = await gather([start_echo(self), self.start_server()])
        creator = RawTLSClient(
            self.pki.ca, self.pki.cert("client"), self.pki.key("client"), alpn=(b"h2",)
        )
        h2c = RawH2Client()
        await connect_tls(server.port, creator, h2c)
        self.addCleanup(h2c.close)
        await h2c.ready
        return h2c, server, echo

    @e2e
    async def test_connect_with_path_without_protocol(self) -> None:
        """
        CONNECT with :scheme and :path but no :protocol is malformed: RST_STREAM
        PROTOCOL_ERROR on that stream only; a valid CONNECT on the same connection works.
        """
        h2c, server, echo = await self.h2_connection()
        authority = f"127.0.0.1:{echo.port}".encode()
        bad = h2c.request([
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":path", b"/"),
            (b":authority", authority),
        ])
        event = await h2c.wait_answer(bad)
        self.assertIsInstance(event, h2.events.StreamReset)
        self.assertEqual(event.error_code, h2.errors.ErrorCodes.PROTOCOL_ERROR)

        good = h2c.request([(b":method", b"CONNECT"), (b":authority", authority)])
        event = await h2c.wait_answer(good)
        self.assertEqual(response_status(event), 200)
        payload = pseudorandom(200 * 1024, seed=11)
        h2c.send(good, payload, end_stream=True)
        await h2c.wait_event(
            lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == good,
            "the echo's END_STREAM",
        )
        self.assertEqual(sha256(h2c.body(good)), sha256(payload))
        await server.wait_for(rf"malformed request on stream {bad}: .*:scheme or :path")
        [line] = await self.closed_tunnels(server, 1)
        self.assertEqual((int(line["up"]), int(line["down"])), (len(payload), len(payload)))
        self.assertEqual(echo.connections_made, 1)
        self.assertFalse(any(isinstance(e, h2.events.ConnectionTerminated) for e in h2c.events))

    @e2e
    async def test_connect_with_bad_authority(self) -> None:
        h2c, server, echo = await self.h2_connection()
        sid = h2c.request([(b":method", b"CONNECT"), (b":authority", b"not-a-host-port")])
        event = await h2c.wait_answer(sid)
        self.assertEqual(response_status(event), 400)
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual((m["target"], m["status"]), ("not-a-host-port", "400"))
        self.assertEqual(echo.connections_made, 0)

    @e2e
    async def test_get_is_not_allowed(self) -> None:
        h2c, server, echo = await self.h2_connection()
        sid = h2c.request([
            (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
            (b":authority", f"127.0.0.1:{echo.port}".encode()),
        ], end_stream=True)
        event = await h2c.wait_answer(sid)
        self.assertEqual(response_status(event), 405)
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual(m["status"], "405")
        self.assertEqual(echo.connections_made, 0)


class PoolTests(E2ETestCase):
    async def open_all_then_finish(self, port: int, count: int) -> None:
        """
        Open ``count`` tunnels, wait until every one is up (an echoed hello), then send a
        distinct payload on each, half-close and verify the echo.
        """
        clients = [StreamClient() for _ in range(count)]
        await gather([connect_tcp(port, c) for c in clients])
        hellos = [f"hello {i}\n".encode() for i in range(count)]
        for c, hello in zip(clients, hellos, strict=True):
            c.transport.write(hello)
        await gather([c.wait_received(len(h)) for c, h in zip(clients, hellos, strict=True)])
        payloads = [pseudorandom(100 * 1024 + i, seed=500 + i) for i in range(count)]
        for c, payload in zip(clients, payloads, strict=True):
            c.send(payload).addCallback(lambda ok, c=c: c.close_write() if ok else None)
        await gather([c.done for c in clients])
        for c, hello, payload in zip(clients, hellos, payloads, strict=True):
            self.assert_echoed(c, hello + payload)

    @e2e
    async def test_streams_beyond_cap_open_new_connections(self) -> None:
        """--max-streams 2 and 5 tunnels open at once: three HTTP/2 connections."""
        echo, server = await gather([start_echo(self), self.start_server()])
        client = await self.start_client(server, [echo.port], "--max-streams", "2")
        await self.open_all_then_finish(self.forward_port(client), 5)
        lines = await self.closed_tunnels(server, 5)
        ports = {port_of(m["peer"]) for m in lines}
        self.assertEqual(len(ports), 3, ports)
        self.assert_no_client_failures(client)

    @e2e
    async def test_goaway_moves_tunnels_to_new_connections(self) -> None:
        """
        The server sends GOAWAY after 3 tunnels per connection; 10 sequential and then 10
        concurrent tunnels all succeed over new connections.
        """
        echo, server = await gather([
            start_echo(self), self.start_server("--max-requests-per-connection", "3"),
        ])
        client = await self.start_client(server, [echo.port])
        port = self.forward_port(client)
        for i in range(10):
            payload = pseudorandom(32 * 1024 + i, seed=100 + i)
            c = await exchange(port, payload)
            self.assert_echoed(c, payload, server, client)
        payloads = [pseudorandom(32 * 1024 + i, seed=200 + i) for i in range(10)]
        results = await gather([exchange(port, p) for p in payloads])
        for c, payload in zip(results, payloads, strict=True):
            self.assert_echoed(c, payload, server, client)
        lines = await self.closed_tunnels(server, 20)
        ports = {port_of(m["peer"]) for m in lines}
        self.assertGreaterEqual(len(ports), 4, ports)
        self.assert_no_client_failures(client)
        self.assertEqual(server.matches(TUNNEL_REFUSED_RE), [])
        self.assertEqual(echo.connections_made, 20)

    @e2e
    async def test_small_peer_max_concurrent_streams(self) -> None:
        """
        The server allows 6 concurrent streams: 30 tunnels open at once all succeed, spread
        over at least 5 connections.
        """
        echo, server = await gather([
            start_echo(self), self.start_server("--max-concurrent-streams", "6"),
        ])
        client = await self.start_client(server, [echo.port])
        await self.open_all_then_finish(self.forward_port(client), 30)
        lines = await self.closed_tunnels(server, 30)
        ports = {port_of(m["peer"]) for m in lines}
        self.assertGreaterEqual(len(ports), 5, ports)
        self.assert_no_client_failures(client)


class HTTP11Tests(E2ETestCase):
    @e2e
    async def test_8mib_each_way(self) -> None:
        echo, server = await gather([start_echo(self), self.start_server()])
        client = await self.start_client(server, [echo.port], "--http1")
        payload = pseudorandom(8 * MiB, seed=8)
        c = StreamClient(keep=False, chunk=256 * 1024)
        await connect_tcp(self.forward_port(client), c)
        self.assertTrue(await c.send(payload))
        c.close_write()  # HTTP/1.1 tunnels half-close too (close_notify, then FIN)
        await c.done
        self.assert_echoed(c, payload, server, client)
        [line] = await self.closed_tunnels(server, 1)
        self.assertEqual((int(line["up"]), int(line["down"])), (len(payload), len(payload)))
        self.assertEqual(line["reason"], "closed cleanly")

    @e2e
    async def test_half_close_keeps_the_reply(self) -> None:
        """
        An EOF from the app ends one direction only: the target gets every byte and EOF, and
        its reply (the SHA-256 of what it got) comes back after it.
        """
        sink, server = await gather([start_sink(self), self.start_server()])
        client = await self.start_client(server, [sink.port], "--http1")
        payload = pseudorandom(2 * MiB + 1, seed=12)
        c = await exchange(self.forward_port(client), payload)
        self.assertEqual(c.data, sha256(payload).encode())
        self.assertTrue(c.closed_cleanly, str(c.reason))
        records = await sink.wait_records(1)
        self.assertEqual(records, [(len(payload), sha256(payload))])
        [line] = await self.closed_tunnels(server, 1)
        self.assertEqual((int(line["up"]), int(line["down"])), (len(payload), 64))

    @e2e
    async def test_raw_http11_connect(self) -> None:
        """
        A hand-written HTTP/1.1 CONNECT over mutual TLS: 200 and a working tunnel for an
        allowed target, 403 (and no connection) for another one.
        """
        echo, sink = await gather([start_echo(self), start_sink(self)])
        server = await self.start_server("--allow-target", f"127.0.0.1:{echo.port}")
        creator = RawTLSClient(
            self.pki.ca, self.pki.cert("client"), self.pki.key("client"), alpn=(b"http/1.1",)
        )

        c = StreamClient()
        await connect_tls(server.port, creator, c)
        c.transport.write(
            f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n"
            .encode()
        )
        await c.wait_contains(b"\r\n\r\n")
        head, _, rest = c.data.partition(b"\r\n\r\n")
        self.assertRegex(head.decode("latin-1"), r"^HTTP/1\.1 200 ")
        self.assertEqual(rest, b"")
        hello = pseudorandom(64 * 1024, seed=13)
        c.transport.write(hello)
        await c.wait_received(len(head) + 4 + len(hello))
        self.assertEqual(c.data[len(head) + 4 :], hello)
        c.transport.loseConnection()
        await c.done

        refused = StreamClient()
        await connect_tls(server.port, creator, refused)
        refused.transport.write(f"CONNECT 127.0.0.1:{sink.port} HTTP/1.1\r\n\r\n".encode())
        await refused.done
        self.assertRegex(refused.data.decode("latin-1"), r"^HTTP/1\.1 403 ")
        self.assertEqual(sink.connections_made, 0)
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual((m["target"], m["status"]), (f"127.0.0.1:{sink.port}", "403"))
        [line] = await self.closed_tunnels(server, 1)
        self.assertEqual((int(line["up"]), int(line["down"])), (len(hello), len(hello)))
