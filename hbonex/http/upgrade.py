"""
HTTP upgrades other than CONNECT (Envoy's ``upgrade_configs``: WebSocket, or any other
``Upgrade`` token), as the connection manager decides them.

A request is an upgrade when it carries ``Upgrade`` and a ``Connection`` naming ``upgrade``
(Envoy's ``Utility::isUpgrade``).  Whether it may go on is Envoy's
``createUpgradeFilterChain``: the route's own ``upgrade_configs`` entry for the type decides if
there is one (``enabled: false`` refuses even when the HCM allows it), else the HCM's entry;
a type named nowhere is refused (403 ``upgrade_failed``).  Types compare case-insensitively.

Over HTTP/2 an upgrade is an extended CONNECT (RFC 8441): ``:method CONNECT`` with a
``:protocol`` other than ``bytestream`` (Envoy's ``isH2UpgradeRequest``; ``bytestream`` is
a CONNECT tunnel).  As Envoy's HTTP/2 codec does, the request is turned into the HTTP/1.1
form before the filters see it, and a 101 into the 200 HTTP/2 answers with.
"""

from __future__ import annotations

import re
from typing import Iterable

from hbonex.http.headers import Headers

#: RFC 9110 §7.8 protocol (a token, and maybe "/" a version token): what an upgrade_type
#: must be to ever match an Upgrade header.
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+(/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?$")

#: The Upgrade value HTTP/2 over cleartext asks for: Envoy ignores it (the request is served
#: as an ordinary one, its upgrade headers removed); so does hbonex.
H2C = b"h2c"

#: An upgrade map as configured: (lower-cased type, enabled) pairs.
UpgradeMap = tuple[tuple[str, bool], ...]


def connection_tokens(headers: Headers) -> set[bytes]:
    return {t.strip().lower() for t in b",".join(headers.get_all(b"connection")).split(b",")
            if t.strip()}


def upgrade_type(headers: Headers) -> str | None:
    """
    The upgrade a request (or a response) asks for, lower-cased; None if it is none (h2c
    included: see H2C).
    """
    value = headers.get(b"upgrade")
    if not value or b"upgrade" not in connection_tokens(headers):
        return None
    value = value.strip().lower()
    return None if value == H2C else value.decode("latin-1")


#: The extended CONNECT :protocol that means a plain CONNECT tunnel (Envoy's).
BYTESTREAM = b"bytestream"


def h2_upgrade_protocol(items: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """
    The ``:protocol`` of an HTTP/2 extended CONNECT that is an upgrade (websocket...), or
    None: not CONNECT, no or an empty ``:protocol``, or ``bytestream`` (a tunnel).
    """
    method = protocol = None
    for name, value in items:
        if not name.startswith(b":"):
            break
        if name == b":method":
            method = value
        elif name == b":protocol":
            protocol = value
    if method != b"CONNECT" or not protocol or protocol == BYTESTREAM:
        return None
    return protocol


def h2_request_to_h1(headers: Headers) -> Headers:
    """
    Envoy's ``transformUpgradeRequestFromH2toH1``, in place: ``:method GET``,
    ``upgrade: <:protocol>``, ``connection: upgrade``, no ``:protocol`` (``:path`` and
    ``:authority`` stay).
    """
    protocol = headers.get(b":protocol") or b""
    headers.set(b":method", b"GET")
    headers.remove(b":protocol")
    headers.set(b"upgrade", protocol)
    headers.set(b"connection", b"upgrade")
    return headers


def h1_response_to_h2(headers: Headers) -> Headers:
    """
    Envoy's ``transformUpgradeResponseFromH1toH2``, on a copy: 101 becomes 200, ``upgrade``
    and ``connection`` go, and so does a ``content-length: 0``.
    """
    result = headers.copy()
    if result.get(b":status") == b"101":
        result.set(b":status", b"200")
    result.remove(b"upgrade")
    result.remove(b"connection")
    if result.get(b"content-length") == b"0":
        result.remove(b"content-length")
    return result


def lookup(upgrades: Iterable[tuple[str, bool]], kind: str) -> bool | None:
    for name, enabled in upgrades:
        if name == kind:
            return enabled
    return None


def upgrade_allowed(hcm: UpgradeMap, route: UpgradeMap, kind: str) -> bool:
    """Envoy's HCM / route table: the route's entry overrides the HCM's either way."""
    on_route = lookup(route, kind.lower())
    if on_route is not None:
        return on_route
    return bool(lookup(hcm, kind.lower()))


__all__ = ["BYTESTREAM", "H2C", "TOKEN", "UpgradeMap", "connection_tokens",
           "h1_response_to_h2", "h2_request_to_h1", "h2_upgrade_protocol", "lookup",
           "upgrade_allowed", "upgrade_type"]
