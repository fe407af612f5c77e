"""
``envoy.filters.http.local_ratelimit``: Envoy's local rate limit.  A token bucket
(``token_bucket``: ``max_tokens``, refilled by ``tokens_per_fill`` every ``fill_interval``)
shared by every connection through the filter, or one per connection
(``local_rate_limit_per_downstream_connection``).  ``descriptors`` give requests buckets of
their own: a request's descriptors come from the filter's ``rate_limits``, else from its
route's (and virtual host's, per ``vh_rate_limits``) ``rate_limits`` actions.  A route may
replace the whole configuration with its own LocalRateLimit (``typed_per_filter_config``).

``filter_enabled`` decides whether a request is looked at (absent: never, as Envoy), and
``filter_enforced`` whether a limited one is refused (``status``, 429 by default, flag ``RL``,
``response_headers_to_add``) or only marked (``request_headers_to_add_when_not_enforced``).
Stats (Envoy's): ``<stat_prefix>.http_local_rate_limit.enabled``, ``enforced``,
``rate_limited``, ``ok``.  With ``enable_x_ratelimit_headers: DRAFT_VERSION_03`` responses
carry ``x-ratelimit-limit``, ``x-ratelimit-remaining`` and ``x-ratelimit-reset``.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.filters.common.local_reply import RESOURCE_EXHAUSTED, send_local_reply
from hbonex.filters.common.percent import NEVER, Percent, parse_percent, random_source
from hbonex.filters.common.token_bucket import (
    MIN_FILL_INTERVAL,
    BucketSpec,
    DescriptorSpec,
    LocalRateLimiter,
    TokenBucketContext,
)
from hbonex.http.connection_manager import header_mutator
from hbonex.http.filter_manager import (
    FilterHeadersStatus,
)
from hbonex.http.headers import Headers
from hbonex.http.pass_through import PassThroughFilter
from hbonex.http.rate_limit_policy import descriptors
from hbonex.http.routing import HeaderMutations
from hbonex.interfaces import IHTTPFilterPerRouteExtension, IStreamFilter
from hbonex.observability.stats import STATS, Counter

NAME = "envoy.filters.http.local_ratelimit"
TYPE_URL = ("type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3."
            "LocalRateLimit")
#: Where a connection's own limiters live (Envoy's key), in its filter state.
PER_CONNECTION_KEY = "per_connection_local_rate_limiter"

#: VhRateLimitsOptions.
OVERRIDE, INCLUDE, IGNORE = 0, 1, 2


class _PerConnection(dict[int, LocalRateLimiter]):
    """A connection's limiters, by filter configuration (kept in its filter state)."""

    def __str__(self) -> str:
        return f"{len(self)} local rate limiter(s)"


@attrs.define(eq=False)
class LocalRateLimitConfig:
    """One LocalRateLimit (the filter's or a route's): its limiter and stats."""

    stat_prefix: str
    clock: Any
    random: random.Random
    bucket: BucketSpec | None = None
    descriptors: tuple[DescriptorSpec, ...] = ()
    always_consume_default: bool = True
    per_connection: bool = False
    enabled: Percent = NEVER
    enforced: Percent = NEVER
    status: int = 429
    response_headers: HeaderMutations = HeaderMutations()
    request_headers: HeaderMutations = HeaderMutations()
    x_ratelimit_headers: bool = False
    stage: int = 0
    vh_rate_limits: int = OVERRIDE
    #: The filter's own rate_limits (they replace the route's when set).
    rate_limits: tuple[Any, ...] = ()
    resource_exhausted: bool = False
    limiter: LocalRateLimiter | None = attrs.field(init=False, default=None)
    stats: dict[str, Counter] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        prefix = f"{self.stat_prefix}.http_local_rate_limit"
        self.stats = {name: STATS.counter(f"{prefix}.{name}")
                      for name in ("enabled", "enforced", "rate_limited", "ok")}
        if self.bucket is not None and not self.per_connection:
            self.limiter = self.new_limiter()

    def new_limiter(self) -> LocalRateLimiter:
        assert self.bucket is not None
        return LocalRateLimiter(self.clock, self.bucket, self.descriptors,
                                self.always_consume_default)


@implementer(IStreamFilter)
class LocalRateLimitFilter(PassThroughFilter):
    """One per request."""

    def __init__(self, config: LocalRateLimitConfig) -> None:
        self.config = config
        self.decoder: Any = None
        self.encoder: Any = None
        self.context: TokenBucketContext | None = None

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder = callbacks

    def setEncoderFilterCallbacks(self, callbacks: Any) -> None:
        self.encoder = callbacks

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        config = self.config = self.decoder.perFilterConfig() or self.config
        if not config.enabled.enabled(config.random):
            return FilterHeadersStatus.Continue
        config.stats["enabled"].inc()
        limiter = self._limiter()
        if limiter is None:  # no token bucket anywhere: nothing is limited
            config.stats["ok"].inc()
            return FilterHeadersStatus.Continue
        found = self._descriptors(headers) if config.descriptors else []
        allowed, self.context = limiter.request_allowed(found)
        if allowed:
            config.stats["ok"].inc()
            return FilterHeadersStatus.Continue
        config.stats["rate_limited"].inc()
        info = self.decoder.connection()
        if not config.enforced.enabled(config.random):
            if config.request_headers.add:
                header_mutator(config.request_headers, info, request=True)(headers)
            return FilterHeadersStatus.Continue
        config.stats["enforced"].inc()
        modify = (header_mutator(config.response_headers, info)
                  if config.response_headers.add else None)
        send_local_reply(self.decoder, headers, config.status, "local_rate_limited",
                         "local_rate_limited", "RL",
                         RESOURCE_EXHAUSTED if config.resource_exhausted else None, modify)
        return FilterHeadersStatus.StopIteration

    def _limiter(self) -> LocalRateLimiter | None:
        config = self.config
        if not config.per_connection or config.bucket is None:
            return config.limiter
        info = self.decoder.connection()
        state = getattr(info, "filter_state", None)
        if state is None:
            return config.limiter
        limiters = state.get_data(PER_CONNECTION_KEY)
        if limiters is None:
            limiters = _PerConnection()
            state.set_data(PER_CONNECTION_KEY, limiters)
        limiter = limiters.get(id(config))
        if limiter is None:
            limiter = limiters[id(config)] = config.new_limiter()
        return limiter

    def _descriptors(self, headers: Headers) -> list[Any]:
        config = self.config
        info = self.decoder.connection()
        remote = getattr(info, "remoteAddress", "") or ""
        route = self.decoder.route()
        cluster = getattr(getattr(route, "cluster", None), "name", "") or ""
        if config.rate_limits:
            return descriptors(config.rate_limits, config.stage, headers, remote, cluster)
        if route is None or getattr(route, "cluster", None) is None:
            return []  # no route entry (a direct response, a redirect): none
        found = descriptors(route.rate_limits, config.stage, headers, remote, cluster)
        option = INCLUDE if route.include_vh_rate_limits else config.vh_rate_limits
        if option == INCLUDE or (option == OVERRIDE and not route.rate_limits):
            found += descriptors(route.vh_rate_limits, config.stage, headers, remote, cluster)
        return found


    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        if self.context is not None and self.config.x_ratelimit_headers:
            headers.set(b"x-ratelimit-limit", str(self.context.max_tokens).encode())
            headers.set(b"x-ratelimit-remaining", str(self.context.remaining).encode())
            headers.set(b"x-ratelimit-reset", str(self.context.reset_seconds).encode())
        return FilterHeadersStatus.Continue


def _seconds(duration: Any) -> float:
    return float(duration.seconds + duration.nanos / 1e9)


def _bucket(message: Any, path: str, context: Any) -> BucketSpec:
    """A TokenBucket message (Envoy's validation: max_tokens > 0, fill_interval >= 50 ms)."""
    if message.max_tokens < 1:
        raise context.error(path, "max_tokens must be at least 1" if context.has(
            f"{path}.max_tokens") else "missing required field 'max_tokens'")
    per_fill = 1
    if message.HasField("tokens_per_fill"):
        per_fill = message.tokens_per_fill.value
        if per_fill < 1:
            raise context.error(f"{path}.tokens_per_fill", "must be at least 1")
    if not message.HasField("fill_interval"):
        raise context.error(path, "missing required field 'fill_interval'")
    interval = _seconds(message.fill_interval)
    if interval < MIN_FILL_INTERVAL:
        raise context.error(f"{path}.fill_interval", "must be at least 50ms (Envoy's "
                            f"minimum), got {interval:g}s")
    return BucketSpec(message.max_tokens, per_fill, interval)


def _runtime_percent(message: Any, field: str, path: str, context: Any) -> Percent:
    if not message.HasField(field):
        return NEVER
    # A runtime_key is not read (support.py warns once): default_value applies.
    return parse_percent(getattr(message, field).default_value)


def parse_local_rate_limit(message: Any, path: str, context: Any, per_route: bool = False
                           ) -> LocalRateLimitConfig:
    from hbonex.config.route_config import header_value_options, rate_limits

    if not message.stat_prefix:
        raise context.error(path, "missing required field 'stat_prefix'")
    if message.HasField("local_cluster_rate_limit"):
        raise context.error(path, "local_cluster_rate_limit is not implemented by hbonex (no "
                            "local cluster to share the limit with)", "local_cluster_rate_limit")
    bucket = None
    if message.HasField("token_bucket"):
        bucket = _bucket(message.token_bucket, f"{path}.token_bucket", context)
    elif per_route:
        raise context.error(path, "missing required field 'token_bucket' (Envoy requires one "
                            "in a per-route configuration)")
    specs: list[DescriptorSpec] = []
    for index, descriptor in enumerate(message.descriptors):
        where = f"{path}.descriptors[{index}]"
        if bucket is None:
            raise context.error(where, "descriptors need the filter's token_bucket (their "
                                "fill intervals are multiples of its)")
        if not descriptor.entries:
            raise context.error(where, "missing required field 'entries'")
        for number, entry in enumerate(descriptor.entries):
            if not entry.key:
                raise context.error(f"{where}.entries[{number}]", "missing required field "
                                    "'key'")
            if not entry.value:
                raise context.error(f"{where}.entries[{number}]", "an entry without a value "
                                    "(Envoy's dynamic descriptor) is not implemented by "
                                    "hbonex: give each entry its value")
        if not descriptor.HasField("token_bucket"):
            raise context.error(where, "missing required field 'token_bucket'")
        own = _bucket(descriptor.token_bucket, f"{where}.token_bucket", context)
        ratio = own.fill_interval / bucket.fill_interval
        if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
            raise context.error(f"{where}.token_bucket.fill_interval", "must be a multiple "
                                f"of the filter's token_bucket fill_interval "
                                f"({bucket.fill_interval:g}s), as Envoy requires")
        entries = tuple((e.key, e.value) for e in descriptor.entries)
        if any(s.entries == entries for s in specs):
            raise context.error(where, "duplicate descriptor: the same entries are in an "
                                "earlier one")
        specs.append(DescriptorSpec(entries, own))
    status = 429
    if message.HasField("status") and message.status.code >= 400:
        status = message.status.code
    always = (message.always_consume_default_token_bucket.value
              if message.HasField("always_consume_default_token_bucket") else True)
    return LocalRateLimitConfig(
        stat_prefix=message.stat_prefix,
        clock=context.reactor,
        random=random_source(),
        bucket=bucket,
        descriptors=tuple(specs),
        always_consume_default=always,
        per_connection=message.local_rate_limit_per_downstream_connection,
        enabled=_runtime_percent(message, "filter_enabled", path, context),
        enforced=_runtime_percent(message, "filter_enforced", path, context),
        status=status,
        response_headers=HeaderMutations(header_value_options(
            message.response_headers_to_add, f"{path}.response_headers_to_add", context)),
        request_headers=HeaderMutations(header_value_options(
            message.request_headers_to_add_when_not_enforced,
            f"{path}.request_headers_to_add_when_not_enforced", context)),
        x_ratelimit_headers=message.enable_x_ratelimit_headers == 1,  # DRAFT_VERSION_03
        stage=message.stage,
        vh_rate_limits=message.vh_rate_limits,
        rate_limits=rate_limits(message.rate_limits, f"{path}.rate_limits", context),
        resource_exhausted=message.rate_limited_as_resource_exhausted,
    )


@implementer(IPlugin, IHTTPFilterPerRouteExtension)
class LocalRateLimitExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    perRouteTypeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> LocalRateLimitConfig:
        return parse_local_rate_limit(config, path, context)

    def parsePerRouteConfig(self, config: Any, path: str, context: Any
                            ) -> LocalRateLimitConfig:
        return parse_local_rate_limit(config, path, context, per_route=True)

    def filterFactory(self, parsed: Any, context: Any
                      ) -> Callable[[], LocalRateLimitFilter]:
        return lambda: LocalRateLimitFilter(parsed)


__all__ = ["LocalRateLimitConfig", "LocalRateLimitExtension", "LocalRateLimitFilter",
           "parse_local_rate_limit"]
