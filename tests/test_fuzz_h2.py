"""
Random HTTP/2 frame sequences against an H2TunnelServer on Twisted's in-memory transports
(hypothesis, bounded example counts): nothing escapes as an exception, every GOAWAY carries a
real error code and ends the connection, and once the connection is gone no stream, buffered
byte or pending upstream connect is left behind.
"""

from __future__ import annotations

import hpack
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import GoAwayFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import error as ierror
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from hbonex.h2.settings import H2Settings
from hbonex.http.routing import ConnectRouter
from hbonex.tunnel.server import H2TunnelServer, TunnelLog
from tests.fakes import HalfCloseTransport
from tests.peers import PREFACE, frame
from tests.test_h2stream import INFO, FakeCluster

_ENCODER = hpack.Encoder()
BLOCKS = [
    _ENCODER.encode([(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:8080")]),
    hpack.Encoder().encode([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                            (b":authority", b"a")]),
    hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"nope")]),
    b"\xff\xff\xff",  # not HPACK
    b"",
]

stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1])
payloads = st.binary(max_size=40)

frames = st.one_of(
    # HEADERS (flags: END_STREAM 0x1, END_HEADERS 0x4, PADDED 0x8, PRIORITY 0x20)
    st.builds(lambda sid, flags, block: frame(0x1, flags, sid, block),
              stream_ids, st.sampled_from([0x4, 0x5, 0x0, 0x1, 0x24, 0x8]),
              st.sampled_from(BLOCKS)),
    st.builds(lambda sid, flags, data: frame(0x0, flags, sid, data),
              stream_ids, st.sampled_from([0, 1, 8]), payloads),
    st.builds(lambda sid, code: frame(0x3, 0, sid, code.to_bytes(4, "big")),
              stream_ids, st.sampled_from([0, 1, 8, 10, 99])),
    st.builds(lambda sid, inc: frame(0x8, 0, sid, inc.to_bytes(4, "big")),
              stream_ids, st.sampled_from([0, 1, 65535, 2**31 - 1])),
    st.builds(lambda flags, data: frame(0x6, flags, 0, data),
              st.sampled_from([0, 1]), st.sampled_from([b"12345678", b"short"])),
    st.builds(lambda flags, data: frame(0x4, flags, 0, data),
              st.sampled_from([0, 1]),
              st.sampled_from([b"", b"\x00\x03\x00\x00\x00\x00", b"\x00\x04\xff\xff\xff\xff",
                               b"\x00\x05\x00\x00\x00\x01", b"xyz"])),
    st.builds(lambda sid, data: frame(0x2, 0, sid, data), stream_ids,
              st.sampled_from([b"\x00\x00\x00\x00\x10", b"\x00\x00\x00\x01\x10", b"x"])),
    st.builds(lambda sid, data: frame(0x9, 0x4, sid, data), stream_ids, payloads),
    st.builds(lambda data: frame(0x7, 0, 0, data),
              st.sampled_from([b"\x00\x00\x00\x00\x00\x00\x00\x00", b"\x00\x00\x00\x01"])),
    st.builds(lambda kind, data: frame(kind, 0, 1, data), st.integers(10, 255), payloads),
)


@st.composite
def conversations(draw: st.DrawFn) -> list[bytes]:
    """
    Mostly well-formed traffic (streams opened in order, data, ends, resets, pings, window
    updates) with malformed frames mixed in, so sequences reach deep states before failing.
    """
    ops = draw(st.lists(st.sampled_from(
        ["open"] * 4 + ["data"] * 4 + ["end", "reset", "ping", "wu", "settings", "bad"]
    ), max_size=25))
    opened: list[int] = []
    out = []
    for op in ops:
        if op == "open":
            sid = 2 * len(opened) + 1
            opened.append(sid)
            out.append(frame(0x1, 0x4, sid, draw(st.sampled_from(BLOCKS[:3]))))
        elif op in ("data", "end", "reset", "wu") and opened:
            sid = draw(st.sampled_from(opened))
            if op == "data":
                out.append(frame(0x0, 0, sid, draw(payloads)))
            elif op == "end":
                out.append(frame(0x0, 0x1, sid, b""))
            elif op == "reset":
                out.append(frame(0x3, 0, sid, draw(st.sampled_from([0, 8, 10])).to_bytes(4,
                                                                                     "big")))
            else:
                out.append(frame(0x8, 0, sid, (1024).to_bytes(4, "big")))
        elif op == "ping":
            out.append(frame(0x6, 0, 0, b"12345678"))
        elif op == "settings":
            out.append(frame(0x4, 0, 0, b"\x00\x04\x00\x01\x00\x00"))
        elif op == "bad":
            out.append(draw(frames))
    return out


class FrameSequenceTests(unittest.TestCase):
    @settings(max_examples=400, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(conversations(), st.lists(frames, max_size=12)), st.booleans(),
           st.integers(1, 4))
    def test_random_frames(self, sequence: list[bytes], connect: bool, pieces: int) -> None:
        clock = Clock()
        cluster = FakeCluster()
        server = H2TunnelServer(H2Settings(max_concurrent_streams=3), clock,
                                ConnectRouter(cluster), INFO, TunnelLog())
        transport = HalfCloseTransport()
        server.makeConnection(transport)
        data = PREFACE + frame(0x4, 0, 0) + b"".join(sequence)
        # The same bytes in a few reads, cut anywhere.
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            server.dataReceived(data[i:i + step])
            if connect:
                for pending in list(cluster.pending):
                    if not pending.deferred.called:
                        pending.connect()
        out = FrameBuffer(server=False)
        out.max_frame_size = 2**24 - 1
        out.add_data(transport.value())
        sent = list(out)
        goaways = [f for f in sent if isinstance(f, GoAwayFrame)]
        for goaway in goaways:
            self.assertIn(goaway.error_code, list(ErrorCodes))
            if goaway.error_code != ErrorCodes.NO_ERROR:
                self.assertTrue(transport.disconnecting or transport.aborted,
                                "an error GOAWAY without closing")
        # The connection goes (as it would, sooner or later): nothing is left behind.
        clock.advance(60)
        server.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(server.streams, {})
        for pending in cluster.pending:
            connected = pending.deferred.called and not pending.cancelled
            upstream = pending.protocol.transport
            self.assertTrue(
                pending.cancelled or (connected and upstream is not None
                                      and (upstream.aborted or upstream.disconnecting
                                           or upstream.write_closed)),
                f"an upstream connect was left behind: {pending}",
            )
        self.assertIsNone(server._close_call)
        self.assertIsNone(server._ping_call)
