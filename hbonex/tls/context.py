"""
Mutual TLS for HBONE: pyOpenSSL contexts with SPIFFE peer checks done inside the handshake.

The peer certificate is verified against the trust bundle by OpenSSL, and its identity (URI,
DNS or IP SANs) is checked in the verify callback, so a wrong peer fails the handshake with an
alert and never reaches the HTTP layer.  Contexts are built once per listener / cluster and
shared by all connections.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, Sequence

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

from hbonex.tls.spiffe import IdentityMatcher, SpiffeId, uri_sans

TLS_VERSIONS = {
    "TLSv1_2": SSL.TLS1_2_VERSION,
    "TLSv1_3": SSL.TLS1_3_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}


@attrs.frozen
class SanMatcher:
    """
    One Envoy ``match_typed_subject_alt_names`` entry: SAN type + string matcher.
    """

    san_type: str  # "URI", "DNS", "IP_ADDRESS", "EMAIL"
    kind: str  # "exact", "prefix", "suffix", "contains", "safe_regex"
    value: str
    ignore_case: bool = False

    def matches(self, candidate: str) -> bool:
        value, cand = self.value, candidate
        if self.ignore_case:
            value, cand = value.lower(), cand.lower()
        if self.kind == "exact":
            if self.san_type == "IP_ADDRESS":
                try:
                    return ipaddress.ip_address(cand) == ipaddress.ip_address(value)
                except ValueError:
                    return False
            return cand == value
        if self.kind == "prefix":
            return cand.startswith(value)
        if self.kind == "suffix":
            return cand.endswith(value)
        if self.kind == "contains":
            return value in cand
        if self.kind == "safe_regex":
            return re.fullmatch(self.value, candidate) is not None
        raise ValueError(f"unknown matcher kind {self.kind!r}")

    def __str__(self) -> str:
        return f"{self.san_type} {self.kind} {self.value!r}"


def certificate_sans(cert: x509.Certificate) -> dict[str, list[str]]:
    """
    SANs of ``cert`` grouped as Envoy names their types.
    """
    result: dict[str, list[str]] = {"URI": [], "DNS": [], "IP_ADDRESS": [], "EMAIL": []}
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return result
    result["URI"] = list(ext.get_values_for_type(x509.UniformResourceIdentifier))
    result["DNS"] = list(ext.get_values_for_type(x509.DNSName))
    result["IP_ADDRESS"] = [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    result["EMAIL"] = list(ext.get_values_for_type(x509.RFC822Name))
    return result


@attrs.frozen
class PeerPolicy:
    """
    Who may be on the other end: any of ``san_matchers`` (Envoy semantics) and, if given,
    ``identities`` (SPIFFE ID patterns).  Empty policy = any certificate from the bundle.
    """

    san_matchers: tuple[SanMatcher, ...] = ()
    identities: IdentityMatcher | None = None

    def check(self, cert: x509.Certificate) -> str | None:
        """
        None if ``cert`` is acceptable, else why not.
        """
        sans = certificate_sans(cert)
        if self.san_matchers:
            if not any(
                m.matches(value) for m in self.san_matchers for value in sans.get(m.san_type, [])
            ):
                wanted = " or ".join(str(m) for m in self.san_matchers)
                got = ", ".join(f"{k}:{v}" for k, vs in sans.items() for v in vs) or "no SANs"
                return f"peer certificate SANs ({got}) match none of: {wanted}"
        if self.identities is not None:
            spiffe = [u for u in sans["URI"] if u.startswith("spiffe://")]
            if len(spiffe) != 1:
                return f"peer certificate has {len(spiffe)} SPIFFE URI SANs, expected exactly 1"
            try:
                ident = SpiffeId.parse(spiffe[0])
            except ValueError as e:
                return f"peer SPIFFE ID {spiffe[0]!r} is malformed: {e}"
            if not self.identities.matches(ident):
                return f"peer identity {ident} is not allowed (allowed: {self.identities})"
        return None

    def describe(self) -> str:
        parts = [str(m) for m in self.san_matchers]
        if self.identities is not None:
            parts.append(f"identity {self.identities}")
        return " and ".join(parts) or "any certificate from the trust bundle"


@attrs.frozen
class TLSSettings:
    """
    One side's TLS configuration (Envoy's Common/Upstream/DownstreamTlsContext, resolved).
    """

    certificate: x509.Certificate
    private_key: Any  # a cryptography private key
    ca_certificates: tuple[x509.Certificate, ...]
    chain: tuple[x509.Certificate, ...] = ()
    min_version: str = "TLSv1_3"
    max_version: str | None = None
    alpn: tuple[bytes, ...] = (b"h2",)
    peer_policy: PeerPolicy = PeerPolicy()
    require_peer_certificate: bool = True
    sni: str = ""
    handshake_timeout: float = 10.0
    #: Where the material is reloaded from (hbonex.tls.certwatch.CertificateSources), or None.
    sources: Any = attrs.field(default=None, eq=False)


def peer_identity(connection: Any) -> str:
    """
    SPIFFE ID of the verified peer of an OpenSSL connection (or TLS transport), or "".
    """
    get = getattr(connection, "getPeerCertificate", None) or connection.get_peer_certificate
    cert = get()
    if cert is None:
        return ""
    uris = [u for u in uri_sans(cert) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else ""


def _build_context(settings: TLSSettings, server: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(TLS_VERSIONS[settings.min_version])
    if settings.max_version:
        ctx.set_max_proto_version(TLS_VERSIONS[settings.max_version])
    _compat(ctx.use_certificate, settings.certificate, crypto.X509.from_cryptography)
    for extra in settings.chain:
        _compat(ctx.add_extra_chain_cert, extra, crypto.X509.from_cryptography)
    _compat(ctx.use_privatekey, settings.private_key, crypto.PKey.from_cryptography_key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for ca in settings.ca_certificates:
        store.add_cert(crypto.X509.from_cryptography(ca))
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    # Release idle read/write buffers: thousands of mostly idle connections are the norm.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    _whole_writes(ctx)
    policy = settings.peer_policy

    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            _set_failure(
                conn, f"certificate verify failed at depth {depth}: {_x509_error(errno)}"
            )
            return False
        if depth == 0:
            problem = policy.check(cert.to_cryptography())
            if problem is not None:
                _set_failure(conn, problem)
                return False
        return True

    mode = SSL.VERIFY_PEER
    if server and settings.require_peer_certificate:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    if not server or settings.require_peer_certificate or settings.ca_certificates:
        ctx.set_verify(mode, verify)
    if server:
        offered_by_us = list(settings.alpn)

        def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
            for proto in offered_by_us:
                if proto in offered:
                    return proto
            return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

        if offered_by_us:
            ctx.set_alpn_select_callback(select)
    elif settings.alpn:
        ctx.set_alpn_protos(list(settings.alpn))
    return ctx


def _whole_writes(ctx: SSL.Context) -> None:
    """
    pyOpenSSL turns on partial writes, so each SSL_write stops after one 16 KiB record; with a
    memory BIO nothing can block, so one call may encrypt a whole write (hbonex.tls.fasttls).
    """
    try:
        from OpenSSL._util import lib

        lib.SSL_CTX_clear_mode(ctx._context, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)  # type: ignore
    except AttributeError:  # pragma: no cover - a pyOpenSSL without the binding
        pass


def _compat(method: Callable[[Any], None], value: Any, convert: Callable[[Any], Any]) -> None:
    # pyOpenSSL >= 24.3 takes cryptography objects (and deprecates its own); older ones don't.
    try:
        method(value)
    except TypeError:
        method(convert(value))


def _x509_error(errno: int) -> str:
    try:
        from OpenSSL._util import ffi, lib

        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode()
    except Exception:  # pragma: no cover - best effort text only
        return "unknown"


def _set_failure(conn: SSL.Connection, reason: str) -> None:
    try:
        conn._hbonex_failure = reason  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover
        pass


def handshake_failure_reason(tls_connection: Any, default: str) -> str:
    """
    Why the handshake of ``tls_connection`` failed, as recorded by the verify callback.
    """
    return getattr(tls_connection, "_hbonex_failure", None) or default


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Server-side connection creator for ``TLSMemoryBIOFactory``.
    """

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self.context = _build_context(settings, server=True)

    def reload(self, settings: TLSSettings) -> None:
        """
        New handshakes use ``settings``; established connections keep their context.
        """
        context = _build_context(settings, server=True)
        self.settings, self.context = settings, context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        return conn


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """
    Client-side connection creator: sends SNI and ALPN, checks the server's identity.
    """

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self.context = _build_context(settings, server=False)

    def reload(self, settings: TLSSettings) -> None:
        """
        New handshakes use ``settings``; established connections keep their context.
        """
        context = _build_context(settings, server=False)
        self.settings, self.context = settings, context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        if self.settings.sni:
            conn.set_tlsext_host_name(self.settings.sni.encode("idna"))
        conn.set_connect_state()
        return conn


def tls_settings_from_material(
    material: Any,
    *,
    peer_policy: PeerPolicy,
    alpn: Sequence[bytes] = (b"h2",),
    min_version: str = "TLSv1_3",
    sni: str = "",
    require_peer_certificate: bool = True,
) -> TLSSettings:
    """
    TLSSettings from an ``hbonex.tls.pki.TLSMaterial`` (its files reloaded when they change).
    """
    from hbonex.tls.certwatch import CertificateSources

    return TLSSettings(
        certificate=material.certificate,
        private_key=material.key,
        ca_certificates=tuple(material.ca_certificates),
        chain=tuple(material.chain),
        min_version=min_version,
        alpn=tuple(alpn),
        peer_policy=peer_policy,
        sni=sni,
        require_peer_certificate=require_peer_certificate,
        sources=CertificateSources(cert_file=material.cert_path, key_file=material.key_path,
                                   ca_file=material.ca_path, chain_check=True)
        if getattr(material, "cert_path", None) is not None else None,
    )


PeerCheck = Callable[[x509.Certificate], str | None]
