"""
The ``x-forwarded-client-cert`` (XFCC) request header, as Envoy's connection manager writes
it (``forward_client_cert_details`` and ``set_current_client_cert_details``; Envoy's
ConnectionManagerUtility::mutateXfccRequestHeader).

The peer certificate's facts come from hbonex.tls.facts.TlsFacts, which a TLS connection's
ConnectionInfo carries as ``ssl`` (None on plain and internal connections, as Envoy's
``connection.ssl()``).
"""

from __future__ import annotations

import enum

import attrs

from hbonex.http.headers import Headers
from hbonex.tls.facts import TlsFacts

__all__ = ["ClientCertDetails", "ForwardClientCert", "XfccPolicy"]

XFCC = b"x-forwarded-client-cert"


class ForwardClientCert(enum.Enum):
    """Envoy's HttpConnectionManager.ForwardClientCertDetails."""

    SANITIZE = "SANITIZE"
    FORWARD_ONLY = "FORWARD_ONLY"
    APPEND_FORWARD = "APPEND_FORWARD"
    SANITIZE_SET = "SANITIZE_SET"
    ALWAYS_FORWARD_ONLY = "ALWAYS_FORWARD_ONLY"


@attrs.frozen
class ClientCertDetails:
    """Envoy's SetCurrentClientCertDetails (what an element carries besides By and Hash)."""

    subject: bool = False
    cert: bool = False
    chain: bool = False
    dns: bool = False
    uri: bool = False


@attrs.frozen
class XfccPolicy:
    """What the connection manager does with XFCC (Envoy's defaults: SANITIZE)."""

    mode: ForwardClientCert = ForwardClientCert.SANITIZE
    details: ClientCertDetails = ClientCertDetails()

    def element(self, ssl: TlsFacts) -> str:
        """This hop's XFCC element: By, Hash, then the details in Envoy's order."""
        parts = [f"By={uri}" for uri in ssl.uri_san_local()]
        digest = ssl.sha256_peer_digest()
        if digest:
            parts.append(f"Hash={digest}")
        d = self.details
        if d.cert:
            pem = ssl.url_encoded_pem()
            if pem:
                parts.append(f'Cert="{pem}"')
        if d.chain:
            chain = ssl.url_encoded_pem_chain()
            if chain:
                parts.append(f'Chain="{chain}"')
        if d.subject:
            # Envoy quotes the subject and escapes nothing inside it.
            parts.append(f'Subject="{ssl.subject()}"')
        if d.uri:
            parts.extend(f"URI={uri}" for uri in ssl.uri_sans_peer() or [""])
        if d.dns:
            parts.extend(f"DNS={dns}" for dns in ssl.dns_sans_peer())
        return ";".join(parts)

    def apply(self, headers: Headers, ssl: TlsFacts | None) -> None:
        """Envoy's mutateXfccRequestHeader on a request's headers."""
        mode = self.mode
        if mode is ForwardClientCert.ALWAYS_FORWARD_ONLY:
            return
        mutual = ssl is not None and ssl.peer_certificate_presented()
        if mode is ForwardClientCert.SANITIZE or ssl is None or not mutual:
            headers.remove(XFCC)
            return
        if mode is ForwardClientCert.FORWARD_ONLY:
            return
        element = self.element(ssl).encode("utf-8")
        if mode is ForwardClientCert.APPEND_FORWARD:
            existing = b",".join(headers.get_all(XFCC))
            headers.set(XFCC, existing + b"," + element if existing else element)
        else:
            headers.set(XFCC, element)


DEFAULT_XFCC = XfccPolicy()
