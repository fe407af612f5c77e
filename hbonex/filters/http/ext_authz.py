"""
``envoy.filters.http.ext_authz`` with an ``http_service`` (Istio's CUSTOM authorization):
each request is held while an HTTP request to the authorization service asks about it.  A 200
lets it go on, with the service's ``allowed_upstream_headers`` applied; any other answer is
relayed to the client (status, body, ``allowed_client_headers``) and the request never
reaches the upstream (flag ``UAEX``); a failed check (connect failure, reset, timeout, 5xx)
continues with ``failure_mode_allow``, else is answered ``status_on_error`` (403).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.common.ext_authz_http import CheckResponse, CheckStatus, HttpCheck
from hbonex.filters.http.ext_authz_config import (
    BufferSettings,
    ExtAuthzConfig,
    ExtAuthzPerRoute,
    ExtAuthzStats,
    parse_ext_authz,
    parse_per_route,
)
from hbonex.filters.http.set_filter_state import substitutions
from hbonex.http.codec1 import HOP_BY_HOP
from hbonex.http.filter_manager import (
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
)
from hbonex.http.headers import Headers
from hbonex.http.matchers import any_matches
from hbonex.http.pass_through import PassThroughFilter
from hbonex.http.upgrade import upgrade_type
from hbonex.interfaces import IHTTPFilterPerRouteExtension, IStreamFilter

NAME = "envoy.filters.http.ext_authz"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
PER_ROUTE_TYPE_URL = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute")
PARTIAL_BODY = b"x-envoy-auth-partial-body"
HEADERS_TO_REMOVE = b"x-envoy-auth-headers-to-remove"
FAILURE_MODE_ALLOWED = b"x-envoy-auth-failure-mode-allowed"


class _Shared:
    """What every request's filter of one configured ext_authz shares."""

    def __init__(self, config: ExtAuthzConfig, reactor: Any,
                 pool_for: Callable[[Any], Any], stats: ExtAuthzStats) -> None:
        self.config = config
        self.reactor = reactor
        self.pool_for = pool_for
        self.stats = stats


@implementer(IStreamFilter)
class ExtAuthzFilter(PassThroughFilter):
    """One per request."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.config = shared.config
        self.decoder: Any = None
        self.encoder: Any = None
        self._headers: Headers | None = None
        #: Buffering the body for the check (with_request_body), until the end or the limit.
        self._buffering: BufferSettings | None = None
        self._buffered = 0
        self._check: HttpCheck | None = None
        #: Set while start() may complete the check before decode* returns (Envoy's
        #: initiating_call_): the answer is then the return value, not continueDecoding().
        self._initiating = False
        self._allowed = False  # the check let the request go on (or there is none)
        self._held: Any = None  # the request body's producer, paused while checking
        self._response_headers: list[tuple[bytes, bytes]] = []

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder = callbacks

    def setEncoderFilterCallbacks(self, callbacks: Any) -> None:
        self.encoder = callbacks

    # -- the request ----------------------------------------------------------------------------

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        per_route = self.decoder.perFilterConfig()
        if not isinstance(per_route, ExtAuthzPerRoute):
            per_route = None
        if per_route is not None and per_route.disabled:
            self._allowed = True
            return FilterHeadersStatus.Continue
        self._headers = headers
        settings = self.config.with_request_body
        if per_route is not None:
            if per_route.with_request_body is not None:
                settings = per_route.with_request_body
            if per_route.disable_request_body_buffering:
                settings = None
        if settings is not None and not endStream and upgrade_type(headers) is None:
            self._buffering = settings
            return FilterHeadersStatus.StopIteration
        self._start(b"", partial=None, end_stream=endStream)
        if self._allowed:
            return FilterHeadersStatus.Continue
        return FilterHeadersStatus.StopAllIterationAndBuffer

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        settings = self._buffering
        if self._allowed:
            return FilterDataStatus.Continue
        if settings is None or self._check is not None:
            return FilterDataStatus.StopIterationAndBuffer  # the check is pending
        self._buffered += len(data)
        full = self._buffered >= settings.max_request_bytes
        if full and not settings.allow_partial_message and self._buffered > \
                settings.max_request_bytes:
            # Envoy sets the decoder buffer limit to max_request_bytes: past it, 413.
            self.decoder.sendLocalReply(413, b"", None, "request_payload_too_large", "")
            return FilterDataStatus.StopIterationNoBuffer
        if not (endStream or (full and settings.allow_partial_message)):
            return FilterDataStatus.StopIterationAndBuffer
        body = (self.decoder.decodingBuffer() or b"") + data
        self._start(body[:settings.max_request_bytes],
                    partial=len(body) > settings.max_request_bytes or not endStream,
                    end_stream=True)
        if self._allowed:
            return FilterDataStatus.Continue
        return FilterDataStatus.StopIterationAndBuffer

    def decodeTrailers(self, trailers: Headers) -> Any:
        if self._allowed:
            return FilterTrailersStatus.Continue
        if self._buffering is not None and self._check is None:
            body = self.decoder.decodingBuffer() or b""
            self._start(body[:self._buffering.max_request_bytes],
                        partial=len(body) > self._buffering.max_request_bytes, end_stream=True)
            if self._allowed:
                return FilterTrailersStatus.Continue
        return FilterTrailersStatus.StopIteration

    # -- the check ------------------------------------------------------------------------------

    def _start(self, body: bytes, partial: bool | None, end_stream: bool) -> None:
        assert self._headers is not None
        shared = self.shared
        if not end_stream:
            # Envoy's watermark: read no further ahead of the check than what is in flight.
            self._held = self.decoder.requestBodyProducer()
            self._held.pauseProducing()
        check = self._check = HttpCheck(
            shared.reactor, shared.pool_for(self.config.cluster),
            self._check_headers(self._headers, body, partial), body, self.config.timeout,
            self._completed)
        self._initiating = True
        try:
            check.start()
        finally:
            self._initiating = False

    def _check_headers(self, request: Headers, body: bytes, partial: bool | None) -> Headers:
        """The authorization request: the allowed request headers, path_prefix'ed."""
        config = self.config
        path = config.path_prefix + (request.get(b":path") or b"/")
        headers = Headers([(b":method", request.get(b":method") or b"GET"), (b":path", path),
                           (b":scheme", request.get(b":scheme") or b"http")])
        authority = request.get(b":authority")
        if authority is not None:
            headers.add(b":authority", authority)
        for name, value in request:
            if name.startswith(b":") or name in (b"content-length", PARTIAL_BODY):
                continue
            if config.request_header_allowed(name):
                headers.add(name, value)
        headers.set(b"content-length", str(len(body)).encode())
        if partial is not None:
            headers.set(PARTIAL_BODY, b"true" if partial else b"false")
        if config.headers_to_add:
            record = substitutions(self.decoder.connection(), request)
            for name, template in config.headers_to_add:
                headers.set(name, template.render(record).encode("latin-1", "replace"))
        return headers

    def _completed(self, response: CheckResponse) -> None:
        self._check = None
        held, self._held = self._held, None
        if held is not None:
            held.resumeProducing()
        stats = self.shared.stats
        if response.status is CheckStatus.OK:
            stats.ok += 1
            self._apply(response.headers)
            self._allow()
        elif response.status is CheckStatus.DENIED:
            stats.denied += 1
            self._deny(response)
        else:
            stats.error += 1
            if self.config.failure_mode_allow:
                stats.failure_mode_allowed += 1
                if self.config.failure_mode_allow_header_add and self._headers is not None:
                    self._headers.set(FAILURE_MODE_ALLOWED, b"true")
                self._allow()
            else:
                self.decoder.sendLocalReply(self.config.status_on_error, b"", None,
                                            "ext_authz_error", "UAEX")

    def _allow(self) -> None:
        self._allowed = True
        if not self._initiating:
            self.decoder.continueDecoding()

    def _apply(self, answer: Headers) -> None:
        """A 200: the service's allowed headers onto the request (set, then appended)."""
        request = self._headers
        assert request is not None
        config = self.config
        changed = False
        answer_items = [(n, v) for n, v in answer if not n.startswith(b":")]
        for name, value in answer_items:
            if any_matches(config.allowed_upstream_headers, name.decode("latin-1")):
                request.set(name, value)
                changed = True
        for name, value in answer_items:
            if any_matches(config.allowed_upstream_headers_to_append, name.decode("latin-1")):
                request.add(name, value)
                changed = True
        for joined in answer.get_all(HEADERS_TO_REMOVE):
            for name in joined.split(b","):
                name = name.strip().lower()
                # Never the pseudo-headers or Host: the request would be malformed.
                if name and not name.startswith(b":") and name != b"host":
                    changed = bool(request.remove(name)) or changed
        self._response_headers = [
            (n, v) for n, v in answer_items
            if any_matches(config.allowed_client_headers_on_success, n.decode("latin-1"))]
        if changed and config.clear_route_cache:
            self.decoder.clearRouteCache()

    def _deny(self, response: CheckResponse) -> None:
        config = self.config
        body = response.body
        if config.max_denied_response_body_bytes > 0:
            body = body[:config.max_denied_response_body_bytes]
        relayed = [(n, v) for n, v in response.headers
                   if not n.startswith(b":") and n != b"content-length"
                   and n not in HOP_BY_HOP and config.client_header_allowed(n)]

        def modify(headers: Headers) -> None:
            # Replace what the local reply has under those names, keeping repeated ones.
            for name, _ in relayed:
                headers.remove(name)
            for name, value in relayed:
                headers.add(name, value)

        self.decoder.sendLocalReply(response.status_code, body, modify, "ext_authz_denied",
                                    "UAEX")

    # -- the response ---------------------------------------------------------------------------

    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        for name, value in self._response_headers:
            headers.add(name, value)
        return FilterHeadersStatus.Continue


    def onDestroy(self) -> None:
        check, self._check = self._check, None
        if check is not None:
            check.cancel()  # the client went away while its request was being checked
        self._held = None


@implementer(IPlugin, IHTTPFilterPerRouteExtension)
class ExtAuthzExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    perRouteTypeUrls = (PER_ROUTE_TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> ExtAuthzConfig:
        return parse_ext_authz(config, path, context)

    def parsePerRouteConfig(self, config: Any, path: str, context: Any) -> ExtAuthzPerRoute:
        return parse_per_route(config, path, context)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], ExtAuthzFilter]:
        hcm_prefix = getattr(context, "http_stat_prefix", "") or "http."
        prefix = f"{hcm_prefix}ext_authz." + (
            f"{parsed.stat_prefix}." if parsed.stat_prefix else "")
        runtime = context.runtime
        shared = _Shared(parsed, runtime.reactor, runtime.http_pool, ExtAuthzStats(prefix))
        return lambda: ExtAuthzFilter(shared)


__all__ = ["ExtAuthzExtension", "ExtAuthzFilter"]
