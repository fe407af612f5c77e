"""
``envoy.filters.http.fault``: Envoy's fault injection.  A request that matches (``headers``,
``upstream_cluster``, ``downstream_nodes``) may be delayed (``delay``: a fixed delay, or the
milliseconds in ``x-envoy-fault-delay-request`` with ``header_delay``) and then aborted
(``abort``: an HTTP status, a gRPC status, or ``x-envoy-fault-abort-request`` /
``x-envoy-fault-abort-grpc-request`` with ``header_abort``), each with its percentage (for
the header forms capped by ``x-envoy-fault-*-request-percentage``).  A route may replace the
whole configuration with its own HTTPFault (``typed_per_filter_config``).

The delay is a reactor timer: nothing blocks, the request's body waits at this filter, and a
client that goes away cancels it.  Percentages are drawn from one random generator per
configured filter (``random_source()``; seeded in tests).  Flags: ``DI`` (delayed), ``FI``
(aborted).  Stats (Envoy's): ``http.<stat_prefix>.fault.aborts_injected``,
``delays_injected``, ``faults_overflow`` (counters), ``active_faults`` (gauge).
"""

from __future__ import annotations

import random
from typing import Any, Callable

import attrs
from google.protobuf import json_format
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.common.local_reply import send_local_reply
from hbonex.filters.common.percent import Percent, parse_percent, random_source
from hbonex.http.connection_manager import request_of
from hbonex.http.filter_manager import (
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
)
from hbonex.http.headers import Headers
from hbonex.interfaces import IHTTPFilterPerRouteExtension, IStreamDecoderFilter
from hbonex.observability.stats import STATS, Counter, Gauge

NAME = "envoy.filters.http.fault"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"

ABORT_REQUEST = b"x-envoy-fault-abort-request"
ABORT_GRPC_REQUEST = b"x-envoy-fault-abort-grpc-request"
ABORT_PERCENTAGE = b"x-envoy-fault-abort-request-percentage"
DELAY_REQUEST = b"x-envoy-fault-delay-request"
DELAY_PERCENTAGE = b"x-envoy-fault-delay-request-percentage"
DOWNSTREAM_NODE = b"x-envoy-downstream-service-node"

log = Logger()


def _header_int(headers: Headers, name: bytes) -> int | None:
    """An untrusted header's unsigned integer (its first value only, as Envoy), or None."""
    value = headers.get(name)
    if value is None or not value.isdigit():
        return None
    return int(value)


@attrs.frozen
class FaultSettings:
    """One HTTPFault (the filter's, or a route's)."""

    #: The abort: a fixed HTTP status, a fixed gRPC status, or the request's headers.
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    header_abort: bool = False
    #: None: no abort configured.
    abort_percent: Percent | None = None
    #: The delay: fixed (seconds), or the request's header (milliseconds).
    fixed_delay: float | None = None
    header_delay: bool = False
    #: None: no delay configured.
    delay_percent: Percent | None = None
    upstream_cluster: str = ""
    headers: tuple[Any, ...] = ()  # hbonex.http.routing.HeaderMatcher
    downstream_nodes: frozenset[str] = frozenset()
    max_active_faults: int | None = None
    #: Dynamic metadata set under the filter's name when a fault is injected.
    filter_metadata: dict[str, Any] | None = None

    def delay_for(self, headers: Headers, rng: random.Random) -> float | None:
        """The delay this request gets (seconds), or None (Envoy's delayDuration)."""
        if self.delay_percent is None:
            return None
        percent = self.delay_percent
        if self.header_delay:
            cap = _header_int(headers, DELAY_PERCENTAGE)
            if cap is not None:
                percent = percent.capped(cap)
        if not percent.enabled(rng):
            return None
        if not self.header_delay:
            return self.fixed_delay
        ms = _header_int(headers, DELAY_REQUEST)
        return ms / 1000 if ms else None

    def abort_for(self, headers: Headers, rng: random.Random) -> tuple[int, int | None] | None:
        """(HTTP status, gRPC status or None) to abort with, or None (Envoy's abortStatus)."""
        if self.abort_percent is None:
            return None
        percent = self.abort_percent
        if self.header_abort:
            cap = _header_int(headers, ABORT_PERCENTAGE)
            if cap is not None:
                percent = percent.capped(cap)
        if not percent.enabled(rng):
            return None
        if not self.header_abort:
            if self.abort_status is not None:
                return self.abort_status, None
            return 200, self.abort_grpc_status
        status = _header_int(headers, ABORT_REQUEST)
        if status is not None and 200 <= status < 600:
            return status, None
        grpc = _header_int(headers, ABORT_GRPC_REQUEST)
        if grpc is not None:
            return 200, grpc
        return None


@attrs.define(eq=False)
class FaultConfig:
    """One per configured filter: its settings, stats, clock and random source."""

    settings: FaultSettings
    reactor: Any
    random: random.Random
    stat_prefix: str = "http."
    aborts_injected: Counter = attrs.field(init=False)
    delays_injected: Counter = attrs.field(init=False)
    faults_overflow: Counter = attrs.field(init=False)
    active_faults: Gauge = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        prefix = f"{self.stat_prefix}fault."
        self.aborts_injected = STATS.counter(f"{prefix}aborts_injected")
        self.delays_injected = STATS.counter(f"{prefix}delays_injected")
        self.faults_overflow = STATS.counter(f"{prefix}faults_overflow")
        self.active_faults = STATS.gauge(f"{prefix}active_faults")


@implementer(IStreamDecoderFilter)
class FaultFilter:
    """One per request."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.settings = config.settings
        self.callbacks: Any = None
        self.headers: Headers | None = None
        self._delay: Any = None  # the pending IDelayedCall
        self._active = False

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        # A route's HTTPFault replaces the filter's whole configuration (Envoy's).
        self.settings = self.callbacks.perFilterConfig() or self.config.settings
        self.headers = headers
        if not self._matches(headers):
            return FilterHeadersStatus.Continue
        rng = self.config.random
        delay = self.settings.delay_for(headers, rng)
        if delay is not None and self._try_activate():
            self._delay = self.config.reactor.callLater(delay, self._delay_over)
            self.config.delays_injected.inc()
            self.callbacks.streamInfo().response_flags.add("DI")
            self._set_metadata()
            log.debug("fault: delaying the request {ms:.0f} ms", ms=delay * 1000)
            return FilterHeadersStatus.StopIteration
        if self._maybe_abort():
            return FilterHeadersStatus.StopIteration
        return FilterHeadersStatus.Continue

    def _matches(self, headers: Headers) -> bool:
        settings = self.settings
        if settings.upstream_cluster:
            cluster = getattr(self.callbacks.route(), "cluster", None)
            if getattr(cluster, "name", None) != settings.upstream_cluster:
                return False
        if settings.downstream_nodes:
            node = headers.get(DOWNSTREAM_NODE)
            if node is None or node.decode("latin-1") not in settings.downstream_nodes:
                return False
        if settings.headers:
            request = request_of(headers)
            return all(m.matches(request) for m in settings.headers)
        return True

    def _try_activate(self) -> bool:
        """Envoy's tryIncActiveFaults: one active fault per request, max_active_faults."""
        if self._active:
            return True
        limit = self.settings.max_active_faults
        config = self.config
        if limit is not None and config.active_faults.value >= limit:
            config.faults_overflow.inc()
            return False
        config.active_faults.inc()
        self._active = True
        return True

    def _set_metadata(self) -> None:
        if self.settings.filter_metadata is not None:
            metadata = self.callbacks.streamInfo().dynamic_metadata
            metadata.setdefault(NAME, {}).update(self.settings.filter_metadata)

    def _maybe_abort(self) -> bool:
        assert self.headers is not None
        status = self.settings.abort_for(self.headers, self.config.random)
        if status is None or not self._try_activate():
            return False
        self.config.aborts_injected.inc()
        self._set_metadata()
        http_status, grpc_status = status
        send_local_reply(self.callbacks, self.headers, http_status, "fault filter abort",
                         "fault_filter_abort", "FI", grpc_status)
        return True

    def _delay_over(self) -> None:
        self._delay = None
        # Delays can be followed by aborts (drawn now, as Envoy's postDelayInjection).
        if not self._maybe_abort():
            self.callbacks.continueDecoding()

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        if self._delay is None:
            return FilterDataStatus.Continue
        return FilterDataStatus.StopIterationAndBuffer  # the body waits with the headers

    def decodeTrailers(self, trailers: Headers) -> Any:
        if self._delay is None:
            return FilterTrailersStatus.Continue
        return FilterTrailersStatus.StopIteration

    def onDestroy(self) -> None:
        if self._delay is not None:
            if self._delay.active():
                self._delay.cancel()  # the client went away during the delay
            self._delay = None
        if self._active:
            self._active = False
            self.config.active_faults.dec()


def _percent(message: Any, field: str, path: str, context: Any) -> Percent:
    percent = parse_percent(getattr(message, field))
    if not message.HasField(field) or percent.numerator == 0:
        context.warn(path, f"{field} is 0 (its default when unset): no request is faulted "
                     "(as Envoy)")
    return percent


def parse_fault(message: Any, path: str, context: Any) -> FaultSettings:
    """An HTTPFault message at YAML ``path`` -> FaultSettings."""
    from hbonex.config.route_config import header_matchers

    fields: dict[str, Any] = {}
    if message.HasField("response_rate_limit"):
        raise context.error(path, "response_rate_limit is not implemented by hbonex (no "
                            "response bandwidth limiting); remove it", "response_rate_limit")
    if message.HasField("abort"):
        abort, where = message.abort, f"{path}.abort"
        kind = abort.WhichOneof("error_type")
        if kind is None:
            raise context.error(where, "one of http_status, grpc_status, header_abort is "
                                "required")
        if kind == "http_status":
            if not 200 <= abort.http_status < 600:
                raise context.error(f"{where}.http_status", "must be at least 200 and below "
                                    f"600, got {abort.http_status}")
            fields["abort_status"] = abort.http_status
        elif kind == "grpc_status":
            fields["abort_grpc_status"] = abort.grpc_status
        else:
            fields["header_abort"] = True
        fields["abort_percent"] = _percent(abort, "percentage", where, context)
    if message.HasField("delay"):
        delay, where = message.delay, f"{path}.delay"
        kind = delay.WhichOneof("fault_delay_secifier")
        if kind is None:
            raise context.error(where, "one of fixed_delay, header_delay is required")
        if kind == "fixed_delay":
            seconds = delay.fixed_delay.seconds + delay.fixed_delay.nanos / 1e9
            if seconds <= 0:
                raise context.error(f"{where}.fixed_delay", "must be above 0")
            fields["fixed_delay"] = seconds
        else:
            fields["header_delay"] = True
        fields["delay_percent"] = _percent(delay, "percentage", where, context)
    fields["upstream_cluster"] = message.upstream_cluster
    fields["headers"] = header_matchers(message.headers, f"{path}.headers", context)
    fields["downstream_nodes"] = frozenset(message.downstream_nodes)
    if message.HasField("max_active_faults"):
        fields["max_active_faults"] = message.max_active_faults.value
    if message.HasField("filter_metadata"):
        fields["filter_metadata"] = json_format.MessageToDict(message.filter_metadata)
    return FaultSettings(**fields)


@implementer(IPlugin, IHTTPFilterPerRouteExtension)
class FaultExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    perRouteTypeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> FaultConfig:
        return FaultConfig(parse_fault(config, path, context), context.reactor,
                           random_source(), getattr(context, "http_stat_prefix", "http."))

    def parsePerRouteConfig(self, config: Any, path: str, context: Any) -> FaultSettings:
        return parse_fault(config, path, context)

    def filterFactory(self, parsed: Any, context: Any) -> Callable[[], FaultFilter]:
        return lambda: FaultFilter(parsed)


__all__ = ["FaultConfig", "FaultExtension", "FaultFilter", "FaultSettings", "parse_fault"]
