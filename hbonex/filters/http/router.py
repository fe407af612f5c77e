"""
The router HTTP filter (``envoy.filters.http.router``): the last decoder filter.  It takes
the route the chain resolved and either answers directly (``direct_response``, 404 ``NR``
when nothing matched) or sends the request to the route's cluster over a pooled upstream
connection and streams the response back through the encoder filters.

Local replies follow Envoy's statuses and response flags: 503 ``UF`` (connect failure),
503 ``UO`` (circuit breaker), 503 ``UC`` (upstream reset before the response started),
504 ``UT`` (the route timeout passed).  A reset after the response started resets the
downstream stream: a truncated response never looks complete.

Retries follow the route's ``retry_policy``: a connect failure, a reset, a per-try timeout or a
retriable status before anything of the response went downstream starts another attempt after
Envoy's jittered back-off, replaying the request from a buffer kept only while it stays within
the buffer limit (past it, the request is not retried).  When the retries run out the last
outcome stands, flagged ``URX``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from zope.interface import implementer

from hbonex.errors import UpstreamError
from hbonex.filters.http.upgrade_relay import UpgradeRelay
from hbonex.http.filter_manager import FilterDataStatus, FilterHeadersStatus
from hbonex.http.headers import Headers
from hbonex.http.retry_policy import NO_RETRIES, RetryPolicy
from hbonex.http.upgrade import upgrade_type
from hbonex.interfaces import IStreamDecoderFilter
from hbonex.upstream.http1_pool import Http1Pool, Overflow


@attrs.frozen
class HttpRoute:
    """
    What the router needs of a matched route (built from Envoy's RouteAction or
    DirectResponseAction).
    """

    cluster: Any = None
    #: ``timeout``: the whole request, until the response has ended; 0 disables.
    timeout: float = 15.0
    direct_status: int | None = None
    direct_body: bytes = b""
    #: A redirect's Location (with direct_status its code).
    location: bytes | None = None
    prefix_rewrite: tuple[bytes, bytes] | None = None  # (matched prefix, replacement)
    regex_rewrite: tuple[Any, bytes] | None = None  # (compiled bytes pattern, substitution)
    host_rewrite: bytes | None = None
    auto_host_rewrite: bool = False
    #: Applied to the request before it goes upstream / to the response before the
    #: encoder filters: callables taking (headers, substitutions).
    request_mutations: tuple[Any, ...] = ()
    response_mutations: tuple[Any, ...] = ()
    name: str = ""
    retry_policy: RetryPolicy = NO_RETRIES
    #: typed_per_filter_config for the filters (hbonex.http.routing.PerFilterConfig by name).
    per_filter_config: Any = None
    #: Each level's typed_per_filter_config, least specific first (see
    #: hbonex.http.routing.Route.per_filter_levels).
    per_filter_levels: tuple[Any, ...] = ()
    #: The request asks for an upgrade this route does not allow (403 upgrade_failed).
    upgrade_rejected: bool = False
    #: An upgrade's stream idle timeout: the route's idle_timeout if set, else the HCM's
    #: stream_idle_timeout (0: none).
    idle_timeout: float = 300.0
    #: Rate limit policies for the local_ratelimit filter (routes to a cluster only, as
    #: Envoy's route entries): the route's, its virtual host's, and include_vh_rate_limits.
    rate_limits: tuple[Any, ...] = ()
    vh_rate_limits: tuple[Any, ...] = ()
    include_vh_rate_limits: bool = False


@implementer(IStreamDecoderFilter)
class RouterFilter:
    """
    One request's trip upstream.  ``pool_for(cluster)`` gives the cluster's HTTP/1.1 pool.
    """

    def __init__(self, reactor: Any, pool_for: Callable[[Any], Http1Pool],
                 upgrades: Any = None) -> None:
        self.reactor = reactor
        self.pool_for = pool_for
        #: Upgraded connections' counters (opened, active, bytes_in, bytes_out).
        self.upgrades = upgrades
        #: The request's upgrade type (websocket...), or None.
        self._upgrade: str | None = None
        self._upgrade_relay: UpgradeRelay | None = None
        self.callbacks: Any = None
        self._codec: Any = None
        self._pending: list[tuple[str, Any, bool]] = []
        self._pending_bytes = 0
        self._request_ended = False
        self._response_started = False
        self._done = False
        self._timer: IDelayedCall | None = None
        self._acquiring: Any = None
        self._started = 0.0
        self._upstream_transport: Any = None
        self._route: HttpRoute | None = None
        self._request_source: Any = None
        self._response_source: Any = None
        # Retries: the request as first sent, what of its body went (for replay), the attempt.
        self._retry = NO_RETRIES
        self._headers: Headers | None = None
        self._replay: list[tuple[str, Any, bool]] | None = None
        self._replay_bytes = 0
        self._attempt = 0
        self._response: _UpstreamResponse | None = None
        self._try_timer: IDelayedCall | None = None
        self._retry_timer: IDelayedCall | None = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.callbacks = callbacks

    # -- the request ----------------------------------------------------------------------------

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        cb = self.callbacks
        route = cb.route()
        if route is None:
            cb.sendLocalReply(404, b"", None, "route_not_found", "NR")
            return FilterHeadersStatus.StopIteration
        if route.direct_status is not None:
            location = route.location

            def add_location(h: Headers) -> None:
                if location is not None:
                    h.set(b"location", location)
                for mutate in route.response_mutations:
                    mutate(h)

            cb.sendLocalReply(route.direct_status, route.direct_body, add_location,
                              "direct_response" if location is None else "redirect", "")
            return FilterHeadersStatus.StopIteration
        if route.cluster is None:
            cb.sendLocalReply(503, b"", None, "cluster_not_found", "NC")
            return FilterHeadersStatus.StopIteration
        self._request_ended = endStream
        headers = self._rewrite(headers, route)
        info = cb.streamInfo()
        info.upstream_cluster = getattr(route.cluster, "name", "")
        info.route_name = route.name
        self._upgrade = upgrade_type(headers)
        if self._upgrade is not None:
            return self._start_upgrade(headers, route)
        if route.timeout > 0:
            self._timer = self.reactor.callLater(route.timeout, self._timed_out, route.timeout)
        self._started = time.monotonic()
        if route.retry_policy.retry_on and route.retry_policy.num_retries > 0:
            self._retry = route.retry_policy
            self._headers = headers.copy()
            self._replay = []
        self._start_attempt(headers, endStream)
        return FilterHeadersStatus.StopIteration

    # -- upgrades (websocket) ------------------------------------------------------------------

    def _start_upgrade(self, headers: Headers, route: HttpRoute) -> Any:
        """
        An upgrade request: one attempt (no retries) on an upstream HTTP/1.1 connection of
        its own, or an HTTP/2 stream (an extended CONNECT: hbonex.upstream.http2_pool).
        Envoy starts the route timeout only once the request has ended, which an upgrade
        never does: the stream idle timeout bounds the wait for the answer instead.
        """
        cb = self.callbacks
        if route.idle_timeout > 0:
            self._timer = self.reactor.callLater(route.idle_timeout, self._upgrade_idle,
                                                 route.idle_timeout)
        self._started = time.monotonic()
        # Read no further ahead than one buffer while the upstream connects.
        self._request_source = cb.requestBodyProducer()
        self._request_source.pauseProducing()
        self._start_attempt(headers, False)
        return FilterHeadersStatus.StopIteration

    def _upgrade_idle(self, timeout: float) -> None:
        self._timer = None
        if self._done or self._response_started:
            return
        self._abandon_upstream()
        if self._acquiring is not None:
            self._acquiring.cancel()
        self._local_reply(408, "stream_idle_timeout", "SI")

    def _switch_protocols(self, headers: Headers) -> None:
        """101: the 101 goes through the encoder filters, then both connections relay bytes."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._response_started = True
        self._unwire_request()
        self._unwire_response()
        route = self._route
        assert route is not None
        relay = self._upgrade_relay = UpgradeRelay(
            self.reactor, route.idle_timeout, self.callbacks, self.upgrades,
            self._upgrade or "", self.callbacks.streamInfo())
        for mutate in route.response_mutations:
            mutate(headers)
        elapsed = int((time.monotonic() - self._started) * 1000)
        headers.set(b"x-envoy-upstream-service-time", str(elapsed).encode())
        self.callbacks.streamInfo().response_code_details = "via_upstream"
        self.callbacks.switchProtocols(relay.relay.a, self._switched)
        if not self._done:
            self.callbacks.encodeHeaders(headers, False)

    def _switched(self, ok: bool) -> None:
        codec, self._codec = self._codec, None
        relay = self._upgrade_relay
        if relay is None:
            return
        if not ok:
            self._upgrade_relay = None
            if codec is not None:
                codec.abort()
            return
        relay.start(codec)

    def _start_attempt(self, headers: Headers, end_stream: bool) -> None:
        assert self._route is not None
        self._attempt += 1
        if self._retry.per_try_timeout > 0:
            self._try_timer = self.reactor.callLater(self._retry.per_try_timeout,
                                                     self._try_timed_out)
        cluster = self._route.cluster
        if getattr(cluster, "upstream_protocol", None) == "downstream":
            # use_downstream_protocol_config: the upstream speaks the request's protocol.
            protocol = self.callbacks.streamInfo().protocol if self.callbacks is not None else ""
            pool = self.pool_for(cluster, protocol)  # type: ignore[call-arg]
        else:
            pool = self.pool_for(cluster)
        d = self._acquiring = pool.acquire()
        d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(headers, end_stream))

    # -- retries ------------------------------------------------------------------------------

    def _can_retry(self) -> bool:
        return (self._replay is not None and self._attempt <= self._retry.num_retries
                and not self._done and not self._response_started)

    def _retry_later(self, why: str) -> None:
        """Drop this attempt's upstream; another one after the back-off."""
        self._cancel_try_timer()
        self._abandon_upstream()
        cluster = getattr(self._route, "cluster", None)
        stats = getattr(cluster, "stats", None)
        if stats is not None and hasattr(stats, "upstream_rq_retry"):
            stats.upstream_rq_retry += 1
        self.callbacks.streamInfo().response_code_details = f"retrying: {why}"
        delay = self._retry.backoff(self._attempt)
        self._retry_timer = self.reactor.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry_timer = None
        if self._done or self._headers is None:
            return
        # Whether the request has ended is decided again once connected (_connected).
        self._start_attempt(self._headers.copy(), self._request_ended)

    def _abandon_upstream(self) -> None:
        self._unwire_request()
        self._unwire_response()
        response, self._response = self._response, None
        if response is not None:
            response.live = False  # whatever the old upstream still says is ignored
        codec, self._codec = self._codec, None
        if codec is not None:
            codec.abort()

    def _exhausted(self) -> None:
        if self._attempt > 1:
            self.callbacks.streamInfo().response_flags.add("URX")

    def _cancel_try_timer(self) -> None:
        if self._try_timer is not None and self._try_timer.active():
            self._try_timer.cancel()
        self._try_timer = None

    def _try_timed_out(self) -> None:
        self._try_timer = None
        if self._done or self._response_started:
            return
        if self._retry.on_reset() and self._can_retry():
            self._retry_later("per_try_timeout")
            return
        self._exhausted()
        self._abandon_upstream()
        if self._acquiring is not None:
            self._acquiring.cancel()
        self._local_reply(504, "upstream_per_try_timeout", "UT")

    def _rewrite(self, headers: Headers, route: HttpRoute) -> Headers:
        if route.prefix_rewrite is not None:
            prefix, replacement = route.prefix_rewrite
            path = headers.get(b":path") or b"/"
            # The route matched this prefix (case-insensitively, if it said so).
            if path[:len(prefix)].lower() == prefix.lower():
                headers.set(b":path", replacement + path[len(prefix):])
        elif route.regex_rewrite is not None:
            pattern, substitution = route.regex_rewrite
            full = headers.get(b":path") or b"/"
            path, sep, query = full.partition(b"?")
            headers.set(b":path", pattern.sub(substitution, path) + sep + query)
        if route.host_rewrite is not None:
            headers.set(b":authority", route.host_rewrite)
        for mutate in route.request_mutations:
            mutate(headers)
        self._route = route
        return headers

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        self._request_ended = self._request_ended or endStream
        self._keep_for_replay("data", data, endStream)
        if self._codec is not None:
            self._codec.send_data(data, endStream)
            if endStream:
                self._unwire_request()
        elif not self._done:
            self._pending.append(("data", data, endStream))
            self._pending_bytes += len(data)
        return FilterDataStatus.StopIterationNoBuffer

    def decodeTrailers(self, trailers: Headers) -> Any:
        self._request_ended = True
        self._keep_for_replay("trailers", trailers, True)
        if self._codec is not None:
            self._codec.send_trailers(trailers)
            self._unwire_request()
        elif not self._done:
            self._pending.append(("trailers", trailers, True))
        return None

    def _keep_for_replay(self, kind: str, value: Any, end: bool) -> None:
        if self._replay is None:
            return
        if kind == "data":
            self._replay_bytes += len(value)
        if self._replay_bytes > self._retry.buffer_limit:
            self._replay = None  # too big to replay: this request is not retried
            return
        self._replay.append((kind, value, end))

    def _connected(self, codec: Any, headers: Headers, end_stream: bool) -> None:
        self._acquiring = None
        if self._done:
            self._release(codec)
            return
        self._codec = codec
        upstream_host = _peer_of(codec)
        self.callbacks.streamInfo().upstream_host = upstream_host
        if self._route is not None and self._route.auto_host_rewrite:
            headers.set(b":authority", upstream_host.encode())
        response = self._response = _UpstreamResponse(self)
        if self._attempt > 1 and self._replay is not None:
            # A retry: the whole request again, from the replay buffer (what arrives from now
            # on goes straight through, as for a first attempt).
            replay = list(self._replay)
            ended = self._request_ended and not replay
            codec.start_request(headers, ended, response)
            self._wire_backpressure(codec, self._request_ended)
            self._pending = []  # already in the replay
            for kind, value, end in replay:
                if kind == "data":
                    codec.send_data(value, end)
                else:
                    codec.send_trailers(value)
            return
        held = self._request_source  # an upgrade's client, paused while we connected
        self._request_source = None
        codec.start_request(headers, end_stream, response)
        self._wire_backpressure(codec, end_stream)
        pending, self._pending = self._pending, []
        for kind, value, end in pending:
            if kind == "data":
                codec.send_data(value, end)
            else:
                codec.send_trailers(value)
        if held is not None:
            held.resumeProducing()

    def _wire_backpressure(self, codec: Any, request_ended: bool) -> None:
        """
        Producers back to back, as a relay: a full upstream pauses reading the request from
        the client, a full client pauses reading the response from the upstream.
        """
        upstream = codec.transport
        if upstream is None:
            return
        self._upstream_transport = upstream
        if not request_ended:
            self._request_source = self.callbacks.requestBodyProducer()
            try:
                upstream.registerProducer(self._request_source, True)
            except RuntimeError:
                self._request_source = None
        self._response_source = _Reading(upstream)
        self.callbacks.registerResponseProducer(self._response_source)

    def _unwire_request(self) -> None:
        source, self._request_source = self._request_source, None
        if source is not None:
            if self._upstream_transport is not None:
                self._upstream_transport.unregisterProducer()
            source.resumeProducing()  # whatever a full upstream paused, the end must pass

    def _unwire_response(self) -> None:
        if self._response_source is not None:
            self._response_source = None
            self.callbacks.unregisterResponseProducer()

    def _connect_failed(self, failure: Any) -> None:
        self._acquiring = None
        if failure.check(Overflow):
            self._cancel_try_timer()
            self._local_reply(503, "upstream_overflow", "UO")
        elif not self._done:
            error = failure.value
            reason = error.reason if isinstance(error, UpstreamError) else str(error)
            if self._retry.on_connect_failure() and self._can_retry():
                self._retry_later(f"connect_failure: {reason}")
                return
            self._cancel_try_timer()
            self._exhausted()
            self._local_reply(503, f"upstream_connect_failure: {reason}", "UF")

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        if self._done:
            return
        if self._codec is not None:
            codec, self._codec = self._codec, None
            codec.abort()
        self._local_reply(504, "upstream_response_timeout", "UT")

    def _local_reply(self, status: int, details: str, flag: str) -> None:
        if self._response_started:
            self.callbacks.streamInfo().response_flags.add(flag)
            self.callbacks.resetStream()
            return
        self.callbacks.sendLocalReply(status, b"", None, details, flag)

    # -- the response (from the upstream codec) -------------------------------------------------

    def _upstream_reset(self, why: str) -> None:
        self._codec = None
        if not self._done:
            if self._retry.on_reset() and self._can_retry():
                self._retry_later(f"reset: {why}")
                return
            self._cancel_try_timer()
            self._exhausted()
            self._local_reply(503, f"upstream_reset_before_response_started: {why}", "UC")

    def _response_headers(self, headers: Headers, end_stream: bool) -> None:
        status = headers.get(b":status") or b""
        if self._upgrade is not None and status == b"101" and not end_stream:
            self._switch_protocols(headers)
            return
        if (self._replay is not None and status.isdigit()
                and self._retry.on_status(int(status))):
            if self._can_retry():
                self._retry_later(f"status {int(status)}")
                return
            self._exhausted()
        self._cancel_try_timer()
        self._response_started = True
        if self._route is not None:
            for mutate in self._route.response_mutations:
                mutate(headers)
        elapsed = int((time.monotonic() - self._started) * 1000)
        headers.set(b"x-envoy-upstream-service-time", str(elapsed).encode())
        self.callbacks.streamInfo().response_code_details = "via_upstream"
        if end_stream:
            self._finish()
        self.callbacks.encodeHeaders(headers, end_stream)

    def _response_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self._finish()
        self.callbacks.encodeData(data, end_stream)

    def _response_trailers(self, trailers: Headers) -> None:
        self._finish()
        self.callbacks.encodeTrailers(trailers)

    def _finish(self) -> None:
        """The response ended (or the request is over): the connection is the pool's again."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._cancel_try_timer()
        if self._retry_timer is not None and self._retry_timer.active():
            self._retry_timer.cancel()
        self._retry_timer = None
        self._replay = None
        self._unwire_request()
        self._unwire_response()
        codec, self._codec = self._codec, None
        if codec is not None and not self._request_ended:
            # Answered before the request ended: the rest of it will not be sent, so the
            # connection cannot be reused.
            codec.abort()

    def onDestroy(self) -> None:
        self._done = True
        codec, self._codec = self._codec, None
        self._finish()
        if self._acquiring is not None:
            self._acquiring.cancel()
        if codec is not None and codec.busy:
            codec.abort()  # the exchange did not finish: the connection is not reusable
        self._pending = []

    def _release(self, codec: Any) -> None:
        if codec.on_idle is not None:
            codec.on_idle(codec)


@implementer(IPushProducer)
class _Reading:
    """The upstream side as the response's producer: pausing it stops reading upstream."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass  # the response's end or reset is handled where it happens


class _UpstreamResponse:
    """
    The response side the upstream codec calls (it decodes a response; the router's own
    decode* methods are the request's).
    """

    __slots__ = ("router", "live")

    def __init__(self, router: RouterFilter) -> None:
        self.router = router
        #: False once the router gave up on this attempt (a retry): nothing more passes.
        self.live = True

    def decodeHeaders(self, headers: Headers, endStream: bool) -> None:
        if self.live:
            self.router._response_headers(headers, endStream)

    def decodeData(self, data: bytes, endStream: bool) -> None:
        if self.live:
            self.router._response_data(data, endStream)

    def decodeTrailers(self, trailers: Headers) -> None:
        if self.live:
            self.router._response_trailers(trailers)

    def onUpstreamReset(self, why: str) -> None:
        if self.live:
            self.router._upstream_reset(why)


def _peer_of(codec: Any) -> str:
    peer = getattr(getattr(codec, "transport", None), "getPeer", lambda: None)()
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if isinstance(host, str) and host.startswith("envoy://"):
        return host  # an internal listener's address has no port (Envoy's envoy://L/ID)
    return f"{host}:{port}" if host is not None else str(peer)


__all__ = ["HttpRoute", "RetryPolicy", "RouterFilter"]
