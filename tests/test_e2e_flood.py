"""
HTTP/2 abuse against a real ``twistd hbone-server``, with raw frames (tests.peers
RawFrameClient): each attack ends its own connection with the right GOAWAY code, the server's
memory stays bounded, and a fresh tunnel still works afterwards.
"""

from __future__ import annotations

import h2.errors
import hpack

from tests.peers import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    HEADERS,
    PING,
    PRIORITY,
    RST_STREAM,
    WINDOW_UPDATE,
    RawFrameClient,
    connect_block,
    frame,
    start_black_hole,
)
from tests.support import (
    RawH2Client,
    RawTLSClient,
    Target,
    TwistdProcess,
    connect_tls,
    e2e,
    gather,
    open_fds,
    pseudorandom,
    response_status,
    rss_kib,
    start_echo,
    wait_until,
)
from tests.test_e2e_tunnel import E2ETestCase

ErrorCodes = h2.errors.ErrorCodes
MiB = 1024 * 1024


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


class FloodTestCase(E2ETestCase):
    timeout = 60

    async def setup_server(self, *args: str) -> tuple[TwistdProcess, Target]:
        echo, server = await gather([start_echo(self), self.start_server(*args)])
        return server, echo

    async def raw(self, server: TwistdProcess, preface: bool = True) -> RawFrameClient:
        creator = RawTLSClient(
            self.pki.ca, self.pki.cert("client"), self.pki.key("client"), alpn=(b"h2",)
        )
        client = RawFrameClient(preface=preface)
        await connect_tls(server.port, creator, client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.lost is None
                        else None)
        return client

    async def assert_goaway(self, client: RawFrameClient, code: int) -> None:
        """GOAWAY with ``code``, and the server closes the connection."""
        await client.wait(lambda: client.goaway_code is not None, "a GOAWAY")
        self.assertEqual(ErrorCodes(client.goaway_code), code)
        await client.done

    async def assert_still_serving(self, server: TwistdProcess, echo: Target) -> None:
        """A new connection and tunnel work, every byte echoed."""
        creator = RawTLSClient(
            self.pki.ca, self.pki.cert("client"), self.pki.key("client"), alpn=(b"h2",)
        )
        h2c = RawH2Client()
        await connect_tls(server.port, creator, h2c)
        self.addCleanup(h2c.close)
        await h2c.ready
        sid = h2c.request([(b":method", b"CONNECT"),
                           (b":authority", f"127.0.0.1:{echo.port}".encode())])
        self.assertEqual(response_status(await h2c.wait_answer(sid)), 200)
        payload = pseudorandom(100_000, seed=sid)
        h2c.send(sid, payload, end_stream=True)
        await h2c.wait_event(lambda e: type(e).__name__ == "StreamEnded"
                             and e.stream_id == sid, "the echo's end")
        self.assertEqual(h2c.body(sid), payload)
        self.assertEqual(server.crashes(), [])


class PrefaceAndHeaderTests(FloodTestCase):
    @e2e
    async def test_bad_preface_is_goaway_and_closed_at_once(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server, preface=False)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await self.assert_goaway(client, ErrorCodes.PROTOCOL_ERROR)
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_continuation_flood_is_cut_at_the_header_limit(self) -> None:
        """
        HEADERS then 1 MiB CONTINUATION frames that never end the block: cut within a frame
        of 60 KiB, the server's memory does not follow the flood.
        """
        server, echo = await self.setup_server()
        before = rss_kib(server.transport.pid)  # type: ignore[union-attr]
        client = await self.raw(server)
        junk = b"\x00" * (1 * MiB - 1)
        client.send(frame(HEADERS, 0, 1, b"\x00" * 16384))
        sent = 0
        while client.lost is None and client.goaway_code is None and sent < 60:
            client.send(frame(CONTINUATION, 0, 1, junk))
            sent += 1
            await wait_until(lambda: True, "a reactor turn", interval=0)
        await self.assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)
        grown = rss_kib(server.transport.pid) - before  # type: ignore[union-attr]
        self.assertLess(grown, 20 * 1024, f"server RSS grew {grown} KiB")
        await server.wait_for(r"header block of more than 61440 bytes")
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_hpack_bomb_is_capped_by_the_header_list_limit(self) -> None:
        """One 4 KB header indexed once, then referenced 100 times: 400 KB decoded."""
        server, echo = await self.setup_server()
        client = await self.raw(server)
        encoder = hpack.Encoder()
        first = encoder.encode([(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:1"),
                                (b"x-bomb", b"b" * 4000)])
        # The dynamic table's newest entry is index 62: each 0xbe byte repeats it.
        client.send(frame(HEADERS, END_HEADERS, 1, first + bytes([0x80 | 62]) * 100))
        await self.assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_table_size_update_over_the_limit(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server)
        # A dynamic table size update to 1 MiB (we allow 4096): 001 prefix, 5-bit integer.
        update = hpack.hpack.encode_integer(2**20, 5)
        update[0] |= 0x20
        client.send(frame(HEADERS, END_HEADERS, 1,
                          bytes(update) + connect_block(b"127.0.0.1:1")))
        await self.assert_goaway(client, ErrorCodes.COMPRESSION_ERROR)
        await self.assert_still_serving(server, echo)


class ControlFloodTests(FloodTestCase):
    @e2e
    async def test_empty_data_frames(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server)
        hole = start_black_hole(self)  # the stream stays open while we flood it
        client.send(frame(HEADERS, END_HEADERS, 1, connect_block(f"127.0.0.1:{hole.port}"
                                                                 .encode())))
        client.send(*[frame(DATA, 0, 1) for _ in range(3)])
        await self.assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)
        await server.wait_for(r"consecutive frames with an empty payload")
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_priority_frames(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server)
        client.send(*[frame(PRIORITY, 0, 2 * i + 1, u32(0) + b"\x10") for i in range(10)])
        await self.assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)
        await server.wait_for(r"PRIORITY frames for 0 streams")
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_window_updates_without_data(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server)
        client.send(*[frame(WINDOW_UPDATE, 0, 0, u32(1)) for _ in range(10)])
        await self.assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)
        await server.wait_for(r"WINDOW_UPDATE frames for 0 DATA frames sent")
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_pings_to_a_peer_that_does_not_read(self) -> None:
        """
        PINGs from a client that stops reading: once the server's socket is full, its
        queue of PING acks is capped (max_outbound_control_frames) and the connection cut.
        """
        server, echo = await self.setup_server()
        client = await self.raw(server)
        await client.wait(lambda: len(client.frames) >= 2, "the server's SETTINGS")
        client.transport.pauseProducing()  # type: ignore[union-attr]  # read nothing more
        ping = frame(PING, 0, 0, b"12345678")
        pid = server.transport.pid  # type: ignore[union-attr]
        before = rss_kib(pid)
        batches = 0
        while not server.matches(r"queued for a peer that is not reading") and batches < 400:
            client.send(ping * 2000)
            batches += 1
            await wait_until(lambda: True, "a reactor turn", interval=0.005)
        await server.wait_for(r"control frames queued for a peer that is not reading")
        grown = rss_kib(pid) - before
        self.assertLess(grown, 30 * 1024, f"server RSS grew {grown} KiB")
        await self.assert_still_serving(server, echo)


class StreamAbuseTests(FloodTestCase):
    @e2e
    async def test_rapid_reset(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server)
        hole = start_black_hole(self)
        block = connect_block(f"127.0.0.1:{hole.port}".encode())
        burst = []
        for i in range(150):
            sid = 2 * i + 1
            burst += [frame(HEADERS, END_HEADERS, sid, block),
                      frame(RST_STREAM, 0, sid, u32(ErrorCodes.CANCEL))]
        client.send(*burst)
        await self.assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)
        await server.wait_for(r"streams reset within 1s of opening \(rapid reset\)")
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_provoked_resets(self) -> None:
        """Malformed CONNECTs (we reset each with PROTOCOL_ERROR) count like rapid reset."""
        server, echo = await self.setup_server()
        client = await self.raw(server)
        bad = hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"x"),
                                      (b":path", b"/")])
        client.send(*[frame(HEADERS, END_HEADERS, 2 * i + 1, bad) for i in range(150)])
        await self.assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_even_stream_id(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server)
        client.send(frame(HEADERS, END_HEADERS, 2, connect_block(b"127.0.0.1:1")))
        await self.assert_goaway(client, ErrorCodes.PROTOCOL_ERROR)
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_reused_stream_id(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server)
        block = connect_block(f"127.0.0.1:{echo.port}".encode())
        client.send(frame(HEADERS, END_HEADERS, 3, block),
                    frame(HEADERS, END_HEADERS, 1, block))
        await self.assert_goaway(client, ErrorCodes.PROTOCOL_ERROR)
        await self.assert_still_serving(server, echo)


class FlowControlTests(FloodTestCase):
    @e2e
    async def test_window_update_overflow(self) -> None:
        server, echo = await self.setup_server()
        client = await self.raw(server)
        client.send(frame(WINDOW_UPDATE, 0, 0, u32(2**31 - 1)))
        await self.assert_goaway(client, ErrorCodes.FLOW_CONTROL_ERROR)
        await self.assert_still_serving(server, echo)

    @e2e
    async def test_data_beyond_the_window(self) -> None:
        """More than the 4 MiB stream window on a stream whose upstream never connects."""
        server, echo = await self.setup_server("--connect-timeout", "30")
        client = await self.raw(server)
        hole = start_black_hole(self)
        client.send(frame(HEADERS, END_HEADERS, 1,
                          connect_block(f"127.0.0.1:{hole.port}".encode())))
        chunk = b"d" * 16384
        client.send(*[frame(DATA, 0, 1, chunk) for _ in range(4 * MiB // 16384 + 1)])
        await client.wait(
            lambda: client.goaway_code is not None or 1 in client.resets,
            "a FLOW_CONTROL_ERROR",
        )
        code = client.goaway_code if client.goaway_code is not None else client.resets[1]
        self.assertEqual(ErrorCodes(code), ErrorCodes.FLOW_CONTROL_ERROR)
        await self.assert_still_serving(server, echo)


class HandshakeFloodTests(FloodTestCase):
    @e2e
    async def test_a_thousand_half_sent_client_hellos(self) -> None:
        """
        1000 connections that start a TLS handshake and never finish it: tunnels keep
        working meanwhile, every one of them is cut at the handshake timeout, and the server's
        file descriptors return to where they were.
        """
        import socket

        server, echo = await self.setup_server("--handshake-timeout", "1")
        pid = server.transport.pid  # type: ignore[union-attr]
        baseline = open_fds(pid)
        # A TLS record header announcing a 512-byte ClientHello, and only its first bytes.
        partial = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40
        sockets = []
        self.addCleanup(lambda: [s.close() for s in sockets])
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.setblocking(False)
            s.send(partial)
            sockets.append(s)
        await wait_until(lambda: open_fds(pid) >= baseline + 900,
                         lambda: f"the server to accept them ({open_fds(pid)} fds)")
        await self.assert_still_serving(server, echo)
        await wait_until(lambda: open_fds(pid) <= baseline + 5,
                         lambda: f"fds back to {baseline} (now {open_fds(pid)})", timeout=15)
        # One line each (their output may still be on its way when the fds are back).
        await server.wait_for_count(r"handshake timed out after 1 s", 1000, timeout=15)
        await self.assert_still_serving(server, echo)


class ConnectionLimitTests(FloodTestCase):
    @e2e
    async def test_global_downstream_limit(self) -> None:
        """
        --max-connections 2: a third connection is refused at once (before any TLS work)
        and logged; the two open ones are untouched; a slot freed is usable again.
        """
        server, echo = await self.setup_server("--max-connections", "2")
        first = await self.raw(server)
        second = await self.raw(server)
        await gather([c.wait(lambda c=c: len(c.frames) >= 1, "SETTINGS") for c in (first,
                                                                                  second)])
        third = await self.raw(server)
        await third.done
        self.assertEqual(third.frames, [])
        await server.wait_for(r"connection from 127\.0\.0\.1:\d+ refused: 2 connections "
                              r"active, the limit is 2 \(1 refused so far\)")
        self.assertIsNone(first.lost)
        self.assertIsNone(second.lost)
        first.transport.loseConnection()
        await first.done

        async def admitted() -> bool:
            client = await self.raw(server)
            try:
                await client.wait(lambda: len(client.frames) >= 1 or client.lost is not None,
                                  "SETTINGS or a refusal")
            except AssertionError:
                return False
            return client.lost is None

        for _ in range(50):  # the server notices the close a moment later
            if await admitted():
                break
        else:
            self.fail("a freed slot was never usable again")
        self.assertIsNone(second.lost)
