"""
Tests for hbonex.h2.fastpath: established streams' DATA and WINDOW_UPDATE frames handled
without h2's per-frame machinery.  Every scenario runs on two H2TunnelServers fed the same
raw client bytes, one with the fast path and one without, and everything observable (bytes
written to the client and upstream, stream and connection state, h2's windows, the flood
counters) must be identical; the edge cases then assert what that common result is.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import h2.config
import h2.connection
import h2.events
import h2.stream
import h2.windows
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    RstStreamFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from hbonex.h2 import fastpath
from hbonex.h2.connection import H2TunnelConnection
from hbonex.h2.settings import H2Settings, KiB
from hbonex.http.routing import ConnectRouter
from hbonex.tunnel.server import H2TunnelServer, TunnelLog
from tests.fakes import HalfCloseTransport
from tests.peers import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    connect_block,
    frame,
)
from tests.test_fuzz_h2 import frames as fuzz_frames
from tests.test_h2stream import INFO, FakeCluster

#: Small windows so that a few frames reach their edges.
SMALL = H2Settings(initial_stream_window_size=65535, initial_connection_window_size=65535,
                   max_frame_size=16 * KiB)
PADDED = 0x8


def data(sid: int, payload: bytes, flags: int = 0, pad: int | None = None) -> bytes:
    if pad is not None:
        return frame(DATA, flags | PADDED, sid, bytes([pad]) + payload + b"\0" * pad)
    return frame(DATA, flags, sid, payload)


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, increment.to_bytes(4, "big"))


def initial_window(value: int) -> bytes:
    return frame(SETTINGS, 0, 0, b"\x00\x04" + value.to_bytes(4, "big"))


def parse(raw: bytes) -> list[Frame]:
    buffer = FrameBuffer(server=False)
    buffer.max_frame_size = 2**24 - 1
    buffer.add_data(raw)
    return list(buffer)


class RawServer:
    """
    An H2TunnelServer fed raw client bytes, with stream 1 a CONNECT tunnel whose upstream
    is connected; ``steps`` records everything observable after each action.
    """

    def __init__(self, fast: bool, server_settings: H2Settings = SMALL) -> None:
        self.clock = Clock()
        self.cluster = FakeCluster()
        self.server = H2TunnelServer(server_settings, self.clock, ConnectRouter(self.cluster),
                                     INFO, TunnelLog())
        self.server.fast_path = fast
        self.transport = HalfCloseTransport()
        self.server.makeConnection(self.transport)
        self.upstreams: dict[int, Any] = {}
        self.steps: list[Any] = []
        self.receive(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, 1, 0))
        self.open(1)

    def open(self, sid: int) -> None:
        self.receive(frame(HEADERS, END_HEADERS, sid, connect_block(b"127.0.0.1:8080")))

    def receive(self, raw: bytes, pieces: list[int] | None = None) -> None:
        """The client's bytes, in reads cut at ``pieces`` (offsets)."""
        cuts = [0] + sorted(set(c for c in (pieces or []) if 0 < c < len(raw))) + [len(raw)]
        for start, end in zip(cuts, cuts[1:], strict=False):
            try:
                self.server.dataReceived(raw[start:end])
            except Exception as e:  # whatever escapes must escape from both paths alike
                self.steps.append(("raised", repr(e)))
        self.connect_pending()
        self.record()

    def connect_pending(self) -> None:
        """Upstream connects asked for by later streams succeed at once."""
        while self.cluster.pending:
            pending = self.cluster.pending.pop(0)
            if not pending.deferred.called:  # (not cancelled by a reset meanwhile)
                pending.connect()
                self.upstreams[2 * len(self.upstreams) + 1] = pending.protocol

    def upstream_writes(self, sid: int, payload: bytes) -> None:
        end = self.upstreams.get(sid)
        if end is not None and end.transport is not None and not end.lost:
            end.dataReceived(payload)
        self.record()

    def upstream_eof(self, sid: int) -> None:
        end = self.upstreams.get(sid)
        if end is not None and end.transport is not None and not end.lost:
            end.readConnectionLost()
        self.record()

    def pause(self, sid: int, paused: bool) -> None:
        stream = self.server.streams.get(sid)
        if stream is not None:
            if paused:
                stream.pauseProducing()
            else:
                stream.resumeProducing()
        self.record()

    def sent(self) -> list[Frame]:
        return parse(self.transport.value())

    def record(self) -> None:
        conn = self.server.conn
        self.steps.append({
            "out": self.transport.value(),
            "upstream": {sid: (end.transport.value(), list(end.transport.calls))
                         for sid, end in self.upstreams.items()},
            "state": (self.server.state,
                      re.sub(" at 0x[0-9a-f]+", "", self.server.close_reason or "")),
            "streams": {sid: (s._closed, s._reset and (s._reset.code, s._reset.by_peer),
                              s.bytes_sent, s.bytes_received, s._outbound_size,
                              s._ended_local, s._ended_remote, len(s._inbound))
                        for sid, s in self.server.streams.items()},
            "h2": h2_state(conn),
            "guard": {k: v for k, v in vars(self.server.guard).items()
                      if k not in ("settings", "reactor")},
        })


def window(manager: h2.windows.WindowManager) -> tuple[int, int, int]:
    return manager.max_window_size, manager.current_window_size, manager._bytes_processed


def h2_state(conn: h2.connection.H2Connection) -> Any:
    return (
        conn.state_machine.state,
        conn.outbound_flow_control_window,
        window(conn._inbound_flow_control_window_manager),
        {sid: (s.state_machine.state, s.outbound_flow_control_window,
               window(s._inbound_window_manager), s._actual_content_length)
         for sid, s in conn.streams.items()},
    )


class Scenario:
    """Runs the same actions on a fast and a slow RawServer and compares every step."""

    def __init__(self, test: unittest.TestCase, server_settings: H2Settings = SMALL) -> None:
        self.test = test
        self.fast = RawServer(True, server_settings)
        self.slow = RawServer(False, server_settings)

    def __getattr__(self, name: str) -> Callable[..., None]:
        def both(*args: Any, **kwargs: Any) -> None:
            getattr(self.fast, name)(*args, **kwargs)
            getattr(self.slow, name)(*args, **kwargs)
            self.test.assertEqual(self.fast.steps, self.slow.steps)
        return both


def goaway_code(server: RawServer) -> int | None:
    goaways = [f for f in server.sent() if isinstance(f, GoAwayFrame)]
    return goaways[0].error_code if goaways else None


def resets(server: RawServer) -> dict[int, int]:
    return {f.stream_id: f.error_code for f in server.sent() if isinstance(f, RstStreamFrame)}


class FastPathIsTakenTests(unittest.TestCase):
    """The plain cases do not reach h2's per-frame machinery (else the comparisons are moot)."""

    def test_data_and_window_updates_bypass_h2(self) -> None:
        raw = RawServer(fast=True)
        conn = raw.server.conn
        calls: list[str] = []
        for name in ("receive_data", "send_data", "acknowledge_received_data"):
            original = getattr(conn, name)

            def spy(*args: Any, _name: str = name, _original: Any = original) -> Any:
                calls.append(_name)
                return _original(*args)

            setattr(conn, name, spy)
        raw.receive(data(1, b"hello") + window_update(1, 1000) + window_update(0, 1000))
        raw.upstream_writes(1, b"world")
        self.assertEqual(raw.upstreams[1].transport.value(), b"hello")
        self.assertEqual([f.data for f in raw.sent() if isinstance(f, DataFrame)], [b"world"])
        self.assertEqual(calls, [])

    def test_switched_off_everything_goes_through_h2(self) -> None:
        raw = RawServer(fast=False)
        calls: list[bytes] = []
        original = raw.server.conn.receive_data

        def spy(chunk: bytes) -> Any:
            calls.append(chunk)
            return original(chunk)

        raw.server.conn.receive_data = spy  # type: ignore[method-assign]
        raw.receive(data(1, b"hello"))
        self.assertEqual(calls, [data(1, b"hello")])


class EdgeCaseTests(unittest.TestCase):
    def test_plain_data_both_ways(self) -> None:
        s = Scenario(self)
        s.receive(data(1, b"a" * 100) + data(1, b"b" * 16384))
        s.upstream_writes(1, b"c" * 1000)
        self.assertEqual(s.fast.upstreams[1].transport.value(), b"a" * 100 + b"b" * 16384)
        self.assertEqual(b"".join(f.data for f in s.fast.sent() if isinstance(f, DataFrame)),
                         b"c" * 1000)

    def test_padding_counts_against_flow_control(self) -> None:
        s = Scenario(self)
        s.receive(data(1, b"x" * 100, pad=0) + data(1, b"y" * 100, pad=50) + data(1, b"z"))
        self.assertEqual(s.fast.upstreams[1].transport.value(), b"x" * 100 + b"y" * 100 + b"z")
        # 101 + 151 + 1 flow-controlled bytes consumed and acknowledged.
        manager = s.fast.server.conn._inbound_flow_control_window_manager
        self.assertEqual(manager._bytes_processed, 253)
        self.assertEqual(manager.current_window_size, 65535 - 253)

    def test_malformed_request_reset_after_h2_reset_it(self) -> None:
        """
        A malformed request (no pseudo-headers) ended at once, then HEADERS again on the same
        stream in the same read: h2 resets the stream for the second frame before our handler
        sees the first, whose PROTOCOL_ERROR reset must then be a no-op, not an exception
        out of dataReceived.
        """
        s = Scenario(self)
        s.receive(frame(HEADERS, END_HEADERS | END_STREAM, 3, b"")
                  + frame(HEADERS, END_HEADERS, 3, connect_block(b"127.0.0.1:8080")))
        self.assertEqual([step for step in s.fast.steps if isinstance(step, tuple)], [])
        self.assertEqual(resets(s.fast), {3: ErrorCodes.STREAM_CLOSED})
        self.assertEqual(goaway_code(s.fast), None)
        s.receive(data(1, b"still fine"))  # the other tunnel is unharmed
        self.assertEqual(s.fast.upstreams[1].transport.value(), b"still fine")

    def test_invalid_padding_is_a_protocol_error(self) -> None:
        s = Scenario(self)
        s.receive(frame(DATA, PADDED, 1, b"\x05abc"))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.PROTOCOL_ERROR)

    def test_end_stream_on_data_then_our_end_closes_cleanly(self) -> None:
        s = Scenario(self)
        s.receive(data(1, b"last", END_STREAM))
        self.assertEqual(s.fast.upstreams[1].transport.value(), b"last")
        self.assertTrue(s.fast.upstreams[1].transport.write_closed)
        self.assertEqual(s.fast.server.conn.streams[1].state_machine.state,
                         h2.stream.StreamState.HALF_CLOSED_REMOTE)
        s.upstream_writes(1, b"answer")  # still sent on a half-closed (remote) stream
        s.upstream_eof(1)
        self.assertNotIn(1, s.fast.server.streams)
        sent = [f for f in s.fast.sent() if isinstance(f, DataFrame)]
        self.assertEqual(sent[0].data, b"answer")
        self.assertIn("END_STREAM", sent[-1].flags)
        self.assertEqual(resets(s.fast), {})

    def test_data_after_our_end_is_half_closed_local(self) -> None:
        s = Scenario(self)
        s.upstream_eof(1)
        self.assertEqual(s.fast.server.conn.streams[1].state_machine.state,
                         h2.stream.StreamState.HALF_CLOSED_LOCAL)
        s.receive(data(1, b"more") + data(1, b"", END_STREAM))
        self.assertEqual(s.fast.upstreams[1].transport.value(), b"more")
        self.assertNotIn(1, s.fast.server.streams)

    def test_data_filling_the_window_to_zero_then_beyond(self) -> None:
        s = Scenario(self)
        s.pause(1, True)  # nothing is acknowledged
        s.receive(b"".join(data(1, b"w" * 16383) for _ in range(4)) + data(1, b"w" * 3))
        conn = s.fast.server.conn
        self.assertEqual(conn._inbound_flow_control_window_manager.current_window_size, 0)
        self.assertEqual(conn.streams[1]._inbound_window_manager.current_window_size, 0)
        self.assertIsNone(goaway_code(s.fast))
        s.receive(data(1, b"!"))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.FLOW_CONTROL_ERROR)

    def test_stream_window_exceeded_is_a_flow_control_error(self) -> None:
        # The connection window has room; the stream's does not.
        s = Scenario(self, H2Settings(initial_stream_window_size=65535,
                                      initial_connection_window_size=1024 * KiB,
                                      max_frame_size=16 * KiB))
        s.pause(1, True)
        s.receive(b"".join(data(1, b"w" * 16384) for _ in range(4)))
        s.receive(data(1, b"w" * 16384))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.FLOW_CONTROL_ERROR)

    def test_our_window_to_zero_then_window_update_reopens_it(self) -> None:
        s = Scenario(self)
        s.upstream_writes(1, b"q" * 70000)
        conn = s.fast.server.conn
        self.assertEqual(conn.local_flow_control_window(1), 0)
        sent = sum(len(f.data) for f in s.fast.sent() if isinstance(f, DataFrame))
        self.assertEqual(sent, 65535)
        s.receive(window_update(1, 10000))  # the connection window is still shut
        s.receive(window_update(0, 3000))
        s.receive(window_update(0, 10000))
        sent = sum(len(f.data) for f in s.fast.sent() if isinstance(f, DataFrame))
        self.assertEqual(sent, 70000)
        self.assertEqual(conn.local_flow_control_window(1), 65535 + 10000 - 70000)

    def test_window_update_overflow_on_a_stream_resets_it(self) -> None:
        s = Scenario(self)
        s.receive(window_update(1, 2**31 - 1 - 65535) + window_update(1, 1))
        self.assertEqual(resets(s.fast), {1: ErrorCodes.FLOW_CONTROL_ERROR})
        self.assertIsNone(goaway_code(s.fast))

    def test_window_update_overflow_on_the_connection_is_goaway(self) -> None:
        s = Scenario(self)
        s.receive(window_update(0, 2**31 - 1 - 65535))
        self.assertIsNone(goaway_code(s.fast))
        s.receive(window_update(0, 1))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.FLOW_CONTROL_ERROR)

    def test_zero_increment_on_the_connection_is_a_connection_error(self) -> None:
        s = Scenario(self)
        s.receive(window_update(0, 0))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.PROTOCOL_ERROR)

    def test_zero_increment_on_a_stream_resets_that_stream_only(self) -> None:
        """
        RFC 9113 §6.9: a stream error.  (h2 alone, the path without the fast path, still
        makes it a connection error: the one place where the two paths differ.)
        """
        server = RawServer(True)
        server.open(3)
        server.receive(window_update(1, 0) + data(3, b"other tunnel"))
        self.assertEqual(resets(server), {1: ErrorCodes.PROTOCOL_ERROR})
        self.assertIsNone(goaway_code(server))
        self.assertNotIn(1, server.server.streams)
        self.assertTrue(server.upstreams[1].transport.aborted)
        self.assertEqual(server.upstreams[3].transport.value(), b"other tunnel")
        slow = RawServer(False)
        slow.receive(window_update(1, 0))
        self.assertEqual(goaway_code(slow), ErrorCodes.PROTOCOL_ERROR)

    def test_reset_while_data_is_queued(self) -> None:
        s = Scenario(self)
        s.upstream_writes(1, b"q" * 100000)
        s.receive(frame(RST_STREAM, 0, 1, (ErrorCodes.CANCEL).to_bytes(4, "big")))
        self.assertNotIn(1, s.fast.server.streams)
        self.assertTrue(s.fast.upstreams[1].transport.aborted)
        before = s.fast.transport.value()
        s.receive(window_update(0, 100000) + window_update(1, 100000))
        self.assertEqual(s.fast.transport.value(), before)  # nothing more is sent

    def test_data_on_a_closed_stream_returns_the_connection_window(self) -> None:
        s = Scenario(self)
        s.receive(frame(RST_STREAM, 0, 1, (ErrorCodes.CANCEL).to_bytes(4, "big")))
        s.receive(data(1, b"late" * 1000))
        self.assertEqual(resets(s.fast), {1: ErrorCodes.STREAM_CLOSED})
        manager = s.fast.server.conn._inbound_flow_control_window_manager
        self.assertEqual(manager._bytes_processed, 4000)
        self.assertIsNone(goaway_code(s.fast))

    def test_data_on_an_unknown_stream(self) -> None:
        s = Scenario(self)
        s.receive(data(5, b"who?"))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.PROTOCOL_ERROR)

    def test_oversized_frame(self) -> None:
        s = Scenario(self)
        s.receive(data(1, b"o" * (16 * KiB + 1)))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.FRAME_SIZE_ERROR)

    def test_empty_data_frames_are_still_counted_as_a_flood(self) -> None:
        s = Scenario(self)
        s.receive(data(1, b"x") + data(1, b"") + data(1, b"y"))
        # A DATA frame with a payload (on the fast path) ends a run of empty ones.
        s.receive(data(1, b""))
        s.receive(data(1, b"z"))
        s.receive(data(1, b""))
        self.assertIsNone(goaway_code(s.fast))
        s.receive(data(1, b""))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.ENHANCE_YOUR_CALM)

    def test_window_update_flood_is_still_counted(self) -> None:
        s = Scenario(self)
        s.receive(b"".join(window_update(1, 1) for _ in range(7)))
        self.assertIsNone(goaway_code(s.fast))
        s.receive(window_update(0, 1))
        self.assertEqual(goaway_code(s.fast), ErrorCodes.ENHANCE_YOUR_CALM)

    def test_initial_window_size_changes_and_pings_interleaved(self) -> None:
        s = Scenario(self)
        s.upstream_writes(1, b"s" * 80000)
        s.receive(data(1, b"a") + initial_window(100000) + frame(PING, 0, 0, b"12345678")
                  + data(1, b"b") + window_update(0, 50000))
        s.receive(initial_window(1000) + window_update(1, 100) + data(1, b"c"))
        s.receive(window_update(1, 100000) + window_update(0, 100000))
        self.assertEqual(s.fast.upstreams[1].transport.value(), b"abc")
        self.assertEqual(sum(len(f.data) for f in s.fast.sent() if isinstance(f, DataFrame)),
                         80000)

    def test_headers_for_a_new_stream_between_data_frames(self) -> None:
        s = Scenario(self)
        s.receive(data(1, b"one") + frame(HEADERS, END_HEADERS, 3,
                                          connect_block(b"127.0.0.1:8080")) + data(1, b"two"))
        self.assertEqual(s.fast.upstreams[1].transport.value(), b"onetwo")
        self.assertIn(3, s.fast.server.streams)

    def test_frames_split_at_every_byte_boundary(self) -> None:
        raw = (data(1, b"first") + window_update(1, 5000) + data(1, b"p" * 20, pad=7)
               + frame(PING, 0, 0, b"12345678") + window_update(0, 7000) + initial_window(70000)
               + data(1, b"last", END_STREAM))
        whole = RawServer(fast=True)
        whole.receive(raw)
        expected = whole.steps[-1]
        self.assertEqual(whole.upstreams[1].transport.value(), b"first"
                         + b"p" * 20 + b"last")
        for fast in (True, False):
            for cut in range(1, len(raw)):
                split = RawServer(fast=fast)
                split.receive(raw, [cut])
                self.assertEqual(split.steps[-1], expected, f"cut at {cut}, fast={fast}")

    def test_a_big_frame_arriving_in_pieces_stays_on_the_fast_path(self) -> None:
        raw = RawServer(fast=True)
        payload = bytes(range(256)) * 64
        wire = data(1, payload) + data(1, b"next")
        raw.receive(wire, list(range(1, len(wire), 1000)))
        self.assertEqual(raw.upstreams[1].transport.value(), payload + b"next")
        self.assertEqual(raw.server._rx_parts, [])
        self.assertFalse(raw.server.conn.incoming_buffer._headers_buffer)

    def test_h2_only_ever_gets_whole_frames(self) -> None:
        """After a frame for h2, a cut frame is held back, so later reads stay fast."""
        raw = RawServer(fast=True)
        given: list[bytes] = []
        original = raw.server.conn.receive_data

        def spy(chunk: bytes) -> Any:
            given.append(bytes(chunk))
            return original(chunk)

        raw.server.conn.receive_data = spy  # type: ignore[method-assign]
        ping = frame(PING, 0, 0, b"12345678")
        wire = data(1, b"a") + ping + data(1, b"b" * 1000) + data(1, b"c")
        raw.receive(wire, [len(wire) - 500])
        self.assertEqual(given, [ping])
        self.assertEqual(raw.upstreams[1].transport.value(), b"a" + b"b" * 1000 + b"c")


plain_data = st.tuples(st.just("data"), st.sampled_from([1, 1, 1, 3]),
                       st.sampled_from([1, 100, 100, 5000, 16384, 16384, 0, 16385]),
                       st.sampled_from([0, 0, 0, 0, END_STREAM]),
                       st.sampled_from([None, None, None, 0, 9]))
window_updates = st.tuples(st.just("wu"), st.sampled_from([0, 1, 1, 3]),
                           st.sampled_from([1, 1000, 65535, 65535, 0,
                                            2**31 - 1 - 65535, 2**31 - 1])
                           # A stream's zero increment is where the paths differ on purpose
                           # (test_zero_increment_on_a_stream_resets_that_stream_only).
                           ).filter(lambda wu: wu[1] == 0 or wu[2] != 0)
upstream_writes = st.tuples(st.just("upstream"), st.sampled_from([1, 1, 3]),
                            st.sampled_from([1, 1000, 40000, 100000]))
# Weighted towards the plain traffic the fast path takes; the rest still comes up.
actions = st.one_of(
    plain_data, plain_data, plain_data, plain_data,
    window_updates, window_updates,
    upstream_writes, upstream_writes,
    st.tuples(st.just("ping")),
    st.tuples(st.just("iws"), st.sampled_from([0, 1000, 65535, 200000, 2**31 - 1])),
    st.tuples(st.just("rst"), st.sampled_from([1, 3]), st.sampled_from([0, 8])),
    st.tuples(st.just("open3")),
    st.tuples(st.just("raw"), fuzz_frames),
    st.tuples(st.just("eof"), st.sampled_from([1, 3])),
    st.tuples(st.just("pause"), st.sampled_from([1, 3]), st.booleans()),
)


def inbound(action: tuple[Any, ...]) -> bytes | None:
    kind = action[0]
    if kind == "data":
        _, sid, size, flags, pad = action
        return data(sid, b"d" * size, flags, pad)
    if kind == "wu":
        return window_update(action[1], action[2])
    if kind == "ping":
        return frame(PING, 0, 0, b"12345678")
    if kind == "iws":
        return initial_window(action[1])
    if kind == "rst":
        return frame(RST_STREAM, 0, action[1], action[2].to_bytes(4, "big"))
    if kind == "open3":
        return frame(HEADERS, END_HEADERS, 3, connect_block(b"127.0.0.1:8080"))
    if kind == "raw":
        return action[1]  # type: ignore[no-any-return]
    return None


class EquivalenceTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(actions, min_size=1, max_size=30),
           st.lists(st.integers(0, 70000), max_size=6))
    def test_fast_and_slow_paths_agree(self, script: list[tuple[Any, ...]],
                                       cuts: list[int]) -> None:
        """Random traffic, read in random pieces, has the same effects on either path."""
        s = Scenario(self)
        pending = b""
        for action in script:
            raw = inbound(action)
            if raw is not None:
                pending += raw
                continue
            if pending:
                s.receive(pending, cuts)
                pending = b""
            if action[0] == "upstream":
                s.upstream_writes(action[1], b"u" * action[2])
            elif action[0] == "eof":
                s.upstream_eof(action[1])
            else:
                s.pause(action[1], action[2])
        if pending:
            s.receive(pending, cuts)
        # Nothing a peer sends makes dataReceived raise (on either path).
        self.assertEqual([step for step in s.fast.steps if isinstance(step, tuple)], [])


class H2InternalsTests(unittest.TestCase):
    """
    The fast path reads and writes h2 internals: each one is pinned here, so that an h2
    release that renames or changes one fails loudly, naming it.
    """

    def h2_objects(self) -> dict[str, Any]:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                              (":authority", "a")])
        stream = conn.streams[1]
        return {
            "H2Connection": conn,
            "FrameBuffer": conn.incoming_buffer,
            "H2Stream": stream,
            "H2StreamStateMachine": stream.state_machine,
            "WindowManager": conn._inbound_flow_control_window_manager,
        }

    def test_every_internal_exists(self) -> None:
        objects = self.h2_objects()
        for owner, name in fastpath.H2_INTERNALS:
            self.assertTrue(hasattr(objects[owner], name),
                            f"h2 changed: {owner}.{name} is gone (hbonex.h2.fastpath uses it)")

    def test_state_machine_transitions_relied_on(self) -> None:
        S, In = h2.stream.StreamState, h2.stream.StreamInputs
        table = h2.stream._transitions
        machine = h2.stream.H2StreamStateMachine
        expected = {
            (S.OPEN, In.RECV_DATA): (machine.data_received, S.OPEN),
            (S.HALF_CLOSED_LOCAL, In.RECV_DATA): (machine.data_received, S.HALF_CLOSED_LOCAL),
            (S.OPEN, In.SEND_DATA): (None, S.OPEN),
            (S.HALF_CLOSED_REMOTE, In.SEND_DATA): (None, S.HALF_CLOSED_REMOTE),
            (S.OPEN, In.RECV_WINDOW_UPDATE): (machine.window_updated, S.OPEN),
            (S.HALF_CLOSED_LOCAL, In.RECV_WINDOW_UPDATE):
                (machine.window_updated, S.HALF_CLOSED_LOCAL),
            (S.HALF_CLOSED_REMOTE, In.RECV_WINDOW_UPDATE):
                (machine.window_updated, S.HALF_CLOSED_REMOTE),
        }
        for key, value in expected.items():
            self.assertEqual(table.get(key), value, f"h2 changed the stream transition {key}")
        C, CI = h2.connection.ConnectionState, h2.connection.ConnectionInputs
        conn_table = h2.connection.H2ConnectionStateMachine._transitions
        for state in (C.CLIENT_OPEN, C.SERVER_OPEN):
            for event in (CI.RECV_DATA, CI.SEND_DATA, CI.RECV_WINDOW_UPDATE):
                self.assertEqual(conn_table.get((state, event)), (None, state),
                                 f"h2 changed the connection transition {(state, event)}")

    def test_data_received_and_window_updated_only_make_events(self) -> None:
        objects = self.h2_objects()
        machine = objects["H2StreamStateMachine"]
        machine.headers_received = True
        events = h2.stream.H2StreamStateMachine.data_received(machine, machine.state)
        self.assertEqual([type(e) for e in events], [h2.events.DataReceived])
        events = h2.stream.H2StreamStateMachine.window_updated(machine, machine.state)
        self.assertEqual([type(e) for e in events], [h2.events.WindowUpdated])
        machine.headers_received = False
        self.assertRaises(h2.exceptions.ProtocolError,
                          h2.stream.H2StreamStateMachine.data_received, machine, machine.state)

    def test_window_manager_algorithm(self) -> None:
        """fastpath.acknowledge mirrors h2's WindowManager: compared over many sizes."""
        for max_window in (65535, 4 * 1024 * 1024):
            for step in (1, 1000, 16384, 65535):
                ours = self.h2_objects()
                theirs = self.h2_objects()
                for c in (ours, theirs):
                    conn = c["H2Connection"]
                    for m in (conn._inbound_flow_control_window_manager,
                              conn.streams[1]._inbound_window_manager):
                        m.max_window_size = m.current_window_size = max_window
                for _ in range(300):
                    for c in (ours, theirs):
                        conn = c["H2Connection"]
                        for m in (conn._inbound_flow_control_window_manager,
                                  conn.streams[1]._inbound_window_manager):
                            m.window_consumed(min(step, m.current_window_size))
                    conn = ours["H2Connection"]
                    if not fastpath.acknowledge(conn, 1, step):
                        conn.acknowledge_received_data(step, 1)
                    theirs["H2Connection"].acknowledge_received_data(step, 1)
                    for c in (ours, theirs):
                        c["sent"] = c["H2Connection"].data_to_send()
                    self.assertEqual(h2_state(ours["H2Connection"]),
                                     h2_state(theirs["H2Connection"]))
                    self.assertEqual(ours["sent"], theirs["sent"])

    def test_data_frame_bytes_match_h2s(self) -> None:
        ours = self.h2_objects()["H2Connection"]
        theirs = self.h2_objects()["H2Connection"]
        ours.data_to_send()
        theirs.data_to_send()
        out: list[Any] = []
        queue: list[Any] = [b"x" * 100, b"y" * 20000]
        sent = fastpath.send(ours, ours.streams[1], queue, out)
        self.assertEqual(sent, (20100, 3))  # 65535-byte windows, 16384-byte frames
        theirs.send_data(1, b"x" * 100)
        theirs.send_data(1, b"y" * 16384)
        theirs.send_data(1, b"y" * 3616)
        self.assertEqual(b"".join(out), theirs.data_to_send())
        self.assertEqual(h2_state(ours), h2_state(theirs))
        self.assertEqual(queue, [])

    def test_buffer_attribute_is_the_partial_frame(self) -> None:
        buffer = FrameBuffer(server=False)
        buffer.add_data(b"\x00\x00")
        self.assertTrue(getattr(buffer, fastpath._BUFFER_DATA),
                        "h2 changed where FrameBuffer keeps a partial frame")

    def test_connection_switch_defaults_on(self) -> None:
        self.assertTrue(H2TunnelConnection.fast_path)
