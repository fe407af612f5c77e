"""
``envoy.filters.listener.http_inspector``: peek at a plain-text connection's first bytes and,
when they are HTTP, set the connection's requested application protocols for choosing the
filter chain (``filter_chain_match.application_protocols``, the matcher's
ApplicationProtocolInput): ``h2c`` for the HTTP/2 connection preface, ``http/1.1`` for an
HTTP/1.1 request line, ``http/1.0`` for any other HTTP version.  Bytes that are not HTTP set
nothing; on a connection the TLS inspector found to be TLS it does nothing at all.  As Envoy's,
it gives up (closing the connection) after 64 KiB without the end of a request line.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.interfaces import (
    IListenerFilterCallbacks,
    IListenerFilterExtension,
    IListenerReadFilter,
)

NAME = "envoy.filters.listener.http_inspector"
TYPE_URL = ("type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
            "HttpInspector")

#: Envoy's MAX_INSPECT_SIZE.
MAX_INSPECT_SIZE = 64 * 1024
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: An HTTP/1 request line (RFC 9112 §3): token SP request-target SP HTTP-version.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e\x80-\xff]+) "
                           rb"HTTP/([0-9])\.([0-9])\r?\Z")
#: What a request line may look like while incomplete: any prefix of the pattern above.
_PARTIAL = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?: (?:[\x21-\x7e\x80-\xff]+(?: (?:H(?:T(?:T"
                      rb"(?:P(?:/(?:[0-9](?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?)?)?\Z")

log = Logger()


class NotHttp(Exception):
    """The bytes are not the start of an HTTP request."""


def detect(data: bytes) -> str | None:
    """
    The protocol the first bytes of a connection speak: ``h2c``, ``http/1.1``, ``http/1.0``,
    or None while more bytes are needed.  Raises NotHttp when they are not HTTP.
    """
    if not data:
        return None
    if H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return "h2c" if len(data) >= len(H2_PREFACE) else None
    end = data.find(b"\n")
    line = data if end < 0 else data[:end]
    if end < 0:
        if _PARTIAL.match(line) is None:
            raise NotHttp()
        return None
    found = _REQUEST_LINE.match(line)
    if found is None:
        raise NotHttp()
    return "http/1.1" if found.group(3, 4) == (b"1", b"1") else "http/1.0"


@implementer(IListenerReadFilter)
class HttpInspectorFilter:
    """One per connection."""

    def __init__(self) -> None:
        self._callbacks: IListenerFilterCallbacks | None = None

    def onAccept(self, callbacks: IListenerFilterCallbacks) -> bool:
        transport = callbacks.info.transportProtocol
        if transport and transport != "raw_buffer":
            return True  # TLS: the ClientHello's ALPN is what counts
        self._callbacks = callbacks
        return False

    def maxReadBytes(self) -> int:
        return MAX_INSPECT_SIZE

    def onData(self, data: bytes) -> bool:
        callbacks = self._callbacks
        assert callbacks is not None
        try:
            protocol = detect(data)
        except NotHttp:
            log.debug("http_inspector: {peer} does not speak HTTP",
                      peer=callbacks.info.remoteAddress)
            return True
        if protocol is None:
            return False  # the listener closes after maxReadBytes, as Envoy does
        callbacks.info.requestedApplicationProtocols = (protocol,)
        return True


@implementer(IPlugin, IListenerFilterExtension)
class HttpInspectorExtension:
    name = NAME
    typeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> None:
        return None

    def listenerFilterFactory(self, parsed: Any, context: Any
                              ) -> Callable[[], HttpInspectorFilter]:
        return HttpInspectorFilter


__all__ = ["HttpInspectorExtension", "HttpInspectorFilter", "NotHttp", "detect"]
