"""
HTTP upgrades other than CONNECT (Envoy's ``upgrade_configs``: WebSocket, or any other
``Upgrade`` token), as the connection manager decides them.

A request is an upgrade when it carries ``Upgrade`` and a ``Connection`` naming ``upgrade``
(Envoy's ``Utility::isUpgrade``).  Whether it may go on is Envoy's
``createUpgradeFilterChain``: the route's own ``upgrade_configs`` entry for the type decides if
there is one (``enabled: false`` refuses even when the HCM allows it), else the HCM's entry;
a type named nowhere is refused (403 ``upgrade_failed``).  Types compare case-insensitively.
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


__all__ = ["H2C", "TOKEN", "UpgradeMap", "connection_tokens", "lookup", "upgrade_allowed",
           "upgrade_type"]
