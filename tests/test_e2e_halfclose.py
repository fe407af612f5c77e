"""
HTTP/1.1 CONNECT tunnels carry half-close both ways (TLS 1.3 close_notify, plain TCP FIN,
internal listeners); a truncated transfer is never a clean end; early data: the client never
sends tunnel bytes before the 200, and the server can refuse CONNECTs that do.

Real ``twistd`` processes, real sockets on 127.0.0.1, every byte hashed at both ends.
"""

from __future__ import annotations

import re
from typing import Any

import h2.events
from twisted.internet import defer, endpoints, protocol, reactor

from hbonex.tls.fasttls import FastTLSFactory
from tests.faults_support import (
    HoldingConnectFactory,
    bootstrap,
    h1_connect_terminator,
    h1_tunnel_client_listener,
    plain_cluster,
    start_recording_echo,
    start_yaml_twistd,
    unsent_bytes,
)
from tests.peers import H2Peer, H2PeerConnection, start_h2_peer, start_recorder
from tests.support import (
    TUNNEL_CLOSED_RE,
    TUNNEL_REFUSED_RE,
    RawH2Client,
    RawTLSClient,
    StreamClient,
    connect_tcp,
    connect_tls,
    e2e,
    gather,
    pseudorandom,
    response_status,
    sha256,
    start_sink,
    start_source,
    wait_until,
)
from tests.test_e2e_lifetime import is_reset
from tests.test_e2e_tunnel import E2ETestCase

MiB = 1024 * 1024


class HalfCloseMixin(E2ETestCase):
    timeout = 60

    async def send_close_write_and_read(self, port: int, payload: bytes) -> StreamClient:
        """Send ``payload``, shut down our write side, read until the server's EOF."""
        c = StreamClient(keep=False, chunk=256 * 1024)
        await connect_tcp(port, c)
        self.assertTrue(await c.send(payload))
        c.close_write()
        await c.done
        return c

    async def check_echo_after_half_close(self, port: int, seed: int, *procs: Any) -> None:
        """
        The issue's repro: 4 MiB up, shutdown(SHUT_WR), all 4 MiB echoed back and hashed; the
        target saw a FIN, not a reset.
        """
        echo = self.echo
        payload = pseudorandom(4 * MiB, seed=seed)
        c = await self.send_close_write_and_read(port, payload)
        self.assert_echoed(c, payload, *procs)
        target = await echo.wait_ended()
        self.assertEqual((target.count, target.hash.hexdigest()), (len(payload), sha256(payload)))
        self.assertTrue(target.fin, "the target got no FIN")
        self.assertFalse(target.was_reset, f"the target saw {target.reason}")


class TLSHalfCloseTests(HalfCloseMixin):
    """hbone-client --http1 -> hbone-server over mutual TLS 1.3."""

    async def pair(self, *server_args: str) -> tuple[Any, Any]:
        self.echo = await start_recording_echo(self)
        server = await self.start_server(*server_args)
        client = await self.start_client(server, [self.echo.port], "--http1")
        return server, client

    @e2e
    async def test_echo_after_client_half_close(self) -> None:
        server, client = await self.pair()
        await self.check_echo_after_half_close(self.forward_port(client), 1, server, client)
        [line] = await self.closed_tunnels(server, 1)
        self.assertEqual((int(line["up"]), int(line["down"])), (4 * MiB, 4 * MiB))
        self.assertEqual(line["reason"], "closed cleanly")

    @e2e
    async def test_echo_after_half_close_over_tls_1_2(self) -> None:
        """The same with TLS 1.2 (close_notify then FIN, and reading on)."""
        self.echo = await start_recording_echo(self)
        server = await self.start_server("--tls-min", "1.2")
        client = await self.start_client(server, [self.echo.port], "--http1", "--tls-min", "1.2")
        await self.check_echo_after_half_close(self.forward_port(client), 2, server, client)

    @e2e
    async def test_target_half_closes_first(self) -> None:
        """
        The target sends 3 MiB and shuts down its write side, then reads: the app gets all 3
        MiB and EOF, and its reply sent after that EOF reaches the target.
        """
        source, server = await gather([
            start_source(self, 3 * MiB + 5, seed=3, half_close=True), self.start_server(),
        ])
        client = await self.start_client(server, [source.port], "--http1")
        c = StreamClient(keep=False)
        eof: defer.Deferred[StreamClient] = defer.Deferred()
        c.on_eof = eof.callback
        await connect_tcp(self.forward_port(client), c)
        await eof
        self.assertEqual((c.nbytes, c.hexdigest), (len(source.payload), sha256(source.payload)))
        reply = pseudorandom(1 * MiB + 7, seed=4)
        self.assertTrue(await c.send(reply))
        c.close_write()
        await c.done
        self.assertTrue(c.closed_cleanly, str(c.reason))
        [record] = await source.wait_records(1)
        self.assertEqual(record, {"sent": len(source.payload), "received": len(reply),
                                  "sha256": sha256(reply)})

    @e2e
    async def test_sink_answers_after_half_close(self) -> None:
        sink, server = await gather([start_sink(self), self.start_server()])
        client = await self.start_client(server, [sink.port], "--http1")
        payload = pseudorandom(2 * MiB + 1, seed=12)
        c = await self.send_close_write_and_read(self.forward_port(client), payload)
        self.assertEqual(c.nbytes, 64)
        self.assertEqual(c.hexdigest, sha256(sha256(payload).encode()))
        self.assertTrue(c.closed_cleanly, str(c.reason))


class PlainTextHalfCloseTests(HalfCloseMixin):
    """The issue's Envoy-YAML pair, no TLS: tcp_proxy tunneling_config -> HCM CONNECT."""

    @e2e
    async def test_yaml_pair_echo_after_half_close(self) -> None:
        self.echo = await start_recording_echo(self)
        server = await start_yaml_twistd(self, "hbone-server", "server", bootstrap(
            [h1_connect_terminator("terminate", "backend", port=0)],
            [plain_cluster("backend", port=self.echo.port)],
        ))
        client = await start_yaml_twistd(self, "hbone-client", "client", bootstrap(
            [h1_tunnel_client_listener("outbound", 0, f"127.0.0.1:{self.echo.port}", "tunnel")],
            [plain_cluster("tunnel", port=server.ports["terminate"])],
        ))
        await self.check_echo_after_half_close(client.ports["outbound"], 5, server, client)
        # And once more on a fresh tunnel, the other way round: the target ends first.
        self.assertEqual(server.crashes() + client.crashes(), [])

    @e2e
    async def test_internal_listener_echo_after_half_close(self) -> None:
        """
        One process: TCP listener -> tcp_proxy tunneling (HTTP/1.1) -> internal listener
        whose HCM terminates CONNECT -> echo target.
        """
        self.echo = await start_recording_echo(self)
        proc = await start_yaml_twistd(self, "hbone-client", "chain", bootstrap(
            [h1_tunnel_client_listener("outbound", 0, f"127.0.0.1:{self.echo.port}", "inner"),
             h1_connect_terminator("terminate", "backend")],
            [plain_cluster("inner", internal="terminate"),
             plain_cluster("backend", port=self.echo.port)],
            internal=True,
        ))
        await self.check_echo_after_half_close(proc.ports["outbound"], 6, proc)


class _OneShot(protocol.Factory):
    def __init__(self, proto: protocol.Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.proto


class H1TruncationTests(E2ETestCase):
    """A truncated HTTP/1.1 tunnel must never look like a clean end."""

    timeout = 60

    @e2e
    async def test_target_reset_reaches_the_app_as_a_reset(self) -> None:
        target = start_recorder(self, reset_after=5)
        server = await self.start_server()
        client = await self.start_client(server, [target.port], "--http1")
        c = StreamClient()
        await connect_tcp(self.forward_port(client), c)
        c.transport.write(b"hello")
        await c.done
        self.assertFalse(c.eof, "the target's reset reached the app as EOF")
        self.assertTrue(is_reset(c), c.reason)
        m = await server.wait_for(TUNNEL_CLOSED_RE)
        self.assertRegex(m["reason"], re.compile("upstream: .*", re.I))

    @e2e
    async def test_tls_cut_without_close_notify_resets_the_target(self) -> None:
        """
        A raw HTTP/1.1 CONNECT over TLS whose TCP connection ends without close_notify in the
        middle of the tunnel: the target is reset, it gets no FIN.
        """
        target = start_recorder(self)
        server = await self.start_server()
        creator = RawTLSClient(
            self.pki.ca, self.pki.cert("client"), self.pki.key("client"), alpn=(b"http/1.1",)
        )
        c = StreamClient()
        # hbonex's TLS transport: Twisted's own fails on a FIN sent under it.
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        await endpoint.connect(FastTLSFactory(creator, True, _OneShot(c)))
        c.transport.write(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\n".encode())
        await c.wait_contains(b"\r\n\r\n")
        c.transport.write(b"x" * 5000)
        await wait_until(lambda: bool(target.connections)
                         and len(target.connections[0].data) == 5000, "5000 bytes at the target")
        # FIN on the TCP socket under TLS, with no close_notify.
        c.transport.transport.loseWriteConnection()
        conn, reason = await target.wait_ended()
        self.assertFalse(conn.fin, "the target got a clean FIN for a truncated tunnel")
        self.assertTrue(conn.was_reset, f"target saw {reason}")
        m = await server.wait_for(TUNNEL_CLOSED_RE)
        self.assertIn("without close_notify", m["reason"])

    @e2e
    async def test_server_killed_mid_tunnel_resets_the_app(self) -> None:
        echo = await start_recording_echo(self)
        server = await self.start_server()
        client = await self.start_client(server, [echo.port], "--http1")
        c = StreamClient()
        await connect_tcp(self.forward_port(client), c)
        c.transport.write(b"ping")
        await c.wait_received(4)
        server.signal("KILL")
        await server.wait_exit()
        await c.done
        self.assertFalse(c.eof, "a dead server's tunnel ended with a clean EOF")
        self.assertTrue(is_reset(c), c.reason)


class RecordingH2Peer(H2Peer):
    """An H2Peer that records DATA on streams it has not answered yet."""

    def __init__(self, on_request: Any, data_before: dict[int, bytes], answered: set[int]):
        super().__init__(on_request)
        self.data_before = data_before
        self.answered = answered

    def buildProtocol(self, addr: Any) -> H2PeerConnection:
        proto = super().buildProtocol(addr)
        receive = proto.conn.receive_data

        def spy(raw: bytes) -> Any:
            events = receive(raw)
            for event in events:
                if (isinstance(event, h2.events.DataReceived)
                        and event.stream_id not in self.answered):
                    self.data_before[event.stream_id] = (
                        self.data_before.get(event.stream_id, b"") + event.data
                    )
            return events

        proto.conn.receive_data = spy  # type: ignore[method-assign]
        return proto


class EarlyDataTests(E2ETestCase):
    """The client sends nothing of a tunnel before its 200; the server can refuse it."""

    timeout = 60

    async def app_bytes_delivered(self, c: StreamClient, port: int) -> None:
        """Wait until the kernel acknowledged every byte ``c`` wrote to hbone-client."""
        local = c.transport.getHost().port
        await wait_until(lambda: unsent_bytes(local, port) == 0,
                         "the app's early bytes to reach hbone-client's socket", timeout=5)

    @e2e
    async def test_http1_client_holds_bytes_until_the_200(self) -> None:
        upstream = HoldingConnectFactory()
        port = await self.listen(upstream)
        client = await self.start_client_to_plain(port)
        fwd = self.forward_port(client)
        first = StreamClient()
        await connect_tcp(fwd, first)
        first.transport.write(b"early bytes")
        await self.wait_connections(upstream, 1)
        await self.app_bytes_delivered(first, fwd)
        # A second tunnel's CONNECT arrives after hbone-client could have read (and sent)
        # the first one's bytes many times over.
        second = StreamClient()
        await connect_tcp(fwd, second)
        await self.wait_connections(upstream, 2)
        self.assertEqual(upstream.connections[0].before_answer, b"")
        upstream.connections[0].answer()
        await first.wait_received(len(b"early bytes"))
        self.assertEqual(first.data, b"early bytes")
        self.assertEqual(upstream.connections[0].after, b"early bytes")

    async def listen(self, factory: Any) -> int:
        from twisted.internet import endpoints, reactor

        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            factory
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in factory.connections])
        factory.port = port.getHost().port
        return port.getHost().port  # type: ignore[no-any-return]

    async def start_client_to_plain(self, port: int) -> Any:
        return await start_yaml_twistd(self, "hbone-client", "client", bootstrap(
            [h1_tunnel_client_listener("forward_0", 0, "127.0.0.1:9", "tunnel")],
            [plain_cluster("tunnel", port=port)],
        ))

    async def wait_connections(self, factory: HoldingConnectFactory, n: int) -> None:
        await wait_until(
            lambda: len([c for c in factory.connections if c.head_done]) >= n,
            f"{n} CONNECT requests", timeout=10,
        )

    @e2e
    async def test_http2_client_holds_bytes_until_the_200(self) -> None:
        requests: list[tuple[H2PeerConnection, int]] = []
        data_before: dict[int, bytes] = {}
        answered: set[int] = set()

        def hold(conn: H2PeerConnection, stream_id: int) -> None:
            requests.append((conn, stream_id))

        peer = start_h2_peer(self, self.pki, RecordingH2Peer(hold, data_before, answered))
        client = await self.start_client_to(peer.port, "127.0.0.1:9")
        fwd = self.forward_port(client)
        first = StreamClient()
        await connect_tcp(fwd, first)
        first.transport.write(b"early bytes")
        await wait_until(lambda: len(requests) == 1, "the first CONNECT", timeout=10)
        await self.app_bytes_delivered(first, fwd)
        second = StreamClient()
        await connect_tcp(fwd, second)
        # Same HTTP/2 connection: stream 3's HEADERS come after anything sent on stream 1.
        await wait_until(lambda: len(requests) == 2, "the second CONNECT", timeout=10)
        self.assertEqual(requests[0][0], requests[1][0])
        self.assertEqual(data_before, {})
        conn, sid = requests[0]
        answered.add(sid)
        conn.echo.add(sid)
        conn.answer(sid)
        await first.wait_received(len(b"early bytes"))
        self.assertEqual(first.data, b"early bytes")

    def start_client_to(self, port: int, target: str, *args: str) -> Any:
        from tests.support import start_twistd

        return start_twistd(
            self, "hbone-client",
            [f"--forward=127.0.0.1:0={target}", "--server", f"127.0.0.1:{port}",
             *self.pki.args("client"), *args],
            name="hbone-client",
        )

    @e2e
    async def test_server_refuses_http1_early_data(self) -> None:
        target = start_recorder(self)
        server = await self.start_server("--reject-early-connect-data")
        creator = RawTLSClient(
            self.pki.ca, self.pki.cert("client"), self.pki.key("client"), alpn=(b"http/1.1",)
        )
        # CONNECT and tunnel bytes in one write: data before the 200.
        c = StreamClient()
        await connect_tls(server.port, creator, c)
        c.transport.write(
            f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n".encode()
        )
        await c.done
        self.assertRegex(c.data.decode("latin-1"), r"^HTTP/1\.1 400 ")
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual(m["status"], "400")
        self.assertIn("early data", m["reason"])
        # Without early data the same server tunnels.
        good = StreamClient()
        await connect_tls(server.port, creator, good)
        good.transport.write(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\n".encode())
        await good.wait_contains(b"\r\n\r\n")
        self.assertRegex(good.data.decode("latin-1"), r"^HTTP/1\.1 200 ")
        good.transport.write(b"after the 200")
        await wait_until(lambda: any(bytes(t.data) == b"after the 200"
                                     for t in target.connections), "the bytes at the target")
        # The refused CONNECT's bytes never reached a target.
        self.assertEqual([bytes(t.data) for t in target.connections], [b"after the 200"])
        good.transport.loseConnection()
        await good.done

    @e2e
    async def test_server_refuses_http2_early_data(self) -> None:
        target = start_recorder(self)
        server = await self.start_server("--reject-early-connect-data")
        creator = RawTLSClient(
            self.pki.ca, self.pki.cert("client"), self.pki.key("client"), alpn=(b"h2",)
        )
        h2c = RawH2Client()
        await connect_tls(server.port, creator, h2c)
        self.addCleanup(h2c.close)
        await h2c.ready
        authority = f"127.0.0.1:{target.port}".encode()
        sid = h2c.request([(b":method", b"CONNECT"), (b":authority", authority)])
        h2c.send(sid, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(response_status(await h2c.wait_answer(sid)), 400)
        good = h2c.request([(b":method", b"CONNECT"), (b":authority", authority)])
        self.assertEqual(response_status(await h2c.wait_answer(good)), 200)
        h2c.send(good, b"after the 200")
        await wait_until(lambda: any(bytes(t.data) == b"after the 200"
                                     for t in target.connections), "the bytes at the target")
        self.assertEqual([bytes(t.data) for t in target.connections if t.data],
                         [b"after the 200"])
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual(m["status"], "400")
        self.assertEqual(server.crashes(), [])
