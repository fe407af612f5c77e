"""
HTTP/2 settings for tunnel connections; the defaults are ztunnel's.
"""

from __future__ import annotations

import attrs

KiB = 1024
MiB = 1024 * KiB


@attrs.frozen
class H2Settings:
    """
    What one side of an HBONE HTTP/2 connection advertises and enforces.
    """

    #: SETTINGS_INITIAL_WINDOW_SIZE: how much each stream may have in flight towards us.
    initial_stream_window_size: int = 4 * MiB
    #: Our connection-level receive window (raised from 64 KiB with a WINDOW_UPDATE).
    initial_connection_window_size: int = 16 * MiB
    #: SETTINGS_MAX_FRAME_SIZE: the largest DATA frame we accept.
    max_frame_size: int = 1 * MiB
    #: SETTINGS_MAX_CONCURRENT_STREAMS we advertise (peer-initiated streams).
    max_concurrent_streams: int = 200
    #: SETTINGS_MAX_HEADER_LIST_SIZE, and the cap on a received header block's size in bytes
    #: (HEADERS + CONTINUATION), checked as it arrives: Envoy's max_request_headers_kb, 60 KiB.
    max_header_list_size: int = 60 * KiB
    #: PING keepalive: interval between PINGs on an idle-looking connection, 0 disables.
    keepalive_interval: float = 10.0
    #: Close the connection when a PING is not acknowledged within this time.
    keepalive_timeout: float = 20.0

    # Flood defences, with Envoy's http2_protocol_options names and defaults.
    #: Frames queued towards a peer that does not read, before the connection is closed.
    max_outbound_frames: int = 10000
    #: Of those, control frames (PING and SETTINGS acks, RST_STREAM, GOAWAY).
    max_outbound_control_frames: int = 1000
    #: Consecutive DATA/HEADERS frames with an empty payload and no END_STREAM
    #: (CVE-2019-9518).
    max_consecutive_inbound_frames_with_empty_payload: int = 1
    #: PRIORITY frames per stream opened (plus 1 before any stream).
    max_inbound_priority_frames_per_stream: int = 100
    #: WINDOW_UPDATE frames per DATA frame we sent (plus 10).
    max_inbound_window_update_frames_per_data_frame_sent: int = 10

    def __attrs_post_init__(self) -> None:
        if not 65535 <= self.initial_stream_window_size <= 2**31 - 1:
            raise ValueError("initial_stream_window_size must be between 65535 and 2^31-1")
        if not 65535 <= self.initial_connection_window_size <= 2**31 - 1:
            raise ValueError("initial_connection_window_size must be between 65535 and 2^31-1")
        if not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("max_frame_size must be between 16384 and 2^24-1")
        if self.max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")
