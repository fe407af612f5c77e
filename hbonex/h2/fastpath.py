"""
The fast path for established streams: DATA and WINDOW_UPDATE frames without h2's per-frame
machinery.

For a tunnel's bulk and request/response traffic almost every frame is DATA on an open stream
or a WINDOW_UPDATE, and h2 spends a dozen Python calls on each (frame objects, two state
machines, window managers, events).  Here those frames are parsed and sent with one struct
call and the same bookkeeping h2 does, written straight into h2's own state, so that h2 stays
exact for everything it still handles: any frame or state that is not the plain case (padding,
END_STREAM, an empty DATA frame, an unknown or closed stream, a window that would overflow or
underflow, a zero increment on the connection, a frame beyond the maximum size...) is left to
h2, in order.  (A zero increment on a stream is reset here, as a stream error.)

Every h2 internal used here is listed in :data:`H2_INTERNALS` and pinned by
tests/test_h2_fastpath.py.
"""

from __future__ import annotations

import struct
from typing import Any, Union

import h2.connection
import h2.stream
from h2.frame_buffer import FrameBuffer

from hbonex.h2.flood import FloodGuard

#: A frame header: length << 8 | type, flags, stream id (RFC 9113 §4.1).
FRAME_HEADER = struct.Struct(">IBI")
_U32 = struct.Struct(">I")
MAX_WINDOW = 2**31 - 1
_DATA = 0x0
_WINDOW_UPDATE = 0x8
#: DATA flags the fast path leaves to h2: END_STREAM (a state change) and PADDED.
_SLOW_DATA_FLAGS = 0x1 | 0x8

_OPEN = h2.stream.StreamState.OPEN
_HALF_CLOSED_LOCAL = h2.stream.StreamState.HALF_CLOSED_LOCAL
_HALF_CLOSED_REMOTE = h2.stream.StreamState.HALF_CLOSED_REMOTE
_CONN_OPEN = (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN)
_STREAM_OPEN = h2.stream.STREAM_OPEN
#: h2 4.1 keeps a partial frame in FrameBuffer.data, later releases in ._data.
_BUFFER_DATA = "_data" if "_data" in vars(FrameBuffer()) else "data"

#: (owner, attribute) of every h2 internal the fast path reads or writes.
H2_INTERNALS: tuple[tuple[str, str], ...] = (
    ("H2Connection", "incoming_buffer"),
    ("H2Connection", "state_machine"),
    ("H2Connection", "streams"),
    ("H2Connection", "max_inbound_frame_size"),
    ("H2Connection", "outbound_flow_control_window"),
    ("H2Connection", "_inbound_flow_control_window_manager"),
    ("H2Connection", "_data_to_send"),
    ("FrameBuffer", _BUFFER_DATA),
    ("FrameBuffer", "_preamble_len"),
    ("FrameBuffer", "_headers_buffer"),
    ("H2Stream", "state_machine"),
    ("H2Stream", "outbound_flow_control_window"),
    ("H2Stream", "_inbound_window_manager"),
    ("H2Stream", "_expected_content_length"),
    ("H2Stream", "_actual_content_length"),
    ("H2StreamStateMachine", "state"),
    ("H2StreamStateMachine", "headers_received"),
    ("WindowManager", "max_window_size"),
    ("WindowManager", "current_window_size"),
    ("WindowManager", "_bytes_processed"),
)

#: A received frame taken by the fast path: (stream id, DATA payload, flow-controlled length)
#: or, for a WINDOW_UPDATE, (stream id, None, increment); a zero increment on a stream is a
#: stream error for the caller to reset.
Item = tuple[int, Union[bytes, None], int]
Chunk = Union[bytes, memoryview]


def ready(conn: Any) -> bool:
    """
    Whether the next received bytes may be parsed here: h2 holds no partial frame or header
    block, the preface is behind us and the connection is open.
    """
    buf = conn.incoming_buffer
    return (
        not getattr(buf, _BUFFER_DATA)
        and not buf._preamble_len
        and not buf._headers_buffer
        and conn.state_machine.state in _CONN_OPEN
    )


def receive(conn: Any, guard: FloodGuard, data: bytes) -> tuple[int, list[Item], int, int]:
    """
    Take the plain DATA and WINDOW_UPDATE frames at the start of ``data``, doing h2's
    accounting for them.  Returns ``(taken, frames, h2_end, need)``: ``data[:taken]`` was
    taken (as ``frames``), ``data[taken:h2_end]`` is for h2, and the rest, the beginning of a
    frame, is to be held until ``need`` bytes of it are here.  Only whole frames go to h2:
    a partial frame in h2's buffer would keep every later read off the fast path.
    """
    items: list[Item] = []
    streams = conn.streams
    max_size = conn.max_inbound_frame_size
    conn_window = conn._inbound_flow_control_window_manager
    end = len(data)
    offset = 0
    while end - offset >= 9:
        head, flags, sid = FRAME_HEADER.unpack_from(data, offset)
        length = head >> 8
        if length > max_size or end - offset < 9 + length:
            break  # h2's FRAME_SIZE_ERROR, or a partial frame
        kind = head & 0xFF
        sid &= 0x7FFFFFFF
        if kind == _DATA:
            # Empty DATA frames are counted by the flood guard (via h2): left to it.
            if not length or flags & _SLOW_DATA_FLAGS:
                break
            stream = streams.get(sid)
            if stream is None:
                break
            machine = stream.state_machine
            state = machine.state
            if state is not _OPEN and state is not _HALF_CLOSED_LOCAL:
                break
            if not machine.headers_received:
                break  # h2's PROTOCOL_ERROR
            stream_window = stream._inbound_window_manager
            if (
                length > conn_window.current_window_size
                or length > stream_window.current_window_size
                or stream._expected_content_length is not None
            ):
                break  # FLOW_CONTROL_ERROR or content-length checks: h2's
            # h2's _receive_data_frame + H2Stream.receive_data, and FloodGuard.received.
            conn_window.current_window_size -= length
            stream_window.current_window_size -= length
            stream._actual_content_length += length
            guard.consecutive_empty = 0
            start = offset + 9
            items.append((sid, data[start:start + length], length))
        elif kind == _WINDOW_UPDATE:
            if length != 4 or not guard.window_update_allowed():
                break
            increment = _U32.unpack_from(data, offset + 9)[0] & 0x7FFFFFFF
            if not increment and not sid:
                break  # the connection's PROTOCOL_ERROR: h2's
            if sid:
                stream = streams.get(sid)
                if stream is None:
                    break
                state = stream.state_machine.state
                if (state is not _OPEN and state is not _HALF_CLOSED_LOCAL
                        and state is not _HALF_CLOSED_REMOTE):
                    break
                if not increment:
                    # RFC 9113 §6.9: a stream error (h2 would fail the whole connection, and
                    # every other tunnel on it): an item with a zero increment says reset it.
                    guard.window_updates += 1
                    items.append((sid, None, 0))
                    offset += 9 + length
                    continue
                window = stream.outbound_flow_control_window + increment
                if window > MAX_WINDOW:
                    break  # the stream's FLOW_CONTROL_ERROR: h2's
                stream.outbound_flow_control_window = window
            else:
                window = conn.outbound_flow_control_window + increment
                if window > MAX_WINDOW:
                    break
                conn.outbound_flow_control_window = window
            guard.window_updates += 1
            items.append((sid, None, increment))
        else:
            break
        offset += 9 + length
    # The rest: whole frames for h2, then a partial one to hold.
    taken = offset
    while True:
        left = end - offset
        if left < 9:
            return taken, items, offset, 9 if left else 0
        length = data[offset] << 16 | data[offset + 1] << 8 | data[offset + 2]
        if length > max_size:
            return taken, items, end, 0  # h2 fails the connection for it
        if left < 9 + length:
            return taken, items, offset, 9 + length
        offset += 9 + length


def acknowledge(conn: Any, stream_id: int, size: int) -> bool:
    """
    h2's acknowledge_received_data when it would send no WINDOW_UPDATE (its window managers
    update once half a window is consumed, or at once for an exhausted window): the bytes are
    counted where h2 counts them.  False when h2 must do it (an update is due, or the stream
    is not open).
    """
    stream = conn.streams.get(stream_id)
    if stream is None or not _STREAM_OPEN[stream.state_machine.state]:
        return False
    conn_window = conn._inbound_flow_control_window_manager
    stream_window = stream._inbound_window_manager
    conn_processed = conn_window._bytes_processed + size
    stream_processed = stream_window._bytes_processed + size
    if (
        conn_processed >= conn_window.max_window_size // 2
        or stream_processed >= stream_window.max_window_size // 2
        or not conn_window.current_window_size
        or not stream_window.current_window_size
    ):
        return False
    conn_window._bytes_processed = conn_processed
    stream_window._bytes_processed = stream_processed
    return True


def sendable(conn: Any, stream_id: int) -> Any:
    """
    h2's stream when DATA may be sent on it without h2's checks (both state machines accept
    SEND_DATA without a transition), else None.
    """
    if conn.state_machine.state not in _CONN_OPEN:
        return None
    stream = conn.streams.get(stream_id)
    if stream is None:
        return None
    state = stream.state_machine.state
    if state is _OPEN or state is _HALF_CLOSED_REMOTE:
        return stream
    return None


def send(conn: Any, stream: Any, queue: list[Chunk], out: list[Chunk]) -> tuple[int, int]:
    """
    DATA frames from ``queue`` as far as the windows and the peer's maximum frame size allow,
    appended to ``out`` (after whatever h2 had queued, to keep the order); the windows are
    debited as h2's send_data does.  Returns (bytes, frames) sent.
    """
    window = min(conn.outbound_flow_control_window, stream.outbound_flow_control_window)
    if window <= 0:
        return 0, 0
    pending = conn._data_to_send
    if pending:
        out.append(conn.data_to_send())
    max_frame = conn.max_outbound_frame_size
    sid = stream.stream_id
    sent = frames = 0
    while queue and sent < window:
        chunk = queue[0]
        n = len(chunk)
        size = min(n, window - sent, max_frame)
        if size < n:
            view = memoryview(chunk)  # no copies of the rest of a big write
            queue[0] = view[size:]
            chunk = view[:size]
        else:
            del queue[0]
        out.append(FRAME_HEADER.pack(size << 8, 0, sid))
        out.append(chunk)
        sent += size
        frames += 1
    conn.outbound_flow_control_window -= sent
    stream.outbound_flow_control_window -= sent
    return sent, frames


__all__ = ["FRAME_HEADER", "H2_INTERNALS", "MAX_WINDOW", "acknowledge", "ready", "receive", "send",
           "sendable"]
