"""
Sending a HEADERS block without h2's per-call machinery: a tunnel's CONNECT request (client)
and its 200 (server).

h2's ``send_headers`` walks the headers three times (UTF-8 coercion, the informational check,
frame building), logs twice through a dummy logger, builds HEADERS/CONTINUATION frame objects
and serializes them: at one tunnel per call that was a tenth of a proxy's CPU per new tunnel.
:func:`send_headers` makes the same state transitions through h2's own state machines, in
h2's order (connection, then stream, then encoding, since HPACK's state changes for good),
encodes with the connection's encoder (so the dynamic table stays in step with the peer's),
and writes the frames' bytes straight into h2's send buffer.

It takes what our callers build: bytes names and values, no priority, and (on a server) no
informational (1xx) response; anything else goes to h2.  Outbound header validation and
normalization are off in hbonex's H2Configuration, so h2 would not touch the list either.

Every h2 internal used here is listed in :data:`H2_INTERNALS` and pinned by
tests/test_h2_fastheaders.py, which also compares bytes and state with h2's own path.
"""

from __future__ import annotations

from typing import Any, Sequence

import h2.connection
import h2.exceptions
import h2.stream

from hbonex.h2.fastpath import FRAME_HEADER

_HEADERS = 0x1
_CONTINUATION = 0x9
_END_STREAM = 0x1
_END_HEADERS = 0x4

_SEND_HEADERS = h2.connection.ConnectionInputs.SEND_HEADERS
_STREAM_SEND_HEADERS = h2.stream.StreamInputs.SEND_HEADERS
_STREAM_SEND_END_STREAM = h2.stream.StreamInputs.SEND_END_STREAM

#: (owner, attribute) of every h2 internal used here.
H2_INTERNALS: tuple[tuple[str, str], ...] = (
    ("H2Connection", "streams"),
    ("H2Connection", "state_machine"),
    ("H2Connection", "remote_settings"),
    ("H2Connection", "open_outbound_streams"),
    ("H2Connection", "_get_or_create_stream"),
    ("H2Connection", "encoder"),
    ("H2Connection", "_data_to_send"),
    ("H2Stream", "state_machine"),
    ("H2Stream", "max_outbound_frame_size"),
    ("H2Stream", "_authority"),
    ("H2Stream", "request_method"),
    ("H2StreamStateMachine", "client"),
    ("H2StreamStateMachine", "trailers_sent"),
)


def send_headers(
    conn: h2.connection.H2Connection,
    stream_id: int,
    headers: Sequence[tuple[bytes, bytes]],
    end_stream: bool = False,
) -> None:
    """
    ``conn.send_headers(stream_id, headers, end_stream)`` for bytes headers, no priority.
    """
    client = conn.config.client_side
    if not client and _informational(headers):
        # Informational: h2's own path has the extra rules.
        conn.send_headers(stream_id, headers, end_stream=end_stream)
        return
    if stream_id not in conn.streams:
        # h2's check, with its side effect: counting forgets closed streams.
        limit = conn.remote_settings.max_concurrent_streams
        count = conn.open_outbound_streams
        if count + 1 > limit:
            raise h2.exceptions.TooManyStreamsError(
                f"Max outbound streams is {limit}, {count} open"
            )
    conn.state_machine.process_input(_SEND_HEADERS)
    stream = conn._get_or_create_stream(stream_id, h2.connection.AllowedStreamIDs(client))
    machine = stream.state_machine
    machine.process_input(_STREAM_SEND_HEADERS)
    block: bytes = conn.encoder.encode(headers)
    if end_stream:
        machine.process_input(_STREAM_SEND_END_STREAM)
    if machine.trailers_sent and not end_stream:
        raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
    if machine.client and stream._authority is None:
        stream._authority = _value(headers, b":authority")
    stream.request_method = _value(headers, b":method")
    conn._data_to_send += _frames(stream_id, block, stream.max_outbound_frame_size or 0,
                                  end_stream)


def _frames(stream_id: int, block: bytes, size: int, end_stream: bool) -> bytes:
    """A HEADERS frame, then CONTINUATION frames if the block is larger than ``size``."""
    flags = _END_STREAM if end_stream else 0
    if len(block) <= size:
        head = FRAME_HEADER.pack(len(block) << 8 | _HEADERS, flags | _END_HEADERS, stream_id)
        return head + block
    out = []
    kind = _HEADERS
    for i in range(0, len(block), size):
        chunk = block[i:i + size]
        if i + size >= len(block):
            flags |= _END_HEADERS
        out.append(FRAME_HEADER.pack(len(chunk) << 8 | kind, flags, stream_id))
        out.append(chunk)
        kind, flags = _CONTINUATION, 0
    return b"".join(out)


def _value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> Any:
    # h2's authority_from_headers / extract_method_header: the first such header.
    for n, v in headers:
        if n == name:
            return v
    return None


def _informational(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    # h2's is_informational_response: a 1xx :status among the leading pseudo-headers.
    for n, v in headers:
        if n[:1] != b":":
            return False
        if n == b":status":
            return v[:1] == b"1"
    return False
