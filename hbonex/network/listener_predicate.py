"""
Envoy's ``ListenerFilterChainMatchPredicate``: a listener filter's ``filter_disabled``, tested
on the connection as the filters before it left it (a destination restored by original_dst
counts), before the filter runs.
"""

from __future__ import annotations

from typing import Any, Union

import attrs

from hbonex.network.matching import split_address

__all__ = ["AllPredicates", "AnyMatch", "AnyPredicate", "DestinationPortRange", "NotPredicate"]


@attrs.frozen
class AnyMatch:
    def matches(self, info: Any) -> bool:
        return True


@attrs.frozen
class DestinationPortRange:
    """``destination_port_range``: [start, end) on the local port (IP addresses only)."""

    start: int
    end: int

    def matches(self, info: Any) -> bool:
        split = split_address(info.localAddress)
        return split is not None and self.start <= split[1] < self.end


@attrs.frozen
class AllPredicates:
    predicates: tuple[ListenerPredicate, ...]

    def matches(self, info: Any) -> bool:
        return all(p.matches(info) for p in self.predicates)


@attrs.frozen
class AnyPredicate:
    predicates: tuple[ListenerPredicate, ...]

    def matches(self, info: Any) -> bool:
        return any(p.matches(info) for p in self.predicates)


@attrs.frozen
class NotPredicate:
    predicate: ListenerPredicate

    def matches(self, info: Any) -> bool:
        return not self.predicate.matches(info)


ListenerPredicate = Union[AnyMatch, DestinationPortRange, AllPredicates, AnyPredicate,
                          NotPredicate]
