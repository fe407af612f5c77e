"""
``envoy.filters.listener.original_dst``: restore a connection's local (destination) address
to where its client meant to go, so that ``%DOWNSTREAM_LOCAL_ADDRESS%`` and ORIGINAL_DST
clusters see that target.

* On an internal listener, as Envoy: from the dynamic metadata namespace
  ``envoy.filters.listener.original_dst``, field ``local`` ("ip:port"; what an
  ``internal_upstream`` transport socket passed through), else from the filter state object
  ``envoy.filters.listener.original_dst.local_ip`` (what ``set_filter_state`` stored upstream,
  shared with the upstream).  The filter state object ``...remote_ip`` sets the remote address.
* On a kernel listener: the socket's SO_ORIGINAL_DST (iptables REDIRECT / TPROXY on Linux);
  without a redirect, the address the connection was accepted on.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, Callable

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.interfaces import (
    IListenerFilter,
    IListenerFilterCallbacks,
    IListenerFilterExtension,
)

NAME = "envoy.filters.listener.original_dst"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
#: The dynamic metadata namespace and field Envoy reads on internal connections.
METADATA_NAMESPACE = NAME
METADATA_FIELD = "local"
#: The filter state objects Envoy reads on internal connections.
LOCAL_FILTER_STATE_KEY = f"{NAME}.local_ip"
REMOTE_FILTER_STATE_KEY = f"{NAME}.remote_ip"

#: linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h
#: IP6T_SO_ORIGINAL_DST (the same number, at the IPv6 level).
SO_ORIGINAL_DST = 80
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

log = Logger()


def ip_port(text: Any) -> str | None:
    """
    ``text`` as an "ip:port" / "[ipv6]:port" address (normalised), or None if it is not one
    (Envoy's parseInternetAddressAndPort: an IP literal and a port, no hostname).
    """
    if not isinstance(text, str):
        return None
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        if not text.startswith("["):
            return None
        return f"[{ip}]:{int(port)}"
    return f"{ip}:{int(port)}"


def kernel_socket(transport: Any) -> socket.socket | None:
    """The kernel socket under ``transport`` (through TLS wrappers), or None."""
    seen = 0
    while transport is not None and seen < 8:
        handle = getattr(transport, "socket", None)
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """
    SO_ORIGINAL_DST of an accepted socket (Linux netfilter), or None where there is none
    (no conntrack entry, another platform).
    """
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(_SOL_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
            return (str(mapped) if mapped is not None else host), port
        raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    except (OSError, ValueError, struct.error):
        return None


def _address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IListenerFilter)
class OriginalDstFilter:
    """One per accepted connection; it never holds the connection up."""

    def onAccept(self, callbacks: IListenerFilterCallbacks) -> None:
        info = callbacks.info
        if info.localAddress.startswith("envoy://"):
            self._internal(info)
        else:
            self._kernel(callbacks.transport, info)

    def _internal(self, info: Any) -> None:
        local = info.dynamic_metadata.get(METADATA_NAMESPACE, {}).get(METADATA_FIELD)
        if isinstance(local, str):
            # Envoy: a metadata value that does not parse is not replaced by the filter state.
            address = ip_port(local)
            if address is None:
                log.debug("original_dst: cannot parse {value!r} from dynamic metadata "
                          "{namespace}.{field}", value=local, namespace=METADATA_NAMESPACE,
                          field=METADATA_FIELD)
        else:
            address = self._from_filter_state(info, LOCAL_FILTER_STATE_KEY)
        if address is not None:
            info.localAddress = address
            info.localAddressRestored = True
        remote = self._from_filter_state(info, REMOTE_FILTER_STATE_KEY)
        if remote is not None:
            info.remoteAddress = remote

    @staticmethod
    def _from_filter_state(info: Any, key: str) -> str | None:
        state = info.filter_state
        if not state.has_data(key):
            return None
        value = state.get_data(key)
        address = ip_port(value)
        if address is None:
            log.debug("original_dst: filter state {key} is {value!r}, not ip:port",
                      key=key, value=value)
        return address

    def _kernel(self, transport: Any, info: Any) -> None:
        sock = kernel_socket(transport)
        found = original_destination(sock) if sock is not None else None
        if found is not None:
            info.localAddress = _address_text(*found)
        # No redirect: the address it was accepted on is where the client meant to go.
        info.localAddressRestored = True


@implementer(IPlugin, IListenerFilterExtension)
class OriginalDstExtension:
    name = NAME
    typeUrls = (TYPE_URL,)

    def parseConfig(self, config: Any, path: str, context: Any) -> None:
        return None

    def listenerFilterFactory(self, parsed: Any, context: Any
                              ) -> Callable[[], OriginalDstFilter]:
        return OriginalDstFilter


__all__ = ["OriginalDstExtension", "OriginalDstFilter", "ip_port", "original_destination"]
