"""
What the HTTP connection manager does for each ordinary request (not a CONNECT tunnel): build
its filter chain (the configured ``http_filters``, then the router), choose the route from the
route table, apply Envoy's standard request handling (``x-request-id``, ``x-forwarded-for``,
``x-forwarded-proto``), and write one access-log record when the request is over.

The same :class:`HttpStreamFactory` serves both downstream codecs: HTTP/1.1
(hbonex.http.codec1) and HTTP/2 request streams (hbonex.http.codec2).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Sequence

from zope.interface import implementer

from hbonex.connect import ConnectRequest
from hbonex.http.filter_manager import FilterHeadersStatus, FilterManager
from hbonex.http.headers import Headers
from hbonex.http.router import HttpRoute, RouterFilter
from hbonex.interfaces import IStreamDecoderFilter

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


def route_resolver(router: Any) -> Callable[[Headers, Any], HttpRoute | None]:
    """
    Envoy's route table as the filter chain asks it: None for "no route" (404 NR), a direct
    response, or a cluster with the route's timeout.
    """

    def resolve(headers: Headers, info: Any) -> HttpRoute | None:
        decision = router.route(request_of(headers), info)
        if decision.cluster is None:
            if decision.status == 404:
                return None
            return HttpRoute(direct_status=decision.status,
                             direct_body=decision.body or f"{decision.reason}\n".encode())
        timeout = getattr(decision, "timeout", None)
        return HttpRoute(
            cluster=decision.cluster,
            timeout=DEFAULT_ROUTE_TIMEOUT if timeout is None else timeout,
        )

    return resolve


@implementer(IStreamDecoderFilter)
class StandardHeaders:
    """
    The connection manager's own request handling, ahead of the configured filters:
    ``x-request-id`` kept or generated, ``x-forwarded-for`` appended with the peer's address,
    ``x-forwarded-proto`` set from the downstream scheme.
    """

    def __init__(self, info: Any) -> None:
        self.info = info

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        pass

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        if headers.get(b":method") != b"CONNECT":
            if b"x-request-id" not in headers:
                headers.add(b"x-request-id", str(uuid.uuid4()).encode())
            remote = getattr(self.info, "remoteAddress", "") or ""
            peer = remote.rsplit(":", 1)[0].strip("[]") if ":" in remote else remote
            if peer:
                forwarded = headers.joined(b"x-forwarded-for")
                headers.set(b"x-forwarded-for",
                            (forwarded + b", " if forwarded else b"") + peer.encode())
            headers.set(b"x-forwarded-proto", headers.get(b":scheme") or b"http")
        return FilterHeadersStatus.Continue

    def decodeData(self, data: bytes, endStream: bool) -> Any:
        return None

    def decodeTrailers(self, trailers: Headers) -> Any:
        return None

    def onDestroy(self) -> None:
        pass


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
    ) -> None:
        self.reactor = reactor
        self.resolve = route_resolver(router)
        self.pool_for = pool_for
        self.info = info
        self.filter_factories = tuple(filter_factories)
        self.buffer_limit = buffer_limit
        self.access_log = access_log

    def __call__(self, sink: Any) -> FilterManager:
        filters: list[Any] = [StandardHeaders(self.info)]
        filters += [make() for make in self.filter_factories]
        filters.append(RouterFilter(self.reactor, self.pool_for))
        manager = FilterManager(filters, sink, connection_info=self.info,
                                route_resolver=self.resolve, buffer_limit=self.buffer_limit)
        if self.access_log is not None:
            started = time.monotonic()
            manager.on_destroy = lambda m: self._log(m, started)
        return manager

    def _log(self, manager: FilterManager, started: float) -> None:
        assert self.access_log is not None
        headers = manager.decoding.headers or Headers()
        info = manager.stream_info
        method = (headers.get(b":method") or b"").decode("latin-1")
        path = (headers.get(b":path") or b"").decode("latin-1")
        self.access_log(
            self.info, (headers.get(b":authority") or b"").decode("latin-1"),
            info.response_code or 0, f"{method} {path}", info.bytes_received, info.bytes_sent,
            time.monotonic() - started, info.upstream_host,
        )


__all__ = ["HttpStreamFactory", "StandardHeaders", "request_of", "route_resolver"]
