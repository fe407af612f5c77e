"""
Deciding what a terminated CONNECT (or other request) gets: a status, or a cluster to connect
to.  ``ConnectRouter`` is what the CLI builds (any CONNECT, target checked by the cluster's
policy); ``RouteConfig`` is Envoy's virtual hosts and routes.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qsl

import attrs

from hbonex.tunnel.connect import BadAuthority, ConnectRequest, parse_authority


@attrs.frozen
class HeaderMutation:
    """One ``*_headers_to_add`` entry (Envoy's HeaderValueOption)."""

    name: str
    value: Any  # hbonex.observability.formatter.Template
    #: APPEND_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS
    action: str = "APPEND_IF_EXISTS_OR_ADD"
    keep_empty_value: bool = False


@attrs.frozen
class HeaderMutations:
    """Headers to add and to remove, at one level (route, virtual host, route config)."""

    add: tuple[HeaderMutation, ...] = ()
    remove: tuple[str, ...] = ()


NO_MUTATIONS = HeaderMutations()


@attrs.frozen
class Redirect:
    """Envoy's RedirectAction."""

    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    prefix_rewrite: str | None = None
    response_code: int = 301
    strip_query: bool = False


@attrs.frozen
class QueryMatcher:
    """One ``query_parameters`` entry: present, or the value matched exactly / by regex."""

    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None
    ignore_case: bool = False

    def matches(self, params: dict[str, str]) -> bool:
        value = params.get(self.name)
        if self.present is not None:
            return (value is not None) == self.present
        if value is None:
            return False
        if self.ignore_case:
            value = value.lower()
        if self.exact is not None:
            return value == (self.exact.lower() if self.ignore_case else self.exact)
        if self.prefix is not None:
            return value.startswith(self.prefix.lower() if self.ignore_case else self.prefix)
        if self.regex is not None:
            return re.fullmatch(self.regex, value) is not None
        return True


@attrs.frozen
class RouteDecision:
    status: int
    reason: str = ""
    cluster: Any = None  # hbonex.upstream.cluster.Cluster
    original_destination: str | None = None
    idle_timeout: float = 3600.0
    body: bytes = b""
    #: "tunnel": relay the stream's bytes (CONNECT, or POST with allow_post);
    #: "http": forward the request to the cluster as an HTTP request.
    kind: str = "tunnel"
    #: Refuse (400) a CONNECT whose client sends tunnel bytes before our 200 (Envoy's
    #: reject_early_connect_data, CVE-2025-64763).
    reject_early_data: bool = False
    #: The route's request timeout for ordinary requests (None: Envoy's default, 15 s).
    timeout: float | None = None
    #: What matched, for the HTTP router's rewrites and header changes.
    route: Any = None
    virtual_host: Any = None
    route_config: Any = None


class ConnectRouter:
    """
    Every CONNECT goes to ``cluster`` (normally ORIGINAL_DST) for its :authority.
    """

    def __init__(
        self, cluster: Any, idle_timeout: float = 3600.0, reject_early_data: bool = False
    ) -> None:
        self.cluster = cluster
        self.idle_timeout = idle_timeout
        self.reject_early_data = reject_early_data

    def route(self, request: ConnectRequest, info: Any) -> RouteDecision:
        if request.method != "CONNECT":
            return RouteDecision(405, f"method {request.method} not allowed, only CONNECT")
        if request.protocol not in (None, "bytestream"):
            return RouteDecision(400, f"unsupported :protocol {request.protocol!r}")
        try:
            parse_authority(request.authority)
        except BadAuthority as e:
            return RouteDecision(400, str(e))
        return RouteDecision(
            200, cluster=self.cluster, original_destination=request.authority,
            idle_timeout=self.idle_timeout, reject_early_data=self.reject_early_data,
        )


@attrs.frozen
class StringMatcher:
    """Envoy's StringMatcher: one of exact, prefix, suffix, contains, safe_regex."""

    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    contains: str | None = None
    regex: str | None = None
    #: exact, prefix, suffix and contains compare lower-cased (Envoy: not the regex).
    ignore_case: bool = False

    def matches(self, value: str) -> bool:
        if self.regex is not None:
            return re.fullmatch(self.regex, value) is not None
        if self.ignore_case:
            value = value.lower()

        def same(text: str) -> str:
            return text.lower() if self.ignore_case else text

        if self.exact is not None:
            return value == same(self.exact)
        if self.prefix is not None:
            return value.startswith(same(self.prefix))
        if self.suffix is not None:
            return value.endswith(same(self.suffix))
        if self.contains is not None:
            return same(self.contains) in value
        return False


@attrs.frozen
class HeaderMatcher:
    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None
    invert: bool = False
    suffix: str | None = None
    contains: str | None = None

    def matches(self, request: ConnectRequest) -> bool:
        value = _pseudo(request, self.name)
        if self.present is not None:
            result = (value is not None) == self.present
        elif value is None:
            result = False
        elif self.exact is not None:
            result = value == self.exact
        elif self.prefix is not None:
            result = value.startswith(self.prefix)
        elif self.regex is not None:
            result = re.fullmatch(self.regex, value) is not None
        elif self.suffix is not None:
            result = value.endswith(self.suffix)
        elif self.contains is not None:
            result = self.contains in value
        else:
            result = value is not None
        return result != self.invert


def _query(path: str) -> dict[str, str]:
    """The first value of each query parameter (as Envoy's query_parameters matcher)."""
    params: dict[str, str] = {}
    for key, value in parse_qsl(path.partition("?")[2], keep_blank_values=True):
        params.setdefault(key, value)
    return params


def _pseudo(request: ConnectRequest, name: str) -> str | None:
    if name == ":authority":
        return request.authority
    if name == ":method":
        return request.method
    if name == ":path":
        return request.path
    if name == ":scheme":
        return request.scheme
    return request.header(name)


@attrs.frozen
class PerFilterConfig:
    """
    One entry of ``typed_per_filter_config``: the filter's per-route configuration as its
    plugin parsed it (None: none, only ``disabled``), and whether the filter is off here.
    """

    config: Any = None
    disabled: bool = False


#: Filter name -> its per-route configuration, most specific level merged in.
PerFilterConfigs = Mapping[str, PerFilterConfig]


@attrs.frozen
class Route:
    # match
    connect_matcher: bool = False
    prefix: str | None = None
    path: str | None = None
    safe_regex: str | None = None
    headers: tuple[HeaderMatcher, ...] = ()
    # action
    cluster: Any = None
    connect_enabled: bool = False  # route-level upgrade_configs CONNECT
    allow_post: bool = False
    #: Route-level upgrade_configs other than CONNECT: (lower-cased type, enabled).
    upgrades: tuple[tuple[str, bool], ...] = ()
    direct_status: int | None = None
    direct_body: bytes = b""
    idle_timeout: float = 3600.0
    #: idle_timeout was configured (an upgrade's relay then uses it, not the HCM's
    #: stream_idle_timeout).
    idle_timeout_set: bool = False
    original_destination_header: str | None = None
    timeout: float | None = None  # Envoy's route timeout (None: the default)
    # more matching
    path_separated_prefix: str | None = None
    case_sensitive: bool = True
    query_parameters: tuple[QueryMatcher, ...] = ()
    # more actions (ordinary HTTP requests)
    weighted_clusters: tuple[tuple[Any, int], ...] = ()
    cluster_header: str | None = None
    redirect: Redirect | None = None
    prefix_rewrite: str | None = None
    regex_rewrite: tuple[str, str] | None = None  # (pattern, substitution)
    host_rewrite_literal: str | None = None
    auto_host_rewrite: bool = False
    request_headers: HeaderMutations = NO_MUTATIONS
    response_headers: HeaderMutations = NO_MUTATIONS
    name: str = ""
    #: hbonex.http.retry_policy.RetryPolicy, or None (the virtual host's, if it has one).
    retry_policy: Any = None
    #: typed_per_filter_config: the route's own over its virtual host's over the route
    #: configuration's (merged when the configuration is loaded).
    per_filter_config: PerFilterConfigs = attrs.Factory(dict)

    def matches(self, request: ConnectRequest) -> bool:
        if self.connect_matcher:
            if request.method != "CONNECT":
                return False
        else:
            full = request.path
            if full is None:
                return False
            path = full.split("?", 1)[0]
            compared = path if self.case_sensitive else path.lower()

            def same(value: str) -> str:
                return value if self.case_sensitive else value.lower()

            if self.prefix is not None and not compared.startswith(same(self.prefix)):
                return False
            if self.path is not None and compared != same(self.path):
                return False
            if self.path_separated_prefix is not None:
                p = same(self.path_separated_prefix)
                if compared != p and not compared.startswith(p + "/"):
                    return False
            if self.safe_regex is not None and not re.fullmatch(self.safe_regex, path):
                return False
            if self.query_parameters:
                params = _query(full)
                if not all(q.matches(params) for q in self.query_parameters):
                    return False
        return all(h.matches(request) for h in self.headers)

    @property
    def matched_prefix(self) -> str | None:
        """What ``prefix_rewrite`` replaces."""
        return self.prefix if self.prefix is not None else self.path_separated_prefix


@attrs.frozen
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    request_headers: HeaderMutations = NO_MUTATIONS
    response_headers: HeaderMutations = NO_MUTATIONS
    retry_policy: Any = None
    per_filter_config: PerFilterConfigs = attrs.Factory(dict)

    def score(self, host: str) -> int:
        """
        Envoy's precedence: exact > suffix wildcard > prefix wildcard > '*'; -1 = no match.
        """
        best = -1
        for domain in self.domains:
            d = domain.lower()
            if d == "*":
                best = max(best, 0)
            elif d.startswith("*") and host.endswith(d[1:]) and len(host) > len(d) - 1:
                best = max(best, 2000 + len(d))
            elif d.endswith("*") and host.startswith(d[:-1]) and len(host) > len(d) - 1:
                best = max(best, 1000 + len(d))
            elif d == host:
                best = max(best, 10000)
        return best


@attrs.frozen
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    connect_enabled: bool = False  # HCM-level upgrade_configs CONNECT
    #: HCM-level upgrade_configs other than CONNECT: (lower-cased type, enabled).
    upgrades: tuple[tuple[str, bool], ...] = ()
    #: Refuse CONNECTs with data before our 200 (runtime envoy.reloadable_features.
    #: reject_early_connect_data).
    reject_early_data: bool = False
    request_headers: HeaderMutations = NO_MUTATIONS
    response_headers: HeaderMutations = NO_MUTATIONS
    #: The clusters by name, for ``cluster_header`` routes.
    clusters: Any = None
    per_filter_config: PerFilterConfigs = attrs.Factory(dict)
    #: Some route's typed_per_filter_config switches a filter on or off (the filter chain
    #: then looks at the route before it runs).
    switches_filters: bool = False

    def route(self, request: ConnectRequest, info: Any) -> RouteDecision:
        host = request.authority.lower()
        vhost = self._virtual_host(host)
        if vhost is None and ":" in host and not host.endswith("]"):
            vhost = self._virtual_host(host.rsplit(":", 1)[0])
        if vhost is None:
            return RouteDecision(404, f"no virtual host for {request.authority}")
        for route in vhost.routes:
            if not route.matches(request):
                continue
            if route.direct_status is not None:
                return RouteDecision(route.direct_status, "direct response",
                                     body=route.direct_body, route=route, virtual_host=vhost,
                                     route_config=self)
            if route.redirect is not None and request.method != "CONNECT":
                return RouteDecision(route.redirect.response_code, "redirect", kind="redirect",
                                     route=route, virtual_host=vhost, route_config=self)
            if request.method == "CONNECT" and not (self.connect_enabled or route.connect_enabled):
                return RouteDecision(403, "CONNECT is not enabled for this route")
            if request.method == "CONNECT" and request.protocol not in (None, "bytestream"):
                return RouteDecision(400, f"unsupported :protocol {request.protocol!r}")
            cluster = self._cluster(route, request)
            if cluster is None:
                if route.cluster_header:
                    return RouteDecision(503, f"no cluster named by {route.cluster_header}",
                                         route=route)
                return RouteDecision(404, "route has no cluster")
            kind = "tunnel"
            if request.method != "CONNECT" and not (route.allow_post and request.method == "POST"):
                kind = "http"
            original = request.authority
            header = route.original_destination_header or getattr(
                cluster, "original_dst_header", None
            )
            if header:
                original = _pseudo(request, header) or ""
            return RouteDecision(
                200, cluster=cluster, original_destination=original,
                idle_timeout=route.idle_timeout, kind=kind, timeout=route.timeout,
                reject_early_data=self.reject_early_data and request.method == "CONNECT",
                route=route, virtual_host=vhost, route_config=self,
            )
        return RouteDecision(404, f"no route matches in virtual host {vhost.name}")

    def _cluster(self, route: Route, request: ConnectRequest) -> Any:
        if route.weighted_clusters:
            clusters, weights = zip(*route.weighted_clusters, strict=True)
            return random.choices(clusters, weights)[0]
        if route.cluster_header:
            name = request.header(route.cluster_header)
            return (self.clusters or {}).get(name) if name else None
        return route.cluster

    def _virtual_host(self, host: str) -> VirtualHost | None:
        best: VirtualHost | None = None
        best_score = -1
        for vhost in self.virtual_hosts:
            score = vhost.score(host)
            if score > best_score:
                best, best_score = vhost, score
        return best


Routers = Sequence[Any]
