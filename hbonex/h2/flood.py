"""
HTTP/2 flood defences, after Envoy's ``http2_protocol_options`` (same names, same defaults).

A peer can make a proxy spend memory or CPU without sending any real traffic: frames that cost
nothing to send but something to answer (PING, SETTINGS, PRIORITY, WINDOW_UPDATE, empty
DATA), a header block spread over endless CONTINUATION frames, streams opened only to be
reset, or all of that while never reading what we answer.  Each is counted here per
connection; past its limit the connection ends with GOAWAY(ENHANCE_YOUR_CALM), or, for a peer
that stopped reading, is aborted.
"""

from __future__ import annotations

import struct
from typing import Any

from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from hbonex.h2.settings import H2Settings

#: Frame types that cost us a frame in reply or are pure control (PING, SETTINGS,
#: RST_STREAM, GOAWAY, WINDOW_UPDATE, PRIORITY).
_CONTROL_TYPES = frozenset({0x2, 0x3, 0x4, 0x6, 0x7, 0x8})
_HEADER = struct.Struct(">I")
#: A stream reset within this many seconds of opening is premature (rapid reset, as Envoy's
#: premature_reset_min_stream_lifetime_seconds).
PREMATURE_RESET_WINDOW = 1.0
#: Premature resets tolerated before the ratio counts (Envoy's premature_reset_total_stream_count
#: is 500 with a 1 s window; a hundred already shows intent).
PREMATURE_RESET_MIN = 100


class Flood(DenialOfServiceError):
    """
    A peer exceeded a flood limit: h2 answers GOAWAY(ENHANCE_YOUR_CALM) for this error.
    ``stat`` names the ``http2.*`` counter it counts in (Envoy's names).
    """

    error_code = ErrorCodes.ENHANCE_YOUR_CALM

    def __init__(self, message: str, stat: str) -> None:
        super().__init__(message)
        self.stat = stat


class LimitedFrameBuffer(FrameBuffer):
    """
    h2's frame buffer, refusing a header block (HEADERS + CONTINUATION) larger than
    ``max_header_block`` bytes as it arrives.  h2 only counts CONTINUATION *frames* (64), so
    with 1 MiB frames one stream could make us buffer 64 MiB of header block.
    """

    def __init__(self, server: bool, max_header_block: int) -> None:
        super().__init__(server=server)
        self.max_header_block = max_header_block

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, (HeadersFrame, PushPromiseFrame, ContinuationFrame)):
            size = len(f.data) + sum(len(x.data) for x in self._headers_buffer)
            if size > self.max_header_block:
                self._headers_buffer = []  # the memory goes now, not with the connection
                raise Flood(
                    f"header block of more than {self.max_header_block} bytes "
                    "(max_request_headers_kb)", "header_overflow",
                )
        return super()._update_header_buffer(f)  # type: ignore[no-any-return]


class FloodGuard:
    """
    The counters of one connection.  ``received`` sees every frame h2 hands on (raising
    :class:`Flood`); ``queued`` sees what we write while the peer is not reading.
    """

    def __init__(self, settings: H2Settings, reactor: Any, server: bool) -> None:
        self.settings = settings
        self.reactor = reactor
        self.server = server
        self.opened_streams = 0
        self.data_frames_sent = 0
        self.window_updates = 0
        self.priority_frames = 0
        self.consecutive_empty = 0
        self.premature_resets = 0
        self._opened_at: dict[int, float] = {}
        self.queued_frames = 0
        self.queued_control_frames = 0

    # -- inbound ------------------------------------------------------------------------------

    def received(self, frame: Frame, new_stream: bool) -> None:
        s = self.settings
        if isinstance(frame, (DataFrame, HeadersFrame)):
            if not frame.data and "END_STREAM" not in frame.flags:
                self.consecutive_empty += 1
                if self.consecutive_empty > s.max_consecutive_inbound_frames_with_empty_payload:
                    raise Flood(f"{self.consecutive_empty} consecutive frames with an empty "
                                "payload (max_consecutive_inbound_frames_with_empty_payload)",
                                "inbound_empty_frames_flood")
            else:
                self.consecutive_empty = 0
            if isinstance(frame, HeadersFrame) and new_stream:
                self.stream_opened(frame.stream_id)
        elif isinstance(frame, PriorityFrame):
            self.priority_frames += 1
            limit = 5 + 2 * (
                self.opened_streams
                + s.max_inbound_priority_frames_per_stream * self.opened_streams
            )
            if self.priority_frames > limit:
                raise Flood(f"{self.priority_frames} PRIORITY frames for "
                            f"{self.opened_streams} streams "
                            "(max_inbound_priority_frames_per_stream)",
                            "inbound_priority_frames_flood")
        elif isinstance(frame, WindowUpdateFrame):
            self.window_updates += 1
            limit = self._window_update_limit()
            if self.window_updates > limit:
                raise Flood(f"{self.window_updates} WINDOW_UPDATE frames for "
                            f"{self.data_frames_sent} DATA frames sent "
                            "(max_inbound_window_update_frames_per_data_frame_sent)",
                            "inbound_window_update_frames_flood")
        elif isinstance(frame, RstStreamFrame):
            why = self.stream_reset(frame.stream_id, frame.error_code)
            if why is not None:
                raise Flood(why, "premature_reset")

    def _window_update_limit(self) -> int:
        return 5 + 2 * (
            self.opened_streams
            + self.settings.max_inbound_window_update_frames_per_data_frame_sent
            * self.data_frames_sent
        )

    def window_update_allowed(self) -> bool:
        """Whether one more WINDOW_UPDATE stays within the limit (the fast path's check)."""
        return self.window_updates < self._window_update_limit()

    def stream_opened(self, stream_id: int) -> None:
        self.opened_streams += 1
        if self.server:
            opened_at = self._opened_at
            if len(opened_at) >= 1024:
                # Only young streams matter: forget the others (bounded memory).
                horizon = self.reactor.seconds() - PREMATURE_RESET_WINDOW
                for sid in [k for k, t in opened_at.items() if t < horizon]:
                    del opened_at[sid]
            opened_at[stream_id] = self.reactor.seconds()

    def stream_reset(self, stream_id: int, code: int) -> str | None:
        """
        A stream reset by either side (not the RST_STREAM(NO_ERROR) that closes a stream we
        answered in full).  Streams opened and reset within a second, for more than half of
        all streams, are a rapid-reset attack (CVE-2023-44487) or a peer making us reset
        streams for it: returns why the connection must go, or None.
        """
        opened = self._opened_at.pop(stream_id, None)
        if opened is None or code == ErrorCodes.NO_ERROR:
            return None
        if self.reactor.seconds() - opened > PREMATURE_RESET_WINDOW:
            return None
        self.premature_resets += 1
        if (
            self.premature_resets >= PREMATURE_RESET_MIN
            and self.premature_resets * 2 >= self.opened_streams
        ):
            return (f"{self.premature_resets} of {self.opened_streams} streams reset "
                    f"within {PREMATURE_RESET_WINDOW:g}s of opening (rapid reset)")
        return None

    # -- outbound -----------------------------------------------------------------------------

    def queued(self, data: bytes) -> str | None:
        """
        ``data`` (whole frames) was written while the transport is full (the peer is not
        reading): count its frames.  Returns why the connection must go, or None.
        """
        view = memoryview(data)
        offset = 0
        while offset + 9 <= len(view):
            header = _HEADER.unpack_from(view, offset)[0]
            length, kind = header >> 8, header & 0xFF
            self.queued_frames += 1
            if kind in _CONTROL_TYPES:
                self.queued_control_frames += 1
            offset += 9 + length
        s = self.settings
        if self.queued_control_frames > s.max_outbound_control_frames:
            return (f"{self.queued_control_frames} control frames queued for a peer that is "
                    "not reading (max_outbound_control_frames)")
        if self.queued_frames > s.max_outbound_frames:
            return (f"{self.queued_frames} frames queued for a peer that is not reading "
                    "(max_outbound_frames)")
        return None

    def drained(self) -> None:
        """The transport took everything queued (it resumed us)."""
        self.queued_frames = 0
        self.queued_control_frames = 0


__all__ = ["Flood", "FloodGuard", "LimitedFrameBuffer"]
