"""
Envoy's RBAC policy engine (``envoy.config.rbac.v3.RBAC``), shared by
``envoy.filters.http.rbac`` and ``envoy.filters.network.rbac``.

A policy matches when one of its permissions (what is asked: headers, path, destination,
SNI) and one of its principals (who asks: peer identity, addresses, filter state, headers)
match.  The engine's action decides what a match means: ALLOW lets through only what some
policy matches, DENY refuses what some policy matches, LOG lets everything through and only
marks the matches for the access log.  Policies are tried in name order (Envoy keeps them in
a sorted map); the first match names the effective policy.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from typing import Any, Protocol, Sequence

import attrs

from hbonex.http.headers import Headers
from hbonex.http.matchers import StringMatcher
from hbonex.http.routing import HeaderMatcher
from hbonex.observability.stats import STATS, Counter
from hbonex.tunnel.connect import ConnectRequest

__all__ = [
    "Action",
    "And",
    "Any_",
    "Attributes",
    "Authenticated",
    "Decision",
    "DestinationPort",
    "DestinationPortRange",
    "Engine",
    "FilterState",
    "Header",
    "IpMatcher",
    "Matcher",
    "Not",
    "Or",
    "Policy",
    "RbacStats",
    "ServerName",
    "UrlPath",
    "log_hint",
    "policies_of",
    "response_detail",
    "stat_prefix_join",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    LOG = "LOG"


@functools.lru_cache(maxsize=4096)
def _ip_port(text: str) -> tuple[IPAddress | None, int | None]:
    """``1.2.3.4:5`` / ``[::1]:5`` -> (ip, port); an internal address has neither."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        return None, None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host), int(port)
    except ValueError:
        return None, None


class Attributes:
    """
    What policies look at for one request or connection: the connection's facts
    (IConnectionInfo), the request headers (None at L4) and the request's filter state.
    Derived values are computed on first use only.
    """

    def __init__(self, info: Any, headers: Headers | None = None,
                 request_state: Any = None) -> None:
        self.info = info
        self.headers = headers
        self.request_state = request_state
        self._request: ConnectRequest | None = None

    @property
    def peer_identity(self) -> str:
        return str(getattr(self.info, "peerIdentity", "") or "")

    @property
    def server_name(self) -> str:
        return str(getattr(self.info, "requestedServerName", "") or "")

    def remote_ip(self) -> IPAddress | None:
        """The connection's remote address (as a listener filter may have restored it)."""
        return _ip_port(str(getattr(self.info, "remoteAddress", "")))[0]

    def direct_remote_ip(self) -> IPAddress | None:
        """The physical peer's address, whatever a listener filter restored."""
        direct = getattr(self.info, "directRemoteAddress", "") or getattr(
            self.info, "remoteAddress", "")
        return _ip_port(str(direct))[0]

    def local(self) -> tuple[IPAddress | None, int | None]:
        return _ip_port(str(getattr(self.info, "localAddress", "")))

    def request(self) -> ConnectRequest | None:
        """The headers as the route matchers read them (repeated values joined with ',')."""
        if self.headers is None:
            return None
        if self._request is None:
            regular: dict[str, str] = {}
            for name, value in self.headers:
                if name.startswith(b":"):
                    continue
                key, text = name.decode("latin-1"), value.decode("latin-1")
                regular[key] = f"{regular[key]},{text}" if key in regular else text

            def pseudo(name: bytes) -> str | None:
                value = self.headers.get(name) if self.headers is not None else None
                return None if value is None else value.decode("latin-1")

            self._request = ConnectRequest(
                method=pseudo(b":method") or "", authority=pseudo(b":authority") or "",
                headers=tuple(regular.items()), protocol=pseudo(b":protocol"),
                path=pseudo(b":path"), scheme=pseudo(b":scheme"))
        return self._request

    def filter_state(self, key: str) -> str | None:
        """The request's object, else the connection's (a stream's state sits on its
        connection's in Envoy)."""
        for state in (self.request_state, getattr(self.info, "filter_state", None)):
            if state is not None and state.has_data(key):
                return str(state.get_data(key))
        return None


class Matcher(Protocol):
    def matches(self, attributes: Attributes) -> bool: ...


@attrs.frozen
class Any_:
    def matches(self, attributes: Attributes) -> bool:
        return True


@attrs.frozen
class And:
    rules: tuple[Matcher, ...]

    def matches(self, attributes: Attributes) -> bool:
        return all(rule.matches(attributes) for rule in self.rules)


@attrs.frozen
class Or:
    rules: tuple[Matcher, ...]

    def matches(self, attributes: Attributes) -> bool:
        return any(rule.matches(attributes) for rule in self.rules)


@attrs.frozen
class Not:
    rule: Matcher

    def matches(self, attributes: Attributes) -> bool:
        return not self.rule.matches(attributes)


@attrs.frozen
class Authenticated:
    """The mTLS peer's URI SAN (SPIFFE id); without a matcher, any authenticated peer."""

    principal_name: StringMatcher | None = None

    def matches(self, attributes: Attributes) -> bool:
        peer = attributes.peer_identity
        if not peer:
            return False
        return self.principal_name is None or self.principal_name.matches(peer)


@attrs.frozen
class IpMatcher:
    """A CIDR range on one of the addresses: ``direct_remote``, ``remote``, ``destination``."""

    network: IPNetwork
    address: str

    def matches(self, attributes: Attributes) -> bool:
        if self.address == "destination":
            ip = attributes.local()[0]
        elif self.address == "direct_remote":
            ip = attributes.direct_remote_ip()
        else:
            ip = attributes.remote_ip()
        return ip is not None and ip.version == self.network.version and ip in self.network


@attrs.frozen
class DestinationPort:
    port: int

    def matches(self, attributes: Attributes) -> bool:
        return attributes.local()[1] == self.port


@attrs.frozen
class DestinationPortRange:
    """Envoy's Int32Range: ``start`` included, ``end`` excluded."""

    start: int
    end: int

    def matches(self, attributes: Attributes) -> bool:
        port = attributes.local()[1]
        return port is not None and self.start <= port < self.end


@attrs.frozen
class ServerName:
    matcher: StringMatcher

    def matches(self, attributes: Attributes) -> bool:
        return self.matcher.matches(attributes.server_name)


@attrs.frozen
class Header:
    """A route HeaderMatcher on the request headers; nothing matches at L4."""

    matcher: HeaderMatcher

    def matches(self, attributes: Attributes) -> bool:
        request = attributes.request()
        return request is not None and self.matcher.matches(request)


@attrs.frozen
class UrlPath:
    """Envoy's PathMatcher: the :path without its query and fragment."""

    matcher: StringMatcher

    def matches(self, attributes: Attributes) -> bool:
        request = attributes.request()
        if request is None or request.path is None:
            return False
        path = request.path.split("?", 1)[0].split("#", 1)[0]
        return self.matcher.matches(path)


@attrs.frozen
class FilterState:
    key: str
    matcher: StringMatcher

    def matches(self, attributes: Attributes) -> bool:
        value = attributes.filter_state(self.key)
        return value is not None and self.matcher.matches(value)


@attrs.frozen
class Policy:
    name: str
    permissions: tuple[Matcher, ...]
    principals: tuple[Matcher, ...]

    def matches(self, attributes: Attributes) -> bool:
        return (any(p.matches(attributes) for p in self.permissions)
                and any(p.matches(attributes) for p in self.principals))


@attrs.frozen
class Decision:
    allowed: bool
    #: The first matching policy's name, or "" when none matched.
    policy: str = ""

    @property
    def result(self) -> str:
        """Envoy's engine result in dynamic metadata."""
        return "allowed" if self.allowed else "denied"


@attrs.frozen
class Engine:
    """One ``rules`` (or ``shadow_rules``) block: an action over named policies."""

    action: Action
    policies: tuple[Policy, ...] = ()

    def evaluate(self, attributes: Attributes) -> Decision:
        matched = ""
        for policy in self.policies:
            if policy.matches(attributes):
                matched = policy.name
                break
        if self.action is Action.ALLOW:
            return Decision(bool(matched), matched)
        if self.action is Action.DENY:
            return Decision(not matched, matched)
        return Decision(True, matched)


def stat_prefix_join(prefix: str, token: str) -> str:
    """Envoy's statPrefixJoin: one '.' between the two, whether or not ``prefix`` ends in one."""
    if not prefix:
        return token
    return f"{prefix}{token}" if prefix.endswith(".") else f"{prefix}.{token}"


class RbacStats:
    """
    Envoy's RBAC counters: ``<prefix>rbac.<rules_stat_prefix>allowed`` / ``denied`` and
    ``<prefix>rbac.<shadow_rules_stat_prefix>shadow_allowed`` / ``shadow_denied``; with
    ``track_per_rule_stats``, ``...policy.<name>.allowed`` (and so on) per policy.
    """

    def __init__(self, prefix: str, rules_prefix: str = "", shadow_prefix: str = "",
                 per_rule: bool = False) -> None:
        base = stat_prefix_join(prefix, "rbac.")
        self.rules_prefix = stat_prefix_join(base, rules_prefix)
        self.shadow_prefix = stat_prefix_join(base, shadow_prefix)
        self.per_rule = per_rule
        self.allowed = STATS.counter(stat_prefix_join(self.rules_prefix, "allowed"))
        self.denied = STATS.counter(stat_prefix_join(self.rules_prefix, "denied"))
        self.shadow_allowed = STATS.counter(stat_prefix_join(self.shadow_prefix,
                                                             "shadow_allowed"))
        self.shadow_denied = STATS.counter(stat_prefix_join(self.shadow_prefix,
                                                            "shadow_denied"))
        self._policy: dict[str, Counter] = {}

    def count(self, decision: Decision, shadow: bool, per_rule: bool | None = None) -> None:
        if shadow:
            (self.shadow_allowed if decision.allowed else self.shadow_denied).inc()
        else:
            (self.allowed if decision.allowed else self.denied).inc()
        if decision.policy and (self.per_rule if per_rule is None else per_rule):
            prefix = self.shadow_prefix if shadow else self.rules_prefix
            name = f"shadow_{decision.result}" if shadow else decision.result
            key = stat_prefix_join(stat_prefix_join(prefix, "policy."),
                                   f"{decision.policy}.{name}")
            counter = self._policy.get(key)
            if counter is None:
                counter = self._policy[key] = STATS.counter(key)
            counter.inc()


def response_detail(policy: str) -> str:
    """Envoy's response code details (and connection termination details) for a deny."""
    name = "".join("_" if c.isspace() else c for c in policy) if policy else "none"
    return f"rbac_access_denied_matched_policy[{name}]"


def log_hint(engine: Engine | None, decision: Decision) -> dict[str, Any] | None:
    """A LOG engine's verdict for access loggers (``envoy.common``), else None."""
    if engine is None or engine.action is not Action.LOG:
        return None
    return {"access_log_hint": bool(decision.policy)}


def policies_of(policies: Sequence[Policy]) -> tuple[Policy, ...]:
    """Name order, as Envoy's map keeps them."""
    return tuple(sorted(policies, key=lambda p: p.name))
