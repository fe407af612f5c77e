"""
Envoy's unified matcher (``xds.type.matcher.v3.Matcher``) over a downstream connection, as a
listener's ``filter_chain_matcher`` uses it: network inputs read the connection's facts, a
matcher tree looks the value up (exact map, longest prefix, IP ranges) or a matcher list tests
predicates in order, and the result is an action (a filter chain's name) or no match.

The semantics follow Envoy's current matchers: an input with no value (an internal address
for an IP input, no SNI, ...) takes the tree's ``on_no_match``; a nested matcher that does not
match makes its branch not match, so a prefix map tries the next shorter prefix, an IP matcher
the next less specific non-exclusive range, a list the next entry, and then ``on_no_match``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional, Sequence, Union

import attrs

from hbonex.http.matchers import StringMatcher

__all__ = [
    "IPMatcher", "IPRange", "MatcherList", "MatcherTree", "OnMatch",
    "input_value", "split_address",
]

#: A network input: the connection's facts (ConnectionInfo) -> a string, or None (no value).
Input = Callable[[Any], Optional[str]]


def split_address(text: str) -> tuple[str, int] | None:
    """
    ``"ip:port"`` / ``"[ipv6]:port"`` as (normalised ip, port); None for anything else (an
    internal listener's ``envoy://`` address), as Envoy's inputs see only IP addresses.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None


def _ip(address: str) -> str | None:
    split = split_address(address)
    return split[0] if split else None


def _port(address: str) -> str | None:
    split = split_address(address)
    return str(split[1]) if split else None


def _filter_state(key: str) -> Input:
    def read(info: Any) -> str | None:
        state = info.filter_state
        if not state.has_data(key):
            return None
        return str(state.get_data(key))
    return read


def _application_protocols(info: Any) -> str | None:
    # Envoy's form: each protocol quoted, comma-joined ("'h2','http/1.1'").
    protocols = info.requestedApplicationProtocols
    return ",".join(f"'{p}'" for p in protocols) if protocols else None


_INPUTS: dict[str, Input] = {
    "DestinationIPInput": lambda info: _ip(info.localAddress),
    "DestinationPortInput": lambda info: _port(info.localAddress),
    "SourceIPInput": lambda info: _ip(info.remoteAddress),
    "SourcePortInput": lambda info: _port(info.remoteAddress),
    "DirectSourceIPInput": lambda info: _ip(info.directRemoteAddress),
    "ServerNameInput": lambda info: info.requestedServerName or None,
    "TransportProtocolInput": lambda info: info.transportProtocol or None,
    "ApplicationProtocolInput": _application_protocols,
}
INPUT_NAMES = (*_INPUTS, "FilterStateInput")


def input_value(name: str, key: str = "") -> Input:
    """The input named by its message (``DestinationIPInput``...; ``key`` for filter state)."""
    if name == "FilterStateInput":
        return _filter_state(key)
    return _INPUTS[name]


@attrs.frozen
class OnMatch:
    """An action (here: a filter chain's name) or a nested matcher."""

    action: str | None = None
    matcher: Matcher | None = None

    def resolve(self, info: Any) -> str | None:
        if self.matcher is not None:
            return self.matcher.match(info)
        return self.action


def _no_match(on_no_match: OnMatch | None, info: Any) -> str | None:
    return on_no_match.resolve(info) if on_no_match is not None else None


@attrs.frozen
class IPRange:
    """One ``IPMatcher.IPRangeMatcher``: its networks, what to do, and exclusivity."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    on_match: OnMatch
    exclusive: bool = False


@attrs.frozen
class IPMatcher:
    """``xds.type.matcher.v3.IPMatcher`` (the custom_match of a matcher tree)."""

    ranges: tuple[IPRange, ...]

    def candidates(self, value: str) -> list[IPRange]:
        """Ranges containing ``value``, longest prefix first, then in declaration order."""
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            return []
        found: list[tuple[int, int, IPRange]] = []
        for order, item in enumerate(self.ranges):
            lengths = [n.prefixlen for n in item.networks
                       if n.version == ip.version and ip in n]
            if lengths:
                found.append((-max(lengths), order, item))
        return [item for _, _, item in sorted(found, key=lambda t: (t[0], t[1]))]


@attrs.frozen
class MatcherTree:
    """``matcher_tree``: an input looked up in an exact map, a prefix map or an IPMatcher."""

    input: Input
    exact: dict[str, OnMatch] | None = None
    prefix: dict[str, OnMatch] | None = None
    ip: IPMatcher | None = None
    on_no_match: OnMatch | None = None

    def match(self, info: Any) -> str | None:
        value = self.input(info)
        if value is None:
            return _no_match(self.on_no_match, info)
        if self.exact is not None:
            hit = self.exact.get(value)
            result = hit.resolve(info) if hit is not None else None
            if result is not None:
                return result
        elif self.prefix is not None:
            # Longest prefix first; a nested miss tries the next shorter one.
            for key in sorted((k for k in self.prefix if value.startswith(k)), key=len,
                              reverse=True):
                result = self.prefix[key].resolve(info)
                if result is not None:
                    return result
        elif self.ip is not None:
            first = True
            for item in self.ip.candidates(value):
                # An exclusive range is not used once a more specific one was tried.
                if item.exclusive and not first:
                    continue
                result = item.on_match.resolve(info)
                if result is not None:
                    return result
                first = False
        return _no_match(self.on_no_match, info)


@attrs.frozen
class SinglePredicate:
    input: Input
    value: StringMatcher

    def test(self, info: Any) -> bool:
        value = self.input(info)
        return value is not None and self.value.matches(value)


@attrs.frozen
class AnyOf:
    predicates: tuple[Predicate, ...]

    def test(self, info: Any) -> bool:
        return any(p.test(info) for p in self.predicates)


@attrs.frozen
class AllOf:
    predicates: tuple[Predicate, ...]

    def test(self, info: Any) -> bool:
        return all(p.test(info) for p in self.predicates)


@attrs.frozen
class Not:
    predicate: Predicate

    def test(self, info: Any) -> bool:
        return not self.predicate.test(info)


Predicate = Union[SinglePredicate, AnyOf, AllOf, Not]


@attrs.frozen
class MatcherList:
    """``matcher_list``: the first entry whose predicate holds and whose branch matches."""

    matchers: Sequence[tuple[Predicate, OnMatch]]
    on_no_match: OnMatch | None = None

    def match(self, info: Any) -> str | None:
        for predicate, on_match in self.matchers:
            if predicate.test(info):
                result = on_match.resolve(info)
                if result is not None:
                    return result
        return _no_match(self.on_no_match, info)


Matcher = Union[MatcherTree, MatcherList]
