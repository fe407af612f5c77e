"""
What the HTTP connection manager does for each ordinary request (not a CONNECT tunnel): build
its filter chain (the configured ``http_filters``, then the router), choose the route from the
route table, apply Envoy's standard request handling (``x-request-id``, ``x-forwarded-for``,
``x-forwarded-proto``), and write one access-log record when the request is over.

The same :class:`HttpStreamFactory` serves both downstream codecs: HTTP/1.1
(hbonex.http.codec1) and HTTP/2 request streams (hbonex.http.codec2).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Callable, Sequence

import attrs
from zope.interface import implementer

from hbonex.filters.http.router import HttpRoute, RouterFilter
from hbonex.http.filter_manager import FilterHeadersStatus, FilterManager
from hbonex.http.headers import Headers, substitution_record
from hbonex.http.path import EscapedSlashes, PathRedirect, PathRejected, normalize
from hbonex.http.upgrade import upgrade_allowed, upgrade_type
from hbonex.http.xfcc import DEFAULT_XFCC, XfccPolicy
from hbonex.interfaces import IStreamFilter
from hbonex.observability import istio_metrics
from hbonex.observability.stats import STATS
from hbonex.tunnel.connect import ConnectRequest

DEFAULT_ROUTE_TIMEOUT = 15.0


def request_of(headers: Headers) -> ConnectRequest:
    """The route table's view of a request (it matches ConnectRequests)."""
    regular = tuple(
        (n.decode("latin-1"), v.decode("latin-1")) for n, v in headers if not n.startswith(b":")
    )

    def text(name: bytes) -> str | None:
        value = headers.get(name)
        return None if value is None else value.decode("latin-1")

    return ConnectRequest(
        method=text(b":method") or "",
        authority=text(b":authority") or "",
        headers=regular,
        protocol=text(b":protocol"),
        path=text(b":path"),
        scheme=text(b":scheme"),
    )


def _mutations(levels: list[Any], info: Any, request: bool) -> tuple[Any, ...]:
    """
    Header changes of the route, its virtual host and the route configuration, applied in
    that order (Envoy's default: the most general level has the last word).
    """
    result = []
    for level in levels:
        if level is None:
            continue
        mutations = level.request_headers if request else level.response_headers
        if mutations.add or mutations.remove:
            result.append(_mutator(mutations, info, request))
    return tuple(result)


def _mutator(mutations: Any, info: Any, request: bool) -> Callable[[Headers], None]:
    def mutate(headers: Headers) -> None:
        record = dict(info.substitutions()) if info is not None else {}
        if request:
            # %REQ(...)% reads the request being changed.
            record.update(substitution_record(headers))
        mutations.apply(headers, record)

    return mutate


def header_mutator(mutations: Any, info: Any, request: bool = False
                   ) -> Callable[[Headers], None]:
    """
    Headers to add and remove (hbonex.http.routing.HeaderMutations), as a callable applying
    them to a header map with ``info``'s substitutions (a filter's ``response_headers_to_add``;
    ``request``: the map is the request's, which %REQ(...)% then reads).
    """
    return _mutator(mutations, info, request)


def _location(redirect: Any, headers: Headers, prefix: str | None) -> bytes:
    """A redirect's Location, from the request and Envoy's RedirectAction."""
    old_scheme = (headers.get(b":scheme") or b"http").decode("latin-1")
    scheme = redirect.scheme or old_scheme
    authority = (headers.get(b":authority") or b"").decode("latin-1")
    host, port = authority, ""
    if not authority.endswith("]") and authority.count(":") == 1:
        host, port = authority.split(":")
    if redirect.host:
        host = redirect.host
    defaults = {"http": "80", "https": "443"}
    if redirect.port:
        port = str(redirect.port)
    elif scheme != old_scheme and port == defaults.get(old_scheme):
        port = ""  # http://a:80 -> https://a, not https://a:80
    full = (headers.get(b":path") or b"/").decode("latin-1")
    path, sep, query = full.partition("?")
    if redirect.path is not None:
        path = redirect.path
    elif redirect.prefix_rewrite is not None and prefix is not None and path.startswith(prefix):
        path = redirect.prefix_rewrite + path[len(prefix):]
    if redirect.strip_query:
        sep = query = ""
    hostport = f"{host}:{port}" if port and port != defaults.get(scheme) else host
    return f"{scheme}://{hostport}{path}{sep}{query}".encode("latin-1")


def route_resolver(router: Any, stream_idle_timeout: float = 300.0
                   ) -> Callable[[Headers, Any], HttpRoute | None]:
    """
    Envoy's route table as the filter chain asks it: None for "no route" (404 NR), a direct
    response or redirect, or a cluster with the route's timeout, rewrites and header changes.
    """

    def resolve(headers: Headers, info: Any) -> HttpRoute | None:
        decision = router.route(request_of(headers), info)
        route = getattr(decision, "route", None)
        levels = [route, getattr(decision, "virtual_host", None),
                  getattr(decision, "route_config", None)]
        responses = _mutations(levels, info, request=False)
        fields: dict[str, Any] = {}
        per_filter = getattr(route, "per_filter_config", None)
        if per_filter:
            fields["per_filter_config"] = per_filter
            fields["per_filter_levels"] = getattr(route, "per_filter_levels", ())
        kind = upgrade_type(headers)
        if kind is not None:
            # Envoy's createUpgradeFilterChain: the route's entry, else the HCM's.
            fields["upgrade_rejected"] = not upgrade_allowed(
                getattr(router, "upgrades", ()), getattr(route, "upgrades", ()), kind)
        if decision.kind == "redirect" and route is not None:
            return HttpRoute(direct_status=decision.status,
                             location=_location(route.redirect, headers, route.matched_prefix),
                             response_mutations=responses, **fields)
        if decision.cluster is None:
            if decision.status == 404:
                return None
            return HttpRoute(direct_status=decision.status,
                             direct_body=decision.body or f"{decision.reason}\n".encode(),
                             response_mutations=responses, **fields)
        timeout = getattr(decision, "timeout", None)
        fields["idle_timeout"] = (route.idle_timeout if route is not None
                                  and route.idle_timeout_set else stream_idle_timeout)
        if route is not None:
            if route.prefix_rewrite is not None and route.matched_prefix is not None:
                fields["prefix_rewrite"] = (route.matched_prefix.encode("latin-1"),
                                            route.prefix_rewrite.encode("latin-1"))
            if route.regex_rewrite is not None:
                pattern, substitution = route.regex_rewrite
                fields["regex_rewrite"] = (
                    re.compile(pattern.encode("latin-1")),
                    re.sub(r"\\(\d)", r"\\g<\1>", substitution).encode("latin-1"),
                )
            if route.host_rewrite_literal is not None:
                fields["host_rewrite"] = route.host_rewrite_literal.encode("latin-1")
            fields["auto_host_rewrite"] = route.auto_host_rewrite
            fields["name"] = route.name
            fields["rate_limits"] = route.rate_limits
            fields["include_vh_rate_limits"] = route.include_vh_rate_limits
        vhost = getattr(decision, "virtual_host", None)
        if vhost is not None:
            fields["vh_rate_limits"] = getattr(vhost, "rate_limits", ())
        retry = getattr(route, "retry_policy", None) or getattr(
            getattr(decision, "virtual_host", None), "retry_policy", None)
        if retry is not None:
            fields["retry_policy"] = retry
        return HttpRoute(
            cluster=decision.cluster,
            timeout=DEFAULT_ROUTE_TIMEOUT if timeout is None else timeout,
            request_mutations=_mutations(levels, info, request=True),
            response_mutations=responses,
            **fields,
        )

    return resolve


@attrs.frozen
class HttpOptions:
    """
    The connection manager's own request handling (Envoy's HttpConnectionManager fields of
    the same names, Envoy's defaults).
    """

    server_name: bytes = b"envoy"
    #: OVERWRITE, APPEND_IF_ABSENT or PASS_THROUGH.
    server_header_transformation: str = "OVERWRITE"
    generate_request_id: bool = True
    always_set_request_id_in_response: bool = False
    #: Append the peer's address to x-forwarded-for (and trust nothing else about it).
    use_remote_address: bool = False
    skip_xff_append: bool = False
    normalize_path: bool = False
    merge_slashes: bool = False
    escaped_slashes: EscapedSlashes = EscapedSlashes.KEEP_UNCHANGED
    #: common_http_protocol_options.headers_with_underscores_action: ALLOW, REJECT_REQUEST,
    #: DROP_HEADER.
    headers_with_underscores: str = "ALLOW"
    #: The whole request must have arrived within this (0: no limit, Envoy's default): 408.
    request_timeout: float = 0.0
    #: The request head must have arrived within this (HTTP/1.1; 0: no limit).  Envoy's
    #: default is no limit; hbonex's is 10 s, so that a slow client cannot hold a
    #: connection open with an unfinished head unless the configuration says so.
    request_headers_timeout: float = 10.0
    #: forward_client_cert_details and set_current_client_cert_details.
    xfcc: XfccPolicy = DEFAULT_XFCC


DEFAULT_OPTIONS = HttpOptions()


@implementer(IStreamFilter)
class StandardHeaders:
    """
    The connection manager's own handling, ahead of the configured filters: path
    normalisation (before routing, so routes and RBAC see one spelling), headers with
    underscores, ``x-request-id`` kept or generated, ``x-forwarded-for`` appended with the
    peer's address (``use_remote_address``), ``x-forwarded-proto``,
    ``x-forwarded-client-cert`` (hbonex.http.xfcc); on the response the ``server`` header.
    """

    def __init__(self, info: Any, options: HttpOptions = DEFAULT_OPTIONS,
                 upgrade_refused: Any = None, reactor: Any = None) -> None:
        self.info = info
        self.options = options
        #: Counts upgrades a route refused (Envoy's downstream_rq_ws_on_non_ws_route).
        self.upgrade_refused = upgrade_refused
        self.decoder: Any = None
        self.request_id: bytes | None = None
        self._request_timer: Any = None
        if options.request_timeout > 0 and reactor is not None:
            # Envoy's request_timeout: from the stream's start until the request has ended.
            self._request_timer = reactor.callLater(options.request_timeout,
                                                    self._request_timed_out)

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if self.decoder is not None:
            self.decoder.sendLocalReply(408, b"", None, "request_overall_timeout", "")

    def _request_ended(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder = callbacks

    def setEncoderFilterCallbacks(self, callbacks: Any) -> None:
        pass

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        o = self.options
        if endStream:
            self._request_ended()
        if o.headers_with_underscores != "ALLOW":
            underscored = [n for n, _ in headers if b"_" in n and not n.startswith(b":")]
            if underscored and o.headers_with_underscores == "REJECT_REQUEST":
                self.decoder.sendLocalReply(400, b"", None,
                                            "unexpected_underscore", "")
                return FilterHeadersStatus.StopIteration
            for name in underscored:
                headers.remove(name)
        if headers.get(b":method") == b"CONNECT":
            return FilterHeadersStatus.Continue
        path = headers.get(b":path")
        if path is not None and (o.normalize_path or o.merge_slashes
                                 or o.escaped_slashes is not EscapedSlashes.KEEP_UNCHANGED):
            try:
                headers.set(b":path", normalize(path, o.normalize_path, o.merge_slashes,
                                                o.escaped_slashes))
            except PathRejected:
                self.decoder.sendLocalReply(400, b"", None, "path_normalization_failed", "")
                return FilterHeadersStatus.StopIteration
            except PathRedirect as redirect:
                location = redirect.location

                def add_location(h: Headers) -> None:
                    h.set(b"location", location)

                self.decoder.sendLocalReply(307, b"", add_location, "path_redirect", "")
                return FilterHeadersStatus.StopIteration
        request_id = headers.get(b"x-request-id")
        if request_id is None and o.generate_request_id:
            request_id = str(uuid.uuid4()).encode()
            headers.add(b"x-request-id", request_id)
        self.request_id = request_id
        if o.use_remote_address and not o.skip_xff_append:
            remote = getattr(self.info, "remoteAddress", "") or ""
            peer = remote.rsplit(":", 1)[0].strip("[]") if ":" in remote else remote
            if peer:
                forwarded = headers.joined(b"x-forwarded-for")
                headers.set(b"x-forwarded-for",
                            (forwarded + b", " if forwarded else b"") + peer.encode())
        if b"x-forwarded-proto" not in headers or o.use_remote_address:
            headers.set(b"x-forwarded-proto", headers.get(b":scheme") or b"http")
        # Envoy's mutateXfccRequestHeader: the connection's TLS facts (none on an internal
        # connection, so a tunnel's inner requests are sanitized unless ALWAYS_FORWARD_ONLY).
        o.xfcc.apply(headers, getattr(self.info, "ssl", None))
        if upgrade_type(headers) is not None:
            # Envoy decides an upgrade once the route is known, before any configured filter
            # runs: 403 when neither the route nor the HCM enables it (no route: the router's
            # 404).  The connection closes after the answer (the request never ends).
            route = self.decoder.route()
            if route is not None and route.upgrade_rejected:
                if self.upgrade_refused is not None:
                    self.upgrade_refused.inc()
                self.decoder.sendLocalReply(403, b"", None, "upgrade_failed", "")
                return FilterHeadersStatus.StopIteration
        return FilterHeadersStatus.Continue

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        if endStream:
            self._request_ended()
        return None

    def decodeTrailers(self, trailers: Headers) -> Any:
        self._request_ended()
        return None

    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        o = self.options
        if o.server_header_transformation == "OVERWRITE" or (
            o.server_header_transformation == "APPEND_IF_ABSENT" and b"server" not in headers
        ):
            headers.set(b"server", o.server_name)
        if o.always_set_request_id_in_response and self.request_id is not None:
            headers.set(b"x-request-id", self.request_id)
        return FilterHeadersStatus.Continue

    def encodeData(self, data: bytes, endStream: bool) -> Any:
        return None

    def encodeTrailers(self, trailers: Headers) -> Any:
        return None

    def onDestroy(self) -> None:
        self._request_ended()


@attrs.frozen
class HttpFilterFactory:
    """
    One entry of http_filters: its ``name`` (what typed_per_filter_config is keyed by), what
    makes the filter for a request, and ``disabled`` (off unless a route's
    typed_per_filter_config enables it).
    """

    name: str
    make: Callable[[], Any]
    disabled: bool = False

    def __call__(self) -> Any:
        return self.make()


class HttpStreamFactory:
    """
    Makes each request's FilterManager for one downstream connection.
    """

    def __init__(
        self,
        reactor: Any,
        router: Any,
        pool_for: Callable[[Any], Any],
        info: Any,
        filter_factories: Sequence[Callable[[], Any]] = (),
        buffer_limit: int = 1024 * 1024,
        access_log: Callable[..., None] | None = None,
        options: HttpOptions = DEFAULT_OPTIONS,
        max_request_headers: int = 60 * 1024,
        stat_prefix: str = "",
        stream_idle_timeout: float = 300.0,
        upgrades: Any = None,
    ) -> None:
        self.reactor = reactor
        self.resolve = route_resolver(router, stream_idle_timeout)
        #: Counts upgraded connections (``opened``/``active``: the HCM's
        #: downstream_cx_upgrades_total/_active), shared with CONNECT tunnels.
        self.upgrades = upgrades
        self.pool_for = pool_for
        self.info = info
        self.filter_factories = tuple(filter_factories)
        #: The filters' names in http_filters (for typed_per_filter_config), ours unnamed.
        self.filter_names = tuple(getattr(f, "name", "") for f in self.filter_factories)
        off = frozenset(name for f, name in zip(self.filter_factories, self.filter_names,
                                                strict=True) if getattr(f, "disabled", False))
        #: Filters off unless a route enables them; None when no route can switch any.
        self.disabled_filters = (off if off or getattr(router, "switches_filters", False)
                                 else None)
        self.buffer_limit = buffer_limit
        self.access_log = access_log
        self.options = options
        #: max_request_headers_kb, for the HTTP/1.1 codec (431 past it).
        self.max_request_headers = max_request_headers
        #: %PROTOCOL% for the access log (set by the codec that uses this factory).
        self.protocol = "HTTP/1.1"
        prefix = f"http.{stat_prefix or 'hcm'}"
        self._rq_total = STATS.counter(f"{prefix}.downstream_rq_total")
        self._ws_refused = STATS.counter(f"{prefix}.downstream_rq_ws_on_non_ws_route")
        self._rq_active = STATS.gauge(f"{prefix}.downstream_rq_active")
        self._rq_class = {c: STATS.counter(f"{prefix}.downstream_rq_{c}xx") for c in "12345"}
        self._rq_time = STATS.family(f"{prefix}.downstream_rq_time", "histogram", (),
                                     istio_metrics.DURATION_BUCKETS)

    def chain(self, head: Sequence[Any], last: Any, last_name: str, sink: Any
              ) -> FilterManager:
        """
        One request's filter chain: ``head`` (unnamed), a new instance of each configured
        http_filter, then ``last`` (the router, or a CONNECT's admission) named ``last_name``.
        """
        filters = [*head, *(make() for make in self.filter_factories), last]
        return FilterManager(filters, sink, connection_info=self.info,
                             route_resolver=self.resolve, buffer_limit=self.buffer_limit,
                             names=(*[""] * len(head), *self.filter_names, last_name),
                             disabled=self.disabled_filters)

    def __call__(self, sink: Any) -> FilterManager:
        manager = self.chain(
            (StandardHeaders(self.info, self.options, self._ws_refused, self.reactor),),
            RouterFilter(self.reactor, self.pool_for, self.upgrades),
            "envoy.filters.http.router", sink)
        manager.stream_info.protocol = self.protocol
        started = time.monotonic()
        manager.on_destroy = lambda m: self._done(m, started)
        self._rq_total.inc()
        self._rq_active.inc()
        return manager

    def _done(self, manager: FilterManager, started: float) -> None:
        """The request is over: Istio's request metrics, and the access log."""
        info = manager.stream_info
        headers = manager.decoding.headers or Headers()
        content_type = headers.get(b"content-type") or b""
        elapsed_ms = (time.monotonic() - started) * 1000
        self._rq_active.dec()
        code = info.response_code or 0
        counter = self._rq_class.get(str(code)[:1])
        if counter is not None:
            counter.inc()
        self._rq_time.observe((), elapsed_ms)
        args = (self.info, code, info.flags_text(),
                "grpc" if content_type.startswith(b"application/grpc") else "http",
                elapsed_ms, info.bytes_received, info.bytes_sent)
        if info.istio_stats is not None:
            info.istio_stats(manager, *args)
        else:
            istio_metrics.request_done(*args)
        if self.access_log is not None:
            self._log(manager, started)

    def _log(self, manager: FilterManager, started: float) -> None:
        assert self.access_log is not None
        headers = manager.decoding.headers or Headers()
        info = manager.stream_info
        method = (headers.get(b":method") or b"").decode("latin-1")
        path = (headers.get(b":path") or b"").decode("latin-1")
        extra = {f"req:{n.decode('latin-1')}": v.decode("latin-1") for n, v in headers}
        response = manager.encoding.headers
        if response is not None:
            extra.update((f"resp:{n.decode('latin-1')}", v.decode("latin-1"))
                         for n, v in response)
        extra.update(
            response_flags=info.flags_text(),
            response_code_details=info.response_code_details,
            upstream_cluster=info.upstream_cluster,
            route_name=info.route_name,
            protocol=self.protocol,
        )
        for key in info.filter_state.keys():
            extra[f"fs:{key}"] = str(info.filter_state.get_data(key))
        self.access_log(
            self.info, (headers.get(b":authority") or b"").decode("latin-1"),
            info.response_code or 0, f"{method} {path}", info.bytes_received, info.bytes_sent,
            time.monotonic() - started, info.upstream_host, extra,
        )


__all__ = [
    "HttpFilterFactory",
    "HttpOptions",
    "HttpStreamFactory",
    "StandardHeaders",
    "header_mutator",
    "request_of",
    "route_resolver",
]
