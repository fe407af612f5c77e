"""
A TLS connection's certificate facts (Envoy's Ssl::ConnectionInfo) as the connection manager
reads them for ``x-forwarded-client-cert``: a listener's ConnectionInfo carries them as
``ssl`` after a handshake (None on plain and internal connections).  Each fact is computed
when first asked, so the tunnel path, which never asks, pays nothing.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["TlsFacts", "url_encode"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def url_encode(text: str) -> str:
    """Envoy's percent-encoding of a PEM: all but unreserved characters as %XX."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}"
                   for b in text.encode("utf-8"))


def _sans(cert: x509.Certificate, kind: Any) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.value.get_values_for_type(kind)]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode("ascii")


class TlsFacts:
    """
    A TLS connection's certificates as XFCC reads them (Envoy's Ssl::ConnectionInfo), each
    computed once, when first asked.  ``peer`` and ``peer_chain`` are callables so that
    nothing is converted at handshake time.
    """

    def __init__(self, peer: Callable[[], Any], local: x509.Certificate | None,
                 peer_chain: Callable[[], Any] = lambda: None) -> None:
        self._peer_source = peer
        self._chain_source = peer_chain
        self.local = local
        self._cache: dict[str, Any] = {}

    @classmethod
    def of_tls_connection(cls, tls_conn: Any, local: x509.Certificate | None) -> TlsFacts:
        """The facts of a pyOpenSSL connection after its handshake."""
        return cls(tls_conn.get_peer_certificate, local, tls_conn.get_peer_cert_chain)

    def _cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def peer(self) -> x509.Certificate | None:
        def make() -> x509.Certificate | None:
            cert = self._peer_source()
            return cert.to_cryptography() if hasattr(cert, "to_cryptography") else cert
        return self._cached("peer", make)  # type: ignore[no-any-return]

    def peer_certificate_presented(self) -> bool:
        return self.peer is not None

    def uri_san_local(self) -> list[str]:
        local = self.local
        return self._cached("by", lambda: [] if local is None else _sans(
            local, x509.UniformResourceIdentifier))  # type: ignore[no-any-return]

    def sha256_peer_digest(self) -> str:
        peer = self.peer
        return self._cached("hash", lambda: "" if peer is None else hashlib.sha256(
            peer.public_bytes(Encoding.DER)).hexdigest())  # type: ignore[no-any-return]

    def subject(self) -> str:
        # RFC 2253 order, as Envoy's X509_NAME_print_ex(XN_FLAG_RFC2253).
        peer = self.peer
        return self._cached("subject", lambda: "" if peer is None
                            else peer.subject.rfc4514_string())  # type: ignore[no-any-return]

    def uri_sans_peer(self) -> list[str]:
        peer = self.peer
        return self._cached("uri", lambda: [] if peer is None else _sans(
            peer, x509.UniformResourceIdentifier))  # type: ignore[no-any-return]

    def dns_sans_peer(self) -> list[str]:
        peer = self.peer
        return self._cached("dns", lambda: [] if peer is None else _sans(
            peer, x509.DNSName))  # type: ignore[no-any-return]

    def url_encoded_pem(self) -> str:
        peer = self.peer
        return self._cached("pem", lambda: "" if peer is None
                            else url_encode(_pem(peer)))  # type: ignore[no-any-return]

    def url_encoded_pem_chain(self) -> str:
        """The peer's chain as it sent it, its own certificate first (Envoy's full chain)."""
        def make() -> str:
            peer = self.peer
            if peer is None:
                return ""
            certs = [peer]
            for cert in self._chain_source() or ():
                cert = cert.to_cryptography() if hasattr(cert, "to_cryptography") else cert
                if cert != certs[0]:  # a client's chain already starts with its own
                    certs.append(cert)
            return url_encode("".join(_pem(c) for c in certs))
        return self._cached("chain", make)  # type: ignore[no-any-return]
