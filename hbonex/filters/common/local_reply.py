"""
A filter's local reply as Envoy's ``sendLocalReply`` shapes it: to a gRPC request (its
content-type is application/grpc) a headers-only ``200`` with ``grpc-status`` and
``grpc-message``, to any other request the HTTP status with the text as its body.
"""

from __future__ import annotations

from typing import Any, Callable

from hbonex.http.headers import Headers

#: Envoy's Grpc::Utility::httpToGrpcStatus, for gRPC requests answered with an HTTP status.
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
RESOURCE_EXHAUSTED = 8


def _percent_encode(text: str) -> bytes:
    """gRPC's grpc-message encoding (Envoy's PercentEncoding): printable ASCII but '%' kept."""
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c
                    for c in text.encode())


def is_grpc(headers: Headers | None) -> bool:
    content_type = headers.get(b"content-type") if headers is not None else None
    return content_type is not None and content_type.startswith(b"application/grpc")


def send_local_reply(callbacks: Any, request: Headers | None, status: int, text: str,
                     details: str, flag: str, grpc_status: int | None = None,
                     modify: Callable[[Headers], None] | None = None) -> None:
    """Answer the request from a decoder filter (its ``callbacks``)."""
    if not is_grpc(request):
        callbacks.sendLocalReply(status, text.encode(), modify, details, flag)
        return
    code = grpc_status if grpc_status is not None else _HTTP_TO_GRPC.get(status, 2)

    def grpc_headers(headers: Headers) -> None:
        headers.set(b"content-type", b"application/grpc")
        headers.set(b"grpc-status", str(code).encode())
        headers.set(b"grpc-message", _percent_encode(text))
        if modify is not None:
            modify(headers)

    callbacks.sendLocalReply(200, b"", grpc_headers, details, flag)


__all__ = ["RESOURCE_EXHAUSTED", "is_grpc", "send_local_reply"]
