"""
CONNECT requests: parsing and validating them (HTTP/2 per RFC 9113 §8.5, HTTP/1.1 per
RFC 9110 §9.3.6), and the target policy that decides where a tunnel may go.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Union

import attrs

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_PSEUDO = frozenset({b":method", b":authority", b":scheme", b":path", b":protocol"})
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


class MalformedRequest(Exception):
    """
    An HTTP/2 request that RFC 9113 §8.1.1 calls malformed: answered with RST_STREAM
    PROTOCOL_ERROR, never with a status.
    """


class BadAuthority(ValueError):
    """
    The CONNECT target is not ``host:port`` / ``[v6]:port``: answered with 400.
    """


@attrs.frozen
class Authority:
    host: str  # an IP literal (no brackets) or a DNS name
    port: int

    @property
    def ip(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@functools.lru_cache(maxsize=4096)
def ip_of(host: str) -> IPAddress | None:
    """
    ``host`` as an IP address, or None if it is a name (cached).
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def parse_authority(text: str) -> Authority:
    """
    Parse a CONNECT authority: ``1.2.3.4:80``, ``[::1]:80`` or ``host.example:443``.
    (Cached: a server sees the same few targets again and again.)
    """
    if not text or len(text) > 300 or any(c.isspace() or ord(c) < 0x21 for c in text):
        raise BadAuthority(f"authority {text!r} is not host:port")
    if "@" in text or "/" in text:
        raise BadAuthority(f"authority {text!r} must be host:port (no userinfo or path)")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise BadAuthority(f"authority {text!r}: expected [ipv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadAuthority(f"authority {text!r}: {host!r} is not an IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise BadAuthority(f"authority {text!r} has no port")
        if ":" in host:
            raise BadAuthority(f"authority {text!r}: IPv6 addresses must be in brackets")
        if not _valid_hostname(host):
            raise BadAuthority(f"authority {text!r}: {host!r} is not a valid host")
    # isascii(): str.isdigit() also accepts "²" (latin-1 0xb2), on which int() raises.
    if not _ascii_digits(port_text) or not 0 < int(port_text) < 65536:
        raise BadAuthority(f"authority {text!r}: port must be 1-65535")
    return Authority(host.lower(), int(port_text))


def _ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _valid_hostname(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    return all(
        0 < len(label) <= 63 and set(label) <= allowed and not label.startswith("-")
        for label in labels
    )


@attrs.frozen
class ConnectRequest:
    """
    A request as the tunnel server sees it, HTTP/2 or HTTP/1.1.
    """

    method: str
    authority: str
    headers: tuple[tuple[str, str], ...] = ()
    protocol: str | None = None  # :protocol of an extended CONNECT (Envoy's "bytestream")
    path: str | None = None
    scheme: str | None = None

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


def parse_h2_request(headers: list[tuple[bytes, bytes]]) -> ConnectRequest:
    """
    Validate an HTTP/2 request header list; raise MalformedRequest for what RFC 9113 calls
    malformed.  Whether the method is CONNECT is for the caller to decide (405).
    """
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[str, str]] = []
    seen_regular = False
    for name, value in headers:
        if name.startswith(b":"):
            if seen_regular:
                raise MalformedRequest("pseudo-header after a regular header")
            if name not in _PSEUDO:
                raise MalformedRequest(f"unknown pseudo-header {name.decode('latin-1')}")
            if name in pseudo:
                raise MalformedRequest(f"duplicate pseudo-header {name.decode('latin-1')}")
            pseudo[name] = value
            continue
        seen_regular = True
        if name.lower() != name or not name:
            raise MalformedRequest("header names must be lowercase")
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise MalformedRequest(f"connection-specific header {name.decode('latin-1')}")
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise MalformedRequest(f"invalid character in header {name.decode('latin-1')}")
        regular.append((name.decode("latin-1"), value.decode("latin-1")))
    method = pseudo.get(b":method")
    if not method:
        raise MalformedRequest("missing :method")
    authority = pseudo.get(b":authority", b"").decode("latin-1")
    protocol = pseudo.get(b":protocol")
    path = pseudo.get(b":path")
    scheme = pseudo.get(b":scheme")
    if method == b"CONNECT":
        if not authority:
            raise MalformedRequest("CONNECT without :authority")
        if protocol is None and (path is not None or scheme is not None):
            raise MalformedRequest("CONNECT must not carry :scheme or :path without :protocol")
        if protocol is not None and (path is None or scheme is None):
            raise MalformedRequest("extended CONNECT needs :scheme and :path")
    else:
        if protocol is not None:
            raise MalformedRequest(":protocol is only allowed with CONNECT")
        if path is None or scheme is None or not path:
            raise MalformedRequest("request without :scheme or :path")
    return ConnectRequest(
        method=method.decode("latin-1"),
        authority=authority,
        headers=tuple(regular),
        protocol=protocol.decode("latin-1") if protocol is not None else None,
        path=path.decode("latin-1") if path is not None else None,
        scheme=scheme.decode("latin-1") if scheme is not None else None,
    )


@attrs.frozen
class TargetRule:
    network: IPNetwork
    port_low: int = 1
    port_high: int = 65535

    def allows(self, ip: IPAddress, port: int) -> bool:
        return ip in self.network and self.port_low <= port <= self.port_high

    @classmethod
    def parse(cls, text: str) -> TargetRule:
        """
        ``CIDR[:PORT|:LO-HI]``: ``10.0.0.0/8``, ``127.0.0.1:8080``, ``::1/128:8000-8100``,
        ``[::1]:8080``.
        """
        spec = text.strip()
        ports = ""
        if spec.startswith("["):
            end = spec.find("]")
            if end < 0:
                raise ValueError(f"{text!r}: missing ']'")
            addr, rest = spec[1:end], spec[end + 1 :]
            if rest and not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected :PORT after ]")
            ports = rest[1:]
        elif "/" in spec:
            addr, _, rest = spec.partition("/")
            prefix, _, ports = rest.partition(":")
            addr = f"{addr}/{prefix}"
        elif spec.count(":") == 1:
            addr, _, ports = spec.partition(":")
        else:
            addr = spec
        try:
            network = ipaddress.ip_network(addr, strict=False)
        except ValueError as e:
            raise ValueError(f"{text!r}: {e}")
        low, high = 1, 65535
        if ports:
            lo_text, dash, hi_text = ports.partition("-")
            if not _ascii_digits(lo_text) or (dash and not _ascii_digits(hi_text)):
                raise ValueError(f"{text!r}: ports must be PORT or LOW-HIGH")
            low = int(lo_text)
            high = int(hi_text) if dash else low
            if not 1 <= low <= high <= 65535:
                raise ValueError(f"{text!r}: port range must lie in 1-65535")
        return cls(network, low, high)

    def __str__(self) -> str:
        ports = "" if (self.port_low, self.port_high) == (1, 65535) else (
            f":{self.port_low}" if self.port_low == self.port_high
            else f":{self.port_low}-{self.port_high}"
        )
        return f"{self.network}{ports}"


LOOPBACK_RULES = (
    TargetRule(ipaddress.ip_network("127.0.0.0/8")),
    TargetRule(ipaddress.ip_network("::1/128")),
)


@attrs.frozen
class TargetPolicy:
    """
    Which resolved addresses a tunnel may connect to.
    """

    rules: tuple[TargetRule, ...] = LOOPBACK_RULES

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - policies live as long as the process
    def allows(self, ip: IPAddress, port: int) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(rule.allows(ip, port) for rule in self.rules)

    def __str__(self) -> str:
        return ", ".join(str(r) for r in self.rules)
