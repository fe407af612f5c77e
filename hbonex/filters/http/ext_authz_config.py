"""
Configuration of ``envoy.filters.http.ext_authz`` (Envoy's ExtAuthz with ``http_service``, and
ExtAuthzPerRoute) parsed into values the filter reads per request.
"""

from __future__ import annotations

from typing import Any

import attrs

from hbonex.http.matchers import StringMatcher, any_matches
from hbonex.observability.formatter import Template
from hbonex.observability.stats import STATS
from hbonex.tls.transport_sockets import string_matcher

#: Request headers the authorization service always gets (Envoy's defaults for an
#: http_service: Host, Method, Path, plus Authorization; Content-Length is set from the body).
DEFAULT_ALLOWED = frozenset({b":authority", b":method", b":path", b"authorization"})
#: With allowed_client_headers set, these go to the client on a denial as well.
CLIENT_DEFAULTS = frozenset({b":status", b"content-length", b"www-authenticate", b"location"})


@attrs.frozen
class BufferSettings:
    """``with_request_body``: the request body is buffered and sent with the check."""

    max_request_bytes: int
    allow_partial_message: bool = False


class ExtAuthzStats:
    """Envoy's ``http.<stat_prefix>.ext_authz.[<filter stat_prefix>.]*`` counters."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ok = self.denied = self.error = self.failure_mode_allowed = 0
        STATS.add_source(self)

    def stats_values(self) -> dict[str, int]:
        p = self.prefix
        return {f"{p}ok": self.ok, f"{p}denied": self.denied, f"{p}error": self.error,
                f"{p}failure_mode_allowed": self.failure_mode_allowed}


@attrs.frozen
class ExtAuthzConfig:
    cluster: Any
    timeout: float
    path_prefix: bytes = b""
    #: The user's allowed_headers (the defaults above are added); disallowed ones win.
    allowed_headers: tuple[StringMatcher, ...] = ()
    disallowed_headers: tuple[StringMatcher, ...] = ()
    headers_to_add: tuple[tuple[bytes, Template], ...] = ()
    allowed_upstream_headers: tuple[StringMatcher, ...] = ()
    allowed_upstream_headers_to_append: tuple[StringMatcher, ...] = ()
    #: None: every header of the service's answer except Host goes to a denied client.
    allowed_client_headers: tuple[StringMatcher, ...] | None = None
    allowed_client_headers_on_success: tuple[StringMatcher, ...] = ()
    failure_mode_allow: bool = False
    failure_mode_allow_header_add: bool = False
    status_on_error: int = 403
    with_request_body: BufferSettings | None = None
    clear_route_cache: bool = False
    #: 0: the service's whole body goes to a denied client.
    max_denied_response_body_bytes: int = 0
    stat_prefix: str = ""

    def request_header_allowed(self, name: bytes) -> bool:
        text = name.decode("latin-1")
        if any_matches(self.disallowed_headers, text):
            return False
        return name in DEFAULT_ALLOWED or any_matches(self.allowed_headers, text)

    def client_header_allowed(self, name: bytes) -> bool:
        if self.allowed_client_headers is None:
            return name not in (b"host", b":authority")
        return name in CLIENT_DEFAULTS or any_matches(self.allowed_client_headers,
                                                      name.decode("latin-1"))


@attrs.frozen
class ExtAuthzPerRoute:
    disabled: bool = False
    with_request_body: BufferSettings | None = None
    disable_request_body_buffering: bool = False


def _matchers(message: Any, field: str, path: str, context: Any) -> tuple[StringMatcher, ...]:
    where = f"{path}.{field}"
    patterns = getattr(message, field).patterns
    return tuple(string_matcher(p, f"{where}.patterns[{i}]", context)
                 for i, p in enumerate(patterns))


def _buffer_settings(message: Any, path: str, context: Any) -> BufferSettings:
    if message.max_request_bytes < 1:
        raise context.error(f"{path}.max_request_bytes" if context.has(
            f"{path}.max_request_bytes") else path,
            "must be at least 1" if context.has(f"{path}.max_request_bytes")
            else "missing required field 'max_request_bytes'")
    return BufferSettings(message.max_request_bytes, message.allow_partial_message)


def parse_ext_authz(message: Any, path: str, context: Any) -> ExtAuthzConfig:
    service = message.WhichOneof("services")
    if service == "grpc_service":
        raise context.error(path, "grpc_service is not implemented by hbonex; use "
                            "http_service (an HTTP authorization service)", "grpc_service")
    if service is None:
        raise context.error(path, "missing required field 'http_service' (hbonex implements "
                            "the HTTP authorization service)")
    http = message.http_service
    where = f"{path}.http_service"
    if not http.HasField("server_uri"):
        raise context.error(where, "missing required field 'server_uri'")
    uri = http.server_uri
    uri_path = f"{where}.server_uri"
    if not uri.uri:
        raise context.error(uri_path, "missing required field 'uri'")
    cluster = context.cluster(uri.cluster, uri_path)
    if not uri.HasField("timeout"):
        raise context.error(uri_path, "missing required field 'timeout' (Envoy requires it: "
                            "how long a check may take, e.g. 0.25s)")
    timeout = uri.timeout.seconds + uri.timeout.nanos / 1e9
    prefix = http.path_prefix
    if any(c in prefix for c in "\r\n\0"):
        raise context.error(f"{where}.path_prefix", "must be a valid header value")
    request = http.authorization_request
    request_path = f"{where}.authorization_request"
    if message.HasField("allowed_headers") and request.HasField("allowed_headers"):
        raise context.error(f"{path}.allowed_headers", "set allowed_headers here or in "
                            "http_service.authorization_request, not both (Envoy: invalid "
                            "duplicate configuration)")
    allowed = (_matchers(request, "allowed_headers", request_path, context)
               if request.HasField("allowed_headers")
               else _matchers(message, "allowed_headers", path, context))
    adds = []
    for index, header in enumerate(request.headers_to_add):
        item = f"{request_path}.headers_to_add[{index}]"
        if not header.key:
            raise context.error(item, "missing required field 'key'")
        adds.append((header.key.lower().encode(),
                     context.template(header.value, f"{item}.value")))
    response = http.authorization_response
    response_path = f"{where}.authorization_response"
    client = (_matchers(response, "allowed_client_headers", response_path, context)
              if response.HasField("allowed_client_headers") and
              response.allowed_client_headers.patterns else None)
    status = message.status_on_error.code if message.HasField("status_on_error") else 0
    body = (_buffer_settings(message.with_request_body, f"{path}.with_request_body", context)
            if message.HasField("with_request_body") else None)
    return ExtAuthzConfig(
        cluster=cluster,
        timeout=timeout,
        path_prefix=prefix.encode(),
        allowed_headers=allowed,
        disallowed_headers=_matchers(message, "disallowed_headers", path, context),
        headers_to_add=tuple(adds),
        allowed_upstream_headers=_matchers(response, "allowed_upstream_headers",
                                           response_path, context),
        allowed_upstream_headers_to_append=_matchers(
            response, "allowed_upstream_headers_to_append", response_path, context),
        allowed_client_headers=client,
        allowed_client_headers_on_success=_matchers(
            response, "allowed_client_headers_on_success", response_path, context),
        failure_mode_allow=message.failure_mode_allow,
        failure_mode_allow_header_add=message.failure_mode_allow_header_add,
        # Envoy: an unset (or unknown, below 100) code is 403.
        status_on_error=status if status >= 100 else 403,
        with_request_body=body,
        clear_route_cache=message.clear_route_cache,
        max_denied_response_body_bytes=message.max_denied_response_body_bytes,
        stat_prefix=message.stat_prefix,
    )


def parse_per_route(message: Any, path: str, context: Any) -> ExtAuthzPerRoute:
    kind = message.WhichOneof("override")
    if kind is None:
        raise context.error(path, "one of disabled, check_settings is required")
    if kind == "disabled":
        if not message.disabled:
            raise context.error(f"{path}.disabled", "must be true (Envoy's rule)")
        return ExtAuthzPerRoute(disabled=True)
    settings = message.check_settings
    where = f"{path}.check_settings"
    if settings.disable_request_body_buffering and settings.HasField("with_request_body"):
        raise context.error(where, "set disable_request_body_buffering or with_request_body, "
                            "not both")
    body = (_buffer_settings(settings.with_request_body, f"{where}.with_request_body", context)
            if settings.HasField("with_request_body") else None)
    return ExtAuthzPerRoute(with_request_body=body,
                            disable_request_body_buffering=settings.disable_request_body_buffering)


__all__ = ["BufferSettings", "ExtAuthzConfig", "ExtAuthzPerRoute", "ExtAuthzStats",
           "parse_ext_authz", "parse_per_route"]
