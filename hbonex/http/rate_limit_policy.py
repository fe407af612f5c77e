"""
A route's ``rate_limits`` (Envoy's RateLimitPolicy): each entry's actions make one descriptor
of a request, a list of (key, value) entries that a rate limiter matches against its own
descriptors.  An entry whose action cannot produce its entry (a missing header, a header
match that fails) makes no descriptor at all, as in Envoy.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from hbonex.http.headers import Headers


@attrs.frozen
class RequestHeadersAction:
    header_name: str
    descriptor_key: str
    skip_if_absent: bool = False

    def entry(self, headers: Headers, remote: str, cluster: str
              ) -> tuple[str, str] | None | bool:
        value = headers.get(self.header_name.encode("latin-1"))  # the first, as Envoy
        if value is None:
            return True if self.skip_if_absent else None
        return (self.descriptor_key, value.decode("latin-1"))


@attrs.frozen
class GenericKeyAction:
    descriptor_value: str
    descriptor_key: str = "generic_key"

    def entry(self, headers: Headers, remote: str, cluster: str) -> tuple[str, str]:
        return (self.descriptor_key, self.descriptor_value)


@attrs.frozen
class RemoteAddressAction:
    def entry(self, headers: Headers, remote: str, cluster: str) -> tuple[str, str] | None:
        host = remote.rpartition(":")[0] if ":" in remote else remote
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            return ("remote_address", str(ipaddress.ip_address(host)))
        except ValueError:
            return None  # not an IP peer (an internal listener): no descriptor


@attrs.frozen
class DestinationClusterAction:
    def entry(self, headers: Headers, remote: str, cluster: str) -> tuple[str, str] | None:
        return ("destination_cluster", cluster) if cluster else None


@attrs.frozen
class HeaderValueMatchAction:
    descriptor_value: str
    headers: tuple[Any, ...]  # hbonex.http.routing.HeaderMatcher
    expect_match: bool = True
    descriptor_key: str = "header_match"

    def entry(self, headers: Headers, remote: str, cluster: str) -> tuple[str, str] | None:
        from hbonex.http.connection_manager import request_of

        request = request_of(headers)
        matched = all(m.matches(request) for m in self.headers)
        return (self.descriptor_key, self.descriptor_value) if matched == self.expect_match \
            else None


@attrs.frozen
class RateLimitPolicy:
    """One RateLimit entry of a route, a virtual host, or the local_ratelimit filter."""

    actions: tuple[Any, ...]
    stage: int = 0
    disable_key: str = ""

    def descriptor(self, headers: Headers, remote: str, cluster: str
                   ) -> tuple[tuple[str, str], ...] | None:
        entries = []
        for action in self.actions:
            entry = action.entry(headers, remote, cluster)
            if entry is None:
                return None
            if entry is not True:
                entries.append(entry)
        return tuple(entries) or None


def descriptors(policies: tuple[RateLimitPolicy, ...], stage: int, headers: Headers,
                remote: str, cluster: str) -> list[tuple[tuple[str, str], ...]]:
    """The descriptors of the policies of ``stage`` (those with a disable_key are skipped)."""
    found = []
    for policy in policies:
        if policy.stage != stage or policy.disable_key:
            continue
        made = policy.descriptor(headers, remote, cluster)
        if made is not None:
            found.append(made)
    return found


__all__ = ["DestinationClusterAction", "GenericKeyAction", "HeaderValueMatchAction",
           "RateLimitPolicy", "RemoteAddressAction", "RequestHeadersAction", "descriptors"]
