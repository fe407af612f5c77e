"""
Envoy's TLS inspector: read (without consuming) the start of a connection to learn whether it
is TLS and, if so, the SNI and ALPN protocols its ClientHello offers, so that a listener can pick
a filter chain (and with it the certificate) before the handshake starts.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.interfaces import (
    IListenerFilterCallbacks,
    IListenerFilterExtension,
    IListenerReadFilter,
)

NAME = "envoy.filters.listener.tls_inspector"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"

#: A ClientHello larger than this is not inspected further (Envoy's limit is 64 KiB too).
MAX_CLIENT_HELLO = 64 * 1024


@attrs.frozen
class ClientHello:
    server_name: str = ""
    alpn: tuple[str, ...] = ()


class NeedMore(Exception):
    """
    Not enough bytes yet to decide.
    """


def looks_like_tls(data: bytes) -> Optional[bool]:
    """
    True/False once the first bytes tell whether this is a TLS handshake; None if too few.
    """
    if len(data) < 3:
        return None if data in (b"", b"\x16", b"\x16\x03") else False
    return data[0] == 0x16 and data[1] == 0x03 and data[2] <= 0x04


def parse_client_hello(data: bytes) -> ClientHello:
    """
    SNI and ALPN from the ClientHello at the start of ``data`` (TLS records, possibly several
    for a fragmented hello).  Raises NeedMore until the whole hello is there, ValueError if it
    is not a ClientHello.
    """
    handshake = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            raise NeedMore()
        content_type, _version, length = struct.unpack_from("!BHH", data, pos)
        if content_type != 22:
            raise ValueError("not a TLS handshake record")
        if len(data) < pos + 5 + length:
            raise NeedMore()
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise ValueError("first handshake message is not a ClientHello")
            body_length = int.from_bytes(handshake[1:4], "big")
            if body_length > MAX_CLIENT_HELLO:
                raise ValueError("ClientHello too large")
            if len(handshake) >= 4 + body_length:
                return _parse_body(bytes(handshake[4 : 4 + body_length]))
        if pos > MAX_CLIENT_HELLO:
            raise ValueError("ClientHello too large")


def _parse_body(body: bytes) -> ClientHello:
    try:
        pos = 2 + 32  # client_version, random
        pos += 1 + body[pos]  # session_id
        (n,) = struct.unpack_from("!H", body, pos)
        pos += 2 + n  # cipher_suites
        pos += 1 + body[pos]  # compression_methods
        if pos == len(body):
            return ClientHello()
        (ext_total,) = struct.unpack_from("!H", body, pos)
        pos += 2
        end = pos + ext_total
        server_name = ""
        alpn: tuple[str, ...] = ()
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, pos)
            ext = body[pos + 4 : pos + 4 + ext_len]
            pos += 4 + ext_len
            if ext_type == 0:  # server_name
                server_name = _server_name(ext)
            elif ext_type == 16:  # application_layer_protocol_negotiation
                alpn = _alpn(ext)
        return ClientHello(server_name, alpn)
    except (IndexError, struct.error) as e:
        raise ValueError(f"malformed ClientHello: {e}")


def _server_name(ext: bytes) -> str:
    pos = 2
    while pos + 3 <= len(ext):
        name_type, length = ext[pos], int.from_bytes(ext[pos + 1 : pos + 3], "big")
        name = ext[pos + 3 : pos + 3 + length]
        pos += 3 + length
        if name_type == 0:
            return name.decode("ascii", "replace").lower().rstrip(".")
    return ""


def _alpn(ext: bytes) -> tuple[str, ...]:
    protocols = []
    pos = 2
    while pos < len(ext):
        length = ext[pos]
        protocols.append(ext[pos + 1 : pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    return tuple(protocols)


@implementer(IListenerReadFilter)
class TlsInspectorFilter:
    """
    The ClientHello peek itself, one per connection: the listener runs it first among its
    listener filters when its chains need it.  Sets the connection's transport protocol
    (``tls``; plain text is left to the listener's ``raw_buffer`` default), SNI and ALPN.
    """

    def __init__(self) -> None:
        self._callbacks: IListenerFilterCallbacks | None = None

    def onAccept(self, callbacks: IListenerFilterCallbacks) -> bool:
        self._callbacks = callbacks
        return False

    def maxReadBytes(self) -> int:
        # One byte past the limit: a hello still incomplete there is given up on.
        return MAX_CLIENT_HELLO + 1

    def onData(self, data: bytes) -> bool:
        is_tls = looks_like_tls(data)
        if is_tls is None:
            return False
        if not is_tls:
            return True
        hello = ClientHello()
        try:
            hello = parse_client_hello(data)
        except NeedMore:
            if len(data) <= MAX_CLIENT_HELLO:
                return False
        except ValueError:
            pass
        assert self._callbacks is not None
        info = self._callbacks.info
        info.transportProtocol = "tls"
        info.requestedServerName = hello.server_name
        info.requestedApplicationProtocols = hello.alpn
        return True


@implementer(IPlugin, IListenerFilterExtension)
class TlsInspectorExtension:
    """
    The ``envoy.filters.listener.tls_inspector`` plugin.  A listener inspects the ClientHello
    whenever its filter chains need SNI, ALPN or TLS-or-not to choose (listed or not), so
    there is nothing more to run per connection.
    """

    name = NAME
    typeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> None:
        return None

    def listenerFilterFactory(self, parsed: Any, context: Any) -> None:
        return None
