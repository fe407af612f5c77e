"""
What is known about one request or connection as it runs (Envoy's StreamInfo): response code
and flags, byte counts, the upstream, and filter state that filters leave for later filters,
for access logs, and across an internal-listener hop.
"""

from __future__ import annotations

import enum
import time
from typing import Any

import attrs


class SharedWithUpstream(enum.Enum):
    """Envoy's StreamSharing: whether a filter state object crosses to the upstream side."""

    #: Stays here.
    NONE = "NONE"
    #: Copied to the connection the upstream hop creates, as NONE there.
    ONCE = "ONCE"
    #: Copied on every hop.
    TRANSITIVE = "TRANSITIVE"


def existing_filter_state(info: Any) -> FilterState | None:
    """
    A connection's filter state without making one: ``ConnectionInfo`` makes it on first
    access, and a per-connection reader that only looks must not (memory per idle tunnel).
    """
    existing = getattr(info, "existing_filter_state", None)
    if existing is not None:
        return existing()  # type: ignore[no-any-return]
    return getattr(info, "filter_state", None)


def existing_dynamic_metadata(info: Any) -> dict[str, dict[str, Any]] | None:
    """A connection's dynamic metadata without making it (see existing_filter_state)."""
    existing = getattr(info, "existing_dynamic_metadata", None)
    if existing is not None:
        return existing()  # type: ignore[no-any-return]
    return getattr(info, "dynamic_metadata", None)


class FilterStateError(Exception):
    pass


@attrs.define
class _Entry:
    value: Any
    shared: SharedWithUpstream
    read_only: bool


class FilterState:
    """
    Named objects a filter stores for others (Envoy's FilterState), e.g. Istio's
    ``io.istio.peer_principal``.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def set_data(
        self,
        key: str,
        value: Any,
        shared: SharedWithUpstream = SharedWithUpstream.NONE,
        read_only: bool = False,
    ) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.read_only:
            raise FilterStateError(f"filter state {key!r} is read-only")
        self._entries[key] = _Entry(value, shared, read_only)

    def get_data(self, key: str) -> Any:
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def has_data(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def is_empty(self) -> bool:
        """Nothing stored (most connections): callers skip work per tunnel."""
        return not self._entries

    def shared_with_upstream(self, *more: FilterState | None) -> FilterState | None:
        """
        What the next hop's connection starts with: ONCE objects arrive as NONE, TRANSITIVE
        ones stay TRANSITIVE; None when nothing is shared (most tunnels: no copy per tunnel).
        ``more`` are narrower scopes shared too, each over the ones before it (a request's
        state over its connection's, as Envoy's stream filter state sits on its
        connection's).
        """
        upstream: FilterState | None = None
        for state in (self, *more):
            if state is None:
                continue
            for key, entry in state._entries.items():
                if entry.shared is SharedWithUpstream.NONE:
                    continue
                if upstream is None:
                    upstream = FilterState()
                shared = (SharedWithUpstream.NONE if entry.shared is SharedWithUpstream.ONCE
                          else entry.shared)
                upstream._entries[key] = _Entry(entry.value, shared, entry.read_only)
        return upstream


@attrs.define
class StreamInfo:
    """
    One request's facts, for filters and access logs.
    """

    start_time: float = attrs.Factory(time.time)
    response_code: int | None = None
    #: Why the response is what it is (Envoy's response_code_details), e.g. "route_not_found".
    response_code_details: str = ""
    #: Envoy's short response flags: UF, UH, UO, NR, UT, URX, DC, UC, DENY (as "RBAC")...
    response_flags: set[str] = attrs.Factory(set)
    bytes_received: int = 0
    bytes_sent: int = 0
    upstream_host: str = ""
    upstream_cluster: str = ""
    #: The downstream request's protocol ("HTTP/1.1", "HTTP/2"): %PROTOCOL%, and the
    #: upstream's for a cluster with use_downstream_protocol_config.
    protocol: str = ""
    route_name: str = ""
    filter_state: FilterState = attrs.Factory(FilterState)
    dynamic_metadata: dict[str, dict[str, Any]] = attrs.Factory(dict)
    #: Set by the istio.stats filter: reports Istio's request metrics for this request in
    #: place of the connection manager's defaults (called with the FilterManager first, then
    #: istio_metrics.request_done's arguments).
    istio_stats: Any = None

    def flags_text(self) -> str:
        """``%RESPONSE_FLAGS%``: the flags joined with ',', or '-'."""
        return ",".join(sorted(self.response_flags)) or "-"


__all__ = ["FilterState", "FilterStateError", "SharedWithUpstream", "StreamInfo"]
