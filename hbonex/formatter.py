"""
Envoy substitution operators (``%DOWNSTREAM_REMOTE_ADDRESS%`` ...) for tunnel hostnames,
headers and access logs.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

from hbonex.errors import ConfigError

_OPERATOR = re.compile(r"%([A-Z_0-9]+)(\([^)]*\))?%")


def _without_port(address: str) -> str:
    if address.startswith("["):
        return address[1 : address.find("]")]
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else address


def _port(address: str) -> str:
    host, sep, port = address.rpartition(":")
    return port if sep and port.isdigit() else ""


OPERATORS: Mapping[str, Callable[[Mapping[str, str]], str]] = {
    "DOWNSTREAM_REMOTE_ADDRESS": lambda c: c.get("remote", ""),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda c: _without_port(c.get("remote", "")),
    "DOWNSTREAM_REMOTE_PORT": lambda c: _port(c.get("remote", "")),
    "DOWNSTREAM_LOCAL_ADDRESS": lambda c: c.get("local", ""),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda c: _without_port(c.get("local", "")),
    "DOWNSTREAM_LOCAL_PORT": lambda c: _port(c.get("local", "")),
    "REQUESTED_SERVER_NAME": lambda c: c.get("sni", ""),
    "UPSTREAM_HOST": lambda c: c.get("upstream_host", ""),
    "UPSTREAM_CLUSTER": lambda c: c.get("upstream_cluster", ""),
    "DOWNSTREAM_PEER_URI_SAN": lambda c: c.get("peer_uri_san", ""),
    "RESPONSE_CODE": lambda c: c.get("response_code", ""),
    "BYTES_RECEIVED": lambda c: c.get("bytes_received", "0"),
    "BYTES_SENT": lambda c: c.get("bytes_sent", "0"),
    "DURATION": lambda c: c.get("duration_ms", ""),
    "START_TIME": lambda c: c.get("start_time", ""),
    "CONNECTION_TERMINATION_DETAILS": lambda c: c.get("termination", ""),
    "RESPONSE_FLAGS": lambda c: c.get("response_flags", ""),
}


class Template:
    """
    A string with substitution operators, checked when the configuration is loaded.
    """

    def __init__(self, text: str, path: str = "") -> None:
        self.text = text
        self._parts: list[str | Callable[[Mapping[str, str]], str]] = []
        pos = 0
        for m in _OPERATOR.finditer(text):
            name = m.group(1)
            if name not in OPERATORS:
                known = ", ".join(f"%{k}%" for k in sorted(OPERATORS))
                raise ConfigError(path, f"unknown substitution operator %{name}%; known: {known}")
            if m.start() > pos:
                self._parts.append(text[pos : m.start()])
            self._parts.append(OPERATORS[name])
            pos = m.end()
        if pos < len(text):
            self._parts.append(text[pos:])
        self.constant = all(isinstance(p, str) for p in self._parts)

    def render(self, context: Mapping[str, str]) -> str:
        if self.constant:
            return self.text
        return "".join(p if isinstance(p, str) else (p(context) or "-") for p in self._parts)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"
