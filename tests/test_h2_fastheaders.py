"""
hbonex.h2.fastheaders: the same bytes and the same h2 state as h2's own send_headers.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import h2.config
import h2.connection
import h2.exceptions
import h2.stream
import hpack
from hpack import NeverIndexedHeaderTuple
from twisted.trial import unittest

from hbonex.h2 import fastheaders
from hbonex.h2.connection import LeanEncoder

Send = Callable[[h2.connection.H2Connection, int, Any, bool], None]


def h2_send(conn: h2.connection.H2Connection, sid: int, headers: Any, end: bool) -> None:
    conn.send_headers(sid, headers, end_stream=end)


def fast_send(conn: h2.connection.H2Connection, sid: int, headers: Any, end: bool) -> None:
    fastheaders.send_headers(conn, sid, headers, end)


def config(client: bool) -> h2.config.H2Configuration:
    # As hbonex configures its connections (H2TunnelConnection's H2Configuration).
    return h2.config.H2Configuration(
        client_side=client, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=client,
        normalize_inbound_headers=False,
    )


def connection(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(config(client))
    conn.encoder = LeanEncoder()
    conn.initiate_connection()
    conn.data_to_send()
    return conn


def state(conn: h2.connection.H2Connection) -> Any:
    """Everything the send path touches, comparable."""
    streams = {
        sid: (s.state_machine.state, s._authority, s.request_method,
              s.state_machine.trailers_sent, s.state_machine.headers_sent, s.closed_by)
        for sid, s in conn.streams.items()
    }
    return (conn.state_machine.state, streams, dict(conn._closed_streams),
            list(conn.encoder.header_table.dynamic_entries), conn.highest_outbound_stream_id)


def outcome(conn: h2.connection.H2Connection, send: Send, sid: int, headers: Any,
            end: bool) -> Any:
    try:
        send(conn, sid, headers, end)
        error = None
    except h2.exceptions.ProtocolError as e:
        error = (type(e), str(e))
    return error, conn.data_to_send(), state(conn)


class SameAsH2Tests(unittest.TestCase):
    def assertSame(self, steps: Callable[[h2.connection.H2Connection, Send], list[Any]],
                   client: bool) -> list[Any]:
        slow = steps(connection(client), h2_send)
        fast = steps(connection(client), fast_send)
        self.assertEqual(fast, slow)
        self.assertTrue(slow)
        return slow

    def test_connect_requests_share_the_dynamic_table(self) -> None:
        def steps(conn: h2.connection.H2Connection, send: Send) -> list[Any]:
            out = []
            for sid in (1, 3, 5, 7):
                headers = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.%d:80" % (sid % 4)),
                           (b"x-b3-traceid", b"abc"),
                           NeverIndexedHeaderTuple(b"x-request-id", b"id-%d" % sid)]
                out.append(outcome(conn, send, sid, headers, sid == 7))
            return out

        self.assertSame(steps, client=True)

    def test_a_block_larger_than_a_frame_continues(self) -> None:
        def steps(conn: h2.connection.H2Connection, send: Send) -> list[Any]:
            big = [(b":method", b"CONNECT"), (b":authority", b"a:1"),
                   (b"x-big", b"v" * 40000), (b"x-more", b"w" * 20000)]
            return [outcome(conn, send, 1, big, True), outcome(conn, send, 3, big, False)]

        out = self.assertSame(steps, client=True)
        self.assertGreater(len(out[0][1]), 60000)
        conn = connection(True)
        fast_send(conn, 1, [(b":method", b"CONNECT"), (b":authority", b"a:1"),
                            (b"x-big", b"v" * 40000)], True)
        server = connection(False)
        fresh = h2.connection.H2Connection(config(True))
        fresh.initiate_connection()
        server.receive_data(fresh.data_to_send())  # the preface connection() took
        events = server.receive_data(conn.data_to_send())
        received = [e for e in events if isinstance(e, h2.events.RequestReceived)]
        self.assertEqual(dict(received[0].headers)[b"x-big"], b"v" * 40000)

    def test_the_peer_stream_limit_and_closed_streams(self) -> None:
        def steps(conn: h2.connection.H2Connection, send: Send) -> list[Any]:
            conn.remote_settings.update({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
            conn.remote_settings.acknowledge()
            req = [(b":method", b"CONNECT"), (b":authority", b"a:1")]
            out = [outcome(conn, send, 1, req, False), outcome(conn, send, 3, req, False),
                   outcome(conn, send, 5, req, False)]  # over the limit
            conn.reset_stream(1)
            conn.data_to_send()
            # Counting forgets the reset stream (h2's side effect), so 5 opens now.
            out.append(outcome(conn, send, 5, req, False))
            out.append(outcome(conn, send, 1, req, False))  # forgotten, and 2 open again
            return out

        errors = [error and error[0] for error, _, _ in self.assertSame(steps, client=True)]
        self.assertEqual(errors, [None, None, h2.exceptions.TooManyStreamsError, None,
                                  h2.exceptions.TooManyStreamsError])

    def test_trailers(self) -> None:
        def steps(conn: h2.connection.H2Connection, send: Send) -> list[Any]:
            req = [(b":method", b"POST"), (b":authority", b"a:1"), (b":path", b"/")]
            return [outcome(conn, send, 1, req, False),
                    outcome(conn, send, 1, [(b"grpc-status", b"0")], False),  # no END_STREAM
                    outcome(conn, send, 3, req, False),
                    outcome(conn, send, 3, [(b"grpc-status", b"0")], True),
                    outcome(conn, send, 3, [(b"x", b"y")], True)]  # after the end

        errors = [error and error[0] for error, _, _ in self.assertSame(steps, client=True)]
        self.assertEqual(errors, [None, h2.exceptions.ProtocolError, None, None,
                                  h2.exceptions.ProtocolError])

    def test_server_responses(self) -> None:
        client = connection(True)
        for sid in (1, 3, 5):
            client.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"a:1")])
        request_bytes = h2.connection.H2Connection(config(True))
        request_bytes.initiate_connection()
        preface = request_bytes.data_to_send()
        frames = client.data_to_send()

        def steps(conn: h2.connection.H2Connection, send: Send) -> list[Any]:
            conn.receive_data(preface + frames)
            conn.data_to_send()
            return [outcome(conn, send, 1, [(b":status", b"200")], False),
                    outcome(conn, send, 3, [(b":status", b"100")], False),  # informational
                    outcome(conn, send, 3, [(b":status", b"100")], True),   # 1xx cannot end
                    outcome(conn, send, 3, [(b":status", b"503"), (b"x", b"y")], True),
                    outcome(conn, send, 5, [(b":status", b"200")], False),
                    outcome(conn, send, 7, [(b":status", b"200")], False)]  # servers cannot open

        out = self.assertSame(steps, client=False)
        self.assertEqual(out[0][1][:9], b"\x00\x00\x01\x01\x04\x00\x00\x00\x01")  # HEADERS 0x88
        self.assertIsNotNone(out[2][0])
        self.assertIsNotNone(out[5][0])


class PinnedInternalsTests(unittest.TestCase):
    """An h2 release that renames or changes an internal used here fails loudly, naming it."""

    def test_every_internal_exists(self) -> None:
        conn = h2.connection.H2Connection(config(True))
        conn.initiate_connection()
        conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"a:1")])
        stream = conn.streams[1]
        objects = {"H2Connection": conn, "H2Stream": stream,
                   "H2StreamStateMachine": stream.state_machine}
        for owner, name in fastheaders.H2_INTERNALS:
            self.assertTrue(hasattr(objects[owner], name),
                            f"h2 changed: {owner}.{name} is gone (hbonex.h2.fastheaders uses it)")
        self.assertEqual(stream._authority, b"a:1")
        self.assertEqual(stream.request_method, b"CONNECT")
        self.assertIsInstance(conn._data_to_send, (bytes, bytearray))


class LeanEncoderTests(unittest.TestCase):
    """LeanEncoder.encode: hpack's bytes (without Huffman) and hpack's dynamic table."""

    def both(self, blocks: list[Any], size: int | None = None) -> list[bytes]:
        lean, reference = LeanEncoder(), hpack.Encoder()
        if size is not None:
            lean.header_table_size = reference.header_table_size = size
        out = []
        for headers in blocks:
            got = lean.encode(headers)
            self.assertEqual(got, reference.encode(headers, huffman=False))
            self.assertEqual(list(lean.header_table.dynamic_entries),
                             list(reference.header_table.dynamic_entries))
            self.assertEqual(lean.header_table.resized, reference.header_table.resized)
            out.append(got)
        decoder = hpack.Decoder()
        decoder.max_header_list_size = 1 << 20
        for headers, got in zip(blocks, out, strict=True):
            if not isinstance(headers, dict):
                self.assertEqual([(n if isinstance(n, bytes) else n.encode(),
                                   v if isinstance(v, bytes) else str(v).encode())
                                  for n, v, *_ in headers],
                                 [tuple(h) for h in decoder.decode(got, raw=True)])
        return out

    def test_random_header_lists(self) -> None:
        rng = random.Random(14)
        names = [b":method", b":authority", b":status", b":path", b"x-a", b"content-length",
                 b"x-" + b"n" * 200, b"accept-encoding"]
        values = [b"CONNECT", b"GET", b"200", b"503", b"", b"v", b"10.0.0.1:80",
                  b"w" * 130, b"gzip, deflate", b"x" * 5000]
        blocks = []
        for _ in range(300):
            headers: list[Any] = []
            for _ in range(rng.randrange(0, 6)):
                n, v = rng.choice(names), rng.choice(values)
                kind = rng.randrange(4)
                if kind == 0:
                    headers.append(NeverIndexedHeaderTuple(n, v))
                elif kind == 1:
                    headers.append(hpack.HeaderTuple(n, v))
                elif kind == 2:
                    headers.append((n, v, rng.random() < 0.5))
                else:
                    headers.append((n, v))
            blocks.append(headers)
        out = self.both(blocks, size=512)
        self.assertTrue(any(len(b) > 5000 for b in out))
        self.both(blocks)

    def test_str_dicts_and_a_resized_table(self) -> None:
        lean = LeanEncoder()
        lean.header_table_size = 100
        self.assertTrue(lean.header_table.resized)
        out = self.both([[(":method", "GET"), ("x-n", 3)], {b":status": b"200"},
                         [(b":status", b"200")], [(b"x-big-index", b"1")] * 3,
                         [(b":authority", b"")] * 2])
        self.assertEqual(out[2], b"\x88")

    def test_table_size_update_is_sent_first(self) -> None:
        def run(encoder: hpack.Encoder) -> list[bytes]:
            encoder.encode([(b"x-a", b"1")])
            encoder.header_table_size = 50
            return [encoder.encode([(b"x-a", b"1")], huffman=False),
                    encoder.encode([(b"x-a", b"1")], huffman=False)]

        self.assertEqual(run(LeanEncoder()), run(hpack.Encoder()))
        self.assertEqual(run(LeanEncoder())[0][:1], b"\x3f")  # size update, 5-bit prefix full

    def test_hpack_internals_relied_on(self) -> None:
        encoder = hpack.Encoder()
        self.assertIsInstance(encoder.header_table.resized, bool)
        self.assertEqual(encoder.header_table.search(b":status", b"200"), (8, b":status", b"200"))
        self.assertEqual(encoder.header_table.search(b":method", b"CONNECT"),
                         (2, b":method", None))
        self.assertIsNone(encoder.header_table.search(b"x-new", b"1"))
        self.assertEqual(bytes(hpack.hpack.encode_integer(1337, 5)), b"\x1f\x9a\x0a")
        self.assertEqual(hpack.hpack._to_bytes(3), b"3")
        self.assertEqual(encoder._encode_table_size_change(), b"")
