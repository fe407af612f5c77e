"""
``envoy.filters.http.grpc_stats``: Envoy's gRPC statistics.  For each gRPC request
(``content-type: application/grpc...``) it counts, under the route's cluster,
``cluster.<cluster>.grpc.[<service>.<method>.]{success,failure,total}`` from the response's
``grpc-status`` (trailers, or the headers of a trailers-only response), and the messages each
way (``request_message_count``, ``response_message_count``, from gRPC's 5-byte message
prefixes).  With ``emit_filter_state`` the counts are also left in filter state under the
filter's name (``request_message_count,response_message_count``).

Per-method names are used for the methods in ``individual_method_stats_allowlist``, or every
method with ``stats_for_all_methods`` (unknown ones then count under
``cluster.<cluster>.grpc.*`` only as Envoy does: without the prefix).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.http.filter_manager import FilterDataStatus, FilterHeadersStatus, FilterTrailersStatus
from hbonex.http.headers import Headers
from hbonex.http.pass_through import PassThroughFilter
from hbonex.http.stream_info import FilterStateError
from hbonex.interfaces import IHTTPFilterExtension, IStreamFilter
from hbonex.observability.stats import STATS

NAME = "envoy.filters.http.grpc_stats"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
#: grpc-status OK; anything else, or none at all, is a failure.
_OK = b"0"


@attrs.frozen
class GrpcStatsConfig:
    emit_filter_state: bool = False
    all_methods: bool = False
    #: service -> method names with their own stats.
    allowlist: tuple[tuple[str, frozenset[str]], ...] = ()
    replace_dots: bool = False


@attrs.define
class MessageCounts:
    """The filter state object: ``request_message_count,response_message_count``."""

    request_message_count: int = 0
    response_message_count: int = 0

    def __str__(self) -> str:
        return f"{self.request_message_count},{self.response_message_count}"


class _Frames:
    """Counts gRPC messages in a byte stream (each: 1 flag byte, 4 length bytes, data)."""

    def __init__(self) -> None:
        self.count = 0
        self._header = b""
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                continue
            need = 5 - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == 5:
                self.count += 1
                self._remaining = int.from_bytes(self._header[1:], "big")
                self._header = b""


@implementer(IStreamFilter)
class GrpcStatsFilter(PassThroughFilter):
    """One per request."""

    def __init__(self, config: GrpcStatsConfig) -> None:
        self.config = config
        self.decoder: Any = None
        self.grpc = False
        self.prefix: str | None = None
        self.counts = MessageCounts()
        self._requests = _Frames()
        self._responses = _Frames()
        self._charged = False

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder = callbacks

    def _method(self, path: bytes) -> str:
        """``<service>.<method>.`` when this method has its own stats, else ''."""
        parts = path.decode("latin-1").split("?", 1)[0].split("/")
        if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
            return ""
        service, method = parts[1], parts[2]
        allowed = dict(self.config.allowlist)
        if not self.config.all_methods and method not in allowed.get(service, ()):
            return ""
        if self.config.replace_dots:
            service = service.replace(".", "_")
        return f"{service}.{method}."

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        content_type = headers.get(b"content-type") or b""
        self.grpc = content_type.startswith(b"application/grpc")
        if self.grpc:
            self.prefix = self._method(headers.get(b":path") or b"")
            if self.config.emit_filter_state:
                try:
                    self.decoder.streamInfo().filter_state.set_data(NAME, self.counts)
                except FilterStateError:
                    pass
        return FilterHeadersStatus.Continue

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        if self.grpc:
            self._requests.feed(data)
            self.counts.request_message_count = self._requests.count
        return FilterDataStatus.Continue

    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        if self.grpc and endStream:
            self._charge(headers)
        return FilterHeadersStatus.Continue

    def encodeData(self, data: bytes, endStream: bool) -> Any:
        if self.grpc:
            self._responses.feed(data)
            self.counts.response_message_count = self._responses.count
        return FilterDataStatus.Continue

    def encodeTrailers(self, trailers: Headers) -> Any:
        if self.grpc:
            self._charge(trailers)
        return FilterTrailersStatus.Continue

    def _charge(self, headers: Headers) -> None:
        cluster = self.decoder.streamInfo().upstream_cluster
        route = self.decoder.route()
        if not cluster and route is not None and route.cluster is not None:
            cluster = route.cluster.name
        if self._charged or not cluster:
            return
        self._charged = True
        status = headers.get(b"grpc-status")
        ok = status is not None and status.strip() == _OK
        base = f"cluster.{cluster}.grpc.{self.prefix or ''}"
        STATS.counter(base + ("success" if ok else "failure")).inc()
        STATS.counter(base + "total").inc()
        STATS.counter(base + "request_message_count").inc(self.counts.request_message_count)
        STATS.counter(base + "response_message_count").inc(self.counts.response_message_count)


def parse_config(config: Any, path: str, context: Any) -> GrpcStatsConfig:
    allowlist = tuple(
        (service.name, frozenset(service.method_names))
        for service in config.individual_method_stats_allowlist.services)
    # Envoy's oneof (allowlist or stats_for_all_methods) is checked with the schema.
    return GrpcStatsConfig(
        emit_filter_state=config.emit_filter_state,
        all_methods=config.stats_for_all_methods.value,
        allowlist=allowlist,
        replace_dots=config.replace_dots_in_grpc_service_name,
    )


@implementer(IPlugin, IHTTPFilterExtension)
class GrpcStatsExtension:
    name = NAME
    typeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> GrpcStatsConfig:
        return parse_config(config, path, context)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], GrpcStatsFilter]:
        return lambda: GrpcStatsFilter(parsed)


__all__ = ["GrpcStatsExtension", "GrpcStatsFilter", "MessageCounts"]
