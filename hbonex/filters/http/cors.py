"""
``envoy.filters.http.cors``: Cross-Origin Resource Sharing, as Envoy's cors filter does it.
The filter's own config is empty; the policies (CorsPolicy) come from the route's
``typed_per_filter_config`` levels, each field taken from the most specific level that sets
it.  A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered here
with 200 and the Access-Control-Allow-* headers; the response to an actual cross-origin
request gets Access-Control-Allow-Origin (and -Credentials, -Expose-Headers) when its
origin is allowed.  Istio puts this filter, unconfigured, in every waypoint chain.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.http.filter_manager import (
    FilterHeadersStatus,
)
from hbonex.http.headers import Headers
from hbonex.http.matchers import StringMatcher
from hbonex.http.pass_through import PassThroughFilter
from hbonex.interfaces import IHTTPFilterPerRouteExtension, IStreamFilter
from hbonex.tls.transport_sockets import string_matcher

NAME = "envoy.filters.http.cors"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"

#: What filter_enabled / shadow_enabled draw from (tests pass their own, seeded).
_RNG = random.Random()

#: FractionalPercent's denominators.
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


@attrs.frozen
class Fraction:
    """A RuntimeFractionalPercent's default_value: ``numerator`` out of ``denominator``."""

    numerator: int
    denominator: int

    def sample(self, rng: random.Random) -> bool:
        # Envoy's featureEnabled: a random draw modulo the denominator, below the numerator.
        return rng.randrange(self.denominator) < self.numerator


@attrs.frozen
class CorsPolicy:
    """One level's CorsPolicy; empty strings and None are "not set here"."""

    allow_origins: tuple[StringMatcher, ...] = ()
    allow_methods: str = ""
    allow_headers: str = ""
    expose_headers: str = ""
    max_age: str = ""
    allow_credentials: bool | None = None
    allow_private_network_access: bool | None = None
    forward_not_matching_preflights: bool | None = None
    #: None: enabled for every request (Envoy's default without filter_enabled).
    filter_enabled: Fraction | None = None
    #: None: no shadow mode.
    shadow_enabled: Fraction | None = None


class _Policies:
    """The levels, most specific first, read field by field as Envoy's CorsFilter does."""

    def __init__(self, levels: tuple[CorsPolicy, ...]) -> None:
        self.levels = levels

    def first(self, field: str, default: Any) -> Any:
        for policy in self.levels:
            value = getattr(policy, field)
            if value:
                return value
        return default

    def flag(self, field: str, default: bool) -> bool:
        for policy in self.levels:
            value = getattr(policy, field)
            if value is not None:
                return bool(value)
        return default


@implementer(IStreamFilter)
class CorsFilter(PassThroughFilter):
    """One per request."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else _RNG
        self.decoder: Any = None
        self.policies = _Policies(())
        self.is_cors_request = False
        #: The request's Origin when a policy allows it.
        self.latched_origin: bytes = b""

    def setDecoderFilterCallbacks(self, callbacks: Any) -> None:
        self.decoder = callbacks

    def setEncoderFilterCallbacks(self, callbacks: Any) -> None:
        pass

    def _origin_allowed(self, origin: str) -> bool:
        return any(m.matches("*") or m.matches(origin)
                   for m in self.policies.first("allow_origins", ()))

    def decodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        route = self.decoder.route()
        if route is None or route.direct_status is not None:
            return FilterHeadersStatus.Continue  # Envoy: no route entry
        self.policies = _Policies(tuple(reversed(self.decoder.perFilterConfigs())))
        top = self.policies.levels[0] if self.policies.levels else None
        enabled = shadow = False
        if top is not None:
            enabled = top.filter_enabled is None or top.filter_enabled.sample(self.rng)
            shadow = top.shadow_enabled is not None and top.shadow_enabled.sample(self.rng)
        if not enabled and not shadow:
            return FilterHeadersStatus.Continue
        origin = headers.get(b"origin")
        if not origin:
            return FilterHeadersStatus.Continue
        allowed = self._origin_allowed(origin.decode("latin-1"))
        if allowed:
            self.latched_origin = origin
        if not enabled:
            return FilterHeadersStatus.Continue  # shadow mode: evaluated, not enforced
        self.is_cors_request = True
        if headers.get(b":method") != b"OPTIONS":
            return FilterHeadersStatus.Continue
        request_method = headers.get(b"access-control-request-method")
        if not request_method:
            return FilterHeadersStatus.Continue
        if not allowed and self.policies.flag("forward_not_matching_preflights", True):
            return FilterHeadersStatus.Continue
        self.decoder.streamInfo().response_code_details = "cors_response"
        self.decoder.encodeHeaders(self._preflight(headers, origin, allowed), True)
        return FilterHeadersStatus.StopIteration

    def _preflight(self, request: Headers, origin: bytes, allowed: bool) -> Headers:
        """The answer to a preflight (Envoy's, header for header)."""
        response = Headers([(b":status", b"200")])
        if allowed:
            response.set(b"access-control-allow-origin", origin)
        if self.policies.flag("allow_credentials", False):
            response.set(b"access-control-allow-credentials", b"true")
        methods = self.policies.first("allow_methods", "")
        if methods:
            response.set(b"access-control-allow-methods",
                         request.get(b"access-control-request-method") or b""
                         if methods == "*" else methods.encode("latin-1"))
        allow_headers = self.policies.first("allow_headers", "")
        if allow_headers:
            response.set(b"access-control-allow-headers",
                         request.get(b"access-control-request-headers") or b""
                         if allow_headers == "*" else allow_headers.encode("latin-1"))
        max_age = self.policies.first("max_age", "")
        if max_age:
            response.set(b"access-control-max-age", max_age.encode("latin-1"))
        if (self.policies.flag("allow_private_network_access", False)
                and request.get(b"access-control-request-private-network") == b"true"):
            response.set(b"access-control-allow-private-network", b"true")
        return response


    def encodeHeaders(self, headers: Headers, endStream: bool) -> Any:
        if not self.is_cors_request or not self.latched_origin:
            return FilterHeadersStatus.Continue
        headers.set(b"access-control-allow-origin", self.latched_origin)
        if self.policies.flag("allow_credentials", False):
            headers.set(b"access-control-allow-credentials", b"true")
        expose = self.policies.first("expose_headers", "")
        if expose:
            headers.set(b"access-control-expose-headers", expose.encode("latin-1"))
        return FilterHeadersStatus.Continue


def _fraction(message: Any, path: str, context: Any) -> Fraction:
    """A RuntimeFractionalPercent: its default_value (no runtime overrides here)."""
    value = message.default_value
    enum = value.DESCRIPTOR.fields_by_name["denominator"].enum_type
    denominator = _DENOMINATORS[enum.values_by_number[value.denominator].name]
    if value.numerator > denominator:
        context.warn(f"{path}.default_value.numerator", f"{value.numerator} is above the "
                     f"denominator {denominator}: every request")
    return Fraction(min(value.numerator, denominator), denominator)


def parse_policy(message: Any, path: str, context: Any) -> CorsPolicy:
    """envoy.extensions.filters.http.cors.v3.CorsPolicy."""

    def flag(name: str) -> bool | None:
        return getattr(message, name).value if message.HasField(name) else None

    def fraction(name: str) -> Fraction | None:
        if not message.HasField(name):
            return None
        return _fraction(getattr(message, name), f"{path}.{name}", context)

    return CorsPolicy(
        allow_origins=tuple(
            string_matcher(m, f"{path}.allow_origin_string_match[{i}]", context)
            for i, m in enumerate(message.allow_origin_string_match)),
        allow_methods=message.allow_methods,
        allow_headers=message.allow_headers,
        expose_headers=message.expose_headers,
        max_age=message.max_age,
        allow_credentials=flag("allow_credentials"),
        allow_private_network_access=flag("allow_private_network_access"),
        forward_not_matching_preflights=flag("forward_not_matching_preflights"),
        filter_enabled=fraction("filter_enabled"),
        shadow_enabled=fraction("shadow_enabled"),
    )


@implementer(IPlugin, IHTTPFilterPerRouteExtension)
class CorsExtension:
    name = NAME
    typeUrls = (TYPE_URL,)
    perRouteTypeUrls = (PER_ROUTE_TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> None:
        return None  # Envoy's Cors message has no fields

    def parsePerRouteConfig(self, config: Any, path: str, context: Any) -> CorsPolicy:
        return parse_policy(config, path, context)

    def filterFactory(self, parsed: Any, context: Any) -> Callable[[], CorsFilter]:
        return CorsFilter


__all__ = ["CorsExtension", "CorsFilter", "CorsPolicy"]
