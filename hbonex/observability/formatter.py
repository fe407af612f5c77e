"""
Envoy substitution operators (``%DOWNSTREAM_REMOTE_ADDRESS%`` ...) for tunnel hostnames,
headers and access logs.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Mapping

from hbonex.errors import ConfigError

_OPERATOR = re.compile(r"%([A-Z_0-9]+)(\([^)]*\))?(:\d+)?%")


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
    "RESPONSE_CODE_DETAILS": lambda c: c.get("response_code_details", ""),
    "PROTOCOL": lambda c: c.get("protocol", ""),
    "ROUTE_NAME": lambda c: c.get("route_name", ""),
    "CONNECTION_ID": lambda c: c.get("connection_id", ""),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda c: c.get("upstream_failure", ""),
    "DOWNSTREAM_LOCAL_URI_SAN": lambda c: c.get("local_uri_san", ""),
    # Envoy's AccessLogType: TcpConnectionEnd, TcpPeriodic, TcpUpstreamConnected,
    # DownstreamEnd, DownstreamPeriodic, DownstreamTunnelSuccessfullyEstablished.
    "ACCESS_LOG_TYPE": lambda c: c.get("access_log_type", ""),
}


def _headers_operator(kind: str, arg: str, path: str) -> Callable[[Mapping[str, str]], str]:
    """
    ``%REQ(X?Y):Z%`` / ``%RESP(X?Y):Z%``: header X (else Y) of the request or response,
    truncated to Z characters.
    """
    text = arg.strip("()")
    names, _, limit = text.partition("):") if "):" in arg else (text, "", "")
    first, _, fallback = names.partition("?")
    if not first:
        raise ConfigError(path, f"%{kind}()% needs a header name")
    prefix = "req:" if kind == "REQ" else "resp:"
    keys = [prefix + first.lower()] + ([prefix + fallback.lower()] if fallback else [])
    length = int(limit) if limit.isdigit() else None

    def render(c: Mapping[str, str]) -> str:
        for key in keys:
            value = c.get(key)
            if value is not None:
                return value[:length] if length is not None else value
        return ""

    return render


def _start_time(arg: str) -> Callable[[Mapping[str, str]], str]:
    fmt = arg[1:-1]

    def render(c: Mapping[str, str]) -> str:
        epoch = c.get("start_epoch")
        if not fmt or not epoch:
            return c.get("start_time", "")
        return time.strftime(fmt.replace("%f", "000").replace("%3f", "000"),
                             time.gmtime(float(epoch)))

    return render


def _filter_state(arg: str) -> Callable[[Mapping[str, str]], str]:
    key = arg[1:-1].split(":", 1)[0]

    def render(c: Mapping[str, str]) -> str:
        return c.get("fs:" + key, "")

    return render


class Template:
    """
    A string with substitution operators, checked when the configuration is loaded.
    """

    def __init__(self, text: str, path: str = "") -> None:
        self.text = text
        self._parts: list[str | Callable[[Mapping[str, str]], str]] = []
        pos = 0
        for m in _OPERATOR.finditer(text):
            name, arg = m.group(1), m.group(2) or ""
            operator: Callable[[Mapping[str, str]], str]
            if name in ("REQ", "RESP") and arg:
                operator = _headers_operator(name, arg + (m.group(3) or ""), path)
            elif name == "START_TIME" and arg:
                operator = _start_time(arg)
            elif name == "FILTER_STATE" and arg:
                operator = _filter_state(arg)
            elif name in OPERATORS and not arg:
                operator = OPERATORS[name]
            else:
                known = ", ".join(f"%{k}%" for k in sorted(OPERATORS))
                raise ConfigError(path, f"unknown substitution operator %{name}{arg}%; known: "
                                  f"{known}, %REQ(X)%, %RESP(X)%, %START_TIME(FORMAT)%, "
                                  "%FILTER_STATE(KEY)%")
            if m.start() > pos:
                self._parts.append(text[pos : m.start()])
            self._parts.append(operator)
            pos = m.end()
        if pos < len(text):
            self._parts.append(text[pos:])
        self.constant = all(isinstance(p, str) for p in self._parts)

    def render(self, context: Mapping[str, str], empty: str = "-") -> str:
        """
        The text with each operator's value; an operator without one gives ``empty`` (the
        access log's "-"; header values take "", as Envoy's header formatters do).
        """
        if self.constant:
            return self.text
        return "".join(p if isinstance(p, str) else (p(context) or empty) for p in self._parts)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"
