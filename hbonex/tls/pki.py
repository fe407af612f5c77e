"""A small EC P-256 PKI for development and simple deployments, plus TLS material loading.

Layout of a PKI directory::

    DIR/ca.pem            CA certificate (the trust bundle peers are verified against)
    DIR/ca-key.pem        CA private key (0600)
    DIR/NAME/cert.pem     leaf certificate for identity NAME (may be followed by intermediates)
    DIR/NAME/key.pem      its private key (0600)

Every error is a :class:`PKIError` whose message starts with the file it is about, because the
person reading it has to go and fix that file.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

from hbonex.tls.spiffe import SpiffeId, SpiffeIdError, spiffe_id_of

__all__ = [
    "DEV_PKI_LOCATION",
    "PKIError",
    "TLSMaterial",
    "ca_trust_domain",
    "default_state_dir",
    "ensure_dev_pki",
    "format_time",
    "init_ca",
    "issue",
    "load_material",
    "load_pki_dir",
    "not_after",
    "not_before",
]

StrPath = Union[str, "os.PathLike[str]"]

#: Where the dev PKI is kept, in the words of every help text and the README.
DEV_PKI_LOCATION = (
    "STATE/dev-pki, where STATE is --state-dir, else $HBONEX_STATE_DIR, else "
    "$XDG_STATE_HOME/hbonex, else ~/.local/state/hbonex"
)

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
LEAF_CERT = "cert.pem"
LEAF_KEY = "key.pem"

# Tolerate peers whose clocks are a little behind ours.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_DEV_RENEW_BEFORE = datetime.timedelta(days=1)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Private key types that cryptography's CertificateBuilder.sign accepts.
_ISSUER_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class PKIError(Exception):
    """A certificate/key problem; the message names the file and what is wrong with it."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _aware(now: datetime.datetime | None) -> datetime.datetime:
    """``now`` or the current time, as an aware datetime (naive values are taken as UTC)."""
    if now is None:
        return _utcnow()
    if now.tzinfo is None:
        return now.replace(tzinfo=datetime.timezone.utc)
    return now


def format_time(dt: datetime.datetime) -> str:
    """RFC 3339 UTC, second precision: ``2026-01-01T00:00:00Z``."""
    return dt.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def not_before(cert: x509.Certificate) -> datetime.datetime:
    # not_valid_*_utc appeared in cryptography 42; we support >= 41.
    value = getattr(cert, "not_valid_before_utc", None)
    if value is None:
        value = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)
    return value


def not_after(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    if value is None:
        value = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return value


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


# --- file I/O -----------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file")
    except PermissionError:
        raise PKIError(f"{path}: permission denied")
    except IsADirectoryError:
        raise PKIError(f"{path}: is a directory, not a file")
    except OSError as e:
        raise PKIError(f"{path}: {e.strerror or e}")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file + rename so readers never see a half-written file.

    The temp file is created with ``mode`` by os.open, so a private key is never world-readable,
    not even for an instant.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise PKIError(f"{path}: cannot write: {e.strerror or e}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PKIError(f"{path}: cannot write: {e.strerror or e}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mkdir(path: Path, mode: int = 0o755) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except FileExistsError:
        raise PKIError(f"{path}: exists and is not a directory")
    except OSError as e:
        raise PKIError(f"{path}: cannot create directory: {e.strerror or e}")


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- parsing ------------------------------------------------------------------------------


def _parse_certs(path: Path, data: bytes) -> list[x509.Certificate]:
    if not data.strip():
        raise PKIError(f"{path}: not a PEM certificate (file is empty)")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PKIError(f"{path}: not a PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise PKIError(f"{path}: not a PEM certificate ({e})")


def _parse_key(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PKIError(f"{path}: private key is encrypted; only unencrypted keys are supported")
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{path}: not a PEM private key")


def _public_der(obj: x509.Certificate | PrivateKeyTypes) -> bytes:
    pub = obj.public_key()
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(
    key: PrivateKeyTypes, key_path: Path, cert: x509.Certificate, cert_path: Path
) -> None:
    if _public_der(key) != _public_der(cert):
        raise PKIError(f"{key_path}: private key does not match certificate {cert_path}")


def _check_validity(
    cert: x509.Certificate, path: Path, now: datetime.datetime, what: str = "certificate"
) -> None:
    if now > not_after(cert):
        raise PKIError(f"{path}: {what} expired on {format_time(not_after(cert))}")
    if now < not_before(cert):
        raise PKIError(f"{path}: {what} is not valid until {format_time(not_before(cert))}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _is_valid(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return not_before(cert) <= now <= not_after(cert)


def _check_issuer(
    cert: x509.Certificate, path: Path, now: datetime.datetime, what: str, depth: int
) -> None:
    """``cert`` signed something on the chain, with ``depth`` intermediates below it."""
    _check_validity(cert, path, now, what=what)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PKIError(f"{path}: {what} is not a CA (BasicConstraints ca=True missing)")
    if bc.path_length is not None and depth > bc.path_length:
        raise PKIError(
            f"{path}: {what} allows {bc.path_length} intermediate(s) below it"
            f" (pathlen), but the chain has {depth}"
        )


def _directly_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    # verify_directly_issued_by (cryptography >= 40) checks issuer name and signature.
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


# --- TLS material -------------------------------------------------------------------------


@attrs.frozen
class TLSMaterial:
    """A validated certificate, its key, and the CA bundle to verify peers against."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    certificate: x509.Certificate
    key: PrivateKeyTypes
    ca_certificates: list[x509.Certificate]
    # Intermediates that followed the leaf in cert_path; send them with the leaf.
    chain: list[x509.Certificate] = attrs.field(factory=list)

    @property
    def spiffe_id(self) -> SpiffeId | None:
        return spiffe_id_of(self.certificate)

    def openssl_certificate(self) -> crypto.X509:
        return crypto.X509.from_cryptography(self.certificate)

    def openssl_key(self) -> crypto.PKey:
        return crypto.PKey.from_cryptography_key(self.key)  # type: ignore[arg-type]

    def openssl_ca_certificates(self) -> list[crypto.X509]:
        return [crypto.X509.from_cryptography(c) for c in self.ca_certificates]

    def openssl_chain(self) -> list[crypto.X509]:
        return [crypto.X509.from_cryptography(c) for c in self.chain]


def load_material(
    cert_path: StrPath,
    key_path: StrPath,
    ca_path: StrPath,
    now: datetime.datetime | None = None,
) -> TLSMaterial:
    """Load and cross-check a leaf certificate, its key and a CA bundle.

    Checks: files readable and PEM; key matches the certificate; leaf currently valid; its SPIFFE
    URI SAN (if any) well-formed; CA bundle non-empty; the leaf chains (through any
    intermediates in ``cert_path``) to a CA in the bundle, and every certificate on that chain is
    currently valid. Raises :class:`PKIError` naming the offending file.
    """
    cert_p, key_p, ca_p = Path(cert_path), Path(key_path), Path(ca_path)
    now = _aware(now)

    certs = _parse_certs(cert_p, _read(cert_p))
    leaf, chain = certs[0], certs[1:]
    key = _parse_key(key_p, _read(key_p))
    cas = _parse_certs(ca_p, _read(ca_p))

    _check_key_matches(key, key_p, leaf, cert_p)
    _check_validity(leaf, cert_p, now)
    try:
        spiffe_id_of(leaf)
    except SpiffeIdError as e:
        raise PKIError(f"{cert_p}: {e}")

    # Walk leaf -> intermediates (in file order, as TLS sends them) -> a CA in the bundle,
    # applying the checks OpenSSL will apply in the handshake, so problems surface at startup.
    current = leaf
    remaining = list(chain)
    depth = 0  # intermediates between the current issuer and the leaf
    while True:
        anchors = [ca for ca in cas if _directly_issued_by(current, ca)]
        if anchors:
            # Prefer a currently valid anchor: bundles may hold an old and a renewed root.
            anchor = next((a for a in anchors if _is_valid(a, now)), anchors[0])
            _check_issuer(anchor, ca_p, now, f"CA certificate '{_describe(anchor)}'", depth)
            break
        parent = next((c for c in remaining if _directly_issued_by(current, c)), None)
        if parent is None:
            issuer = current.issuer.rfc4514_string() or "<empty>"
            if current is leaf:
                raise PKIError(
                    f"{cert_p}: certificate is not signed by any CA in {ca_p} (issuer: {issuer})"
                )
            raise PKIError(
                f"{cert_p}: intermediate '{_describe(current)}' is not signed by any CA in"
                f" {ca_p} (issuer: {issuer})"
            )
        remaining.remove(parent)
        _check_issuer(parent, cert_p, now, f"intermediate '{_describe(parent)}'", depth)
        current = parent
        depth += 1

    return TLSMaterial(
        cert_path=cert_p,
        key_path=key_p,
        ca_path=ca_p,
        certificate=leaf,
        key=key,
        ca_certificates=cas,
        chain=chain,
    )


def load_pki_dir(
    pki_name_dir: StrPath,
    ca_path: StrPath | None = None,
    now: datetime.datetime | None = None,
) -> TLSMaterial:
    """Material for ``--pki DIR/NAME``: DIR/NAME/{cert,key}.pem, CA from DIR/ca.pem by default."""
    d = Path(pki_name_dir)
    ca = Path(ca_path) if ca_path is not None else d.parent / CA_CERT
    return load_material(d / LEAF_CERT, d / LEAF_KEY, ca, now=now)


# --- issuing ------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _check_days(days: int, path: Path) -> None:
    if not isinstance(days, int) or days < 1:
        raise PKIError(f"{path}: validity must be at least 1 day, not {days!r}")


def _validate_trust_domain(td: str, path: Path) -> None:
    try:
        sid = SpiffeId.parse(f"spiffe://{td}")
    except SpiffeIdError as e:
        raise PKIError(f"{path}: invalid trust domain {td!r}: {e}")
    if sid.path:
        raise PKIError(f"{path}: invalid trust domain {td!r}: must not contain '/'")


def init_ca(
    directory: StrPath,
    trust_domain: str = "cluster.local",
    days: int = 3650,
    force: bool = False,
    *,
    now: datetime.datetime | None = None,
) -> None:
    """Create DIR/ca.pem and DIR/ca-key.pem. ``now`` backdates issuance (for tests)."""
    d = Path(directory)
    cert_p, key_p = d / CA_CERT, d / CA_KEY
    _check_days(days, cert_p)
    _validate_trust_domain(trust_domain, cert_p)
    if not force:
        for p in (cert_p, key_p):
            if p.exists():
                raise PKIError(f"{p}: already exists; refusing to replace the CA (use --force)")
    _mkdir(d)

    now = _aware(now)
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hbonex"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"hbonex CA {trust_domain}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between leaves a mismatched pair, which load checks detect.
    _write_atomic(key_p, _key_pem(key), 0o600)
    _write_atomic(cert_p, _cert_pem(cert), 0o644)


def _load_ca(
    d: Path, now: datetime.datetime
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    cert_p, key_p = d / CA_CERT, d / CA_KEY
    ca_cert = _parse_certs(cert_p, _read(cert_p))[0]
    ca_key = _parse_key(key_p, _read(key_p))
    _check_key_matches(ca_key, key_p, ca_cert, cert_p)
    # Only expiry matters for signing: not-before is the CA's own business (and tests backdate
    # issuance to craft expired leaves).
    if now > not_after(ca_cert):
        raise PKIError(f"{cert_p}: CA certificate expired on {format_time(not_after(ca_cert))}")
    if not _is_ca(ca_cert):
        raise PKIError(f"{cert_p}: not a CA certificate (BasicConstraints ca=True missing)")
    if not isinstance(ca_key, _ISSUER_KEY_TYPES):
        raise PKIError(f"{key_p}: {type(ca_key).__name__} keys cannot sign certificates")
    return ca_cert, ca_key


def ca_trust_domain(directory: StrPath) -> str | None:
    """
    The trust domain DIR's CA is for: its ``spiffe://TD`` URI SAN (SPIFFE signing
    certificates may carry one), else the ``hbonex CA TD`` common name ``init_ca`` writes;
    ``None`` if the CA names none.
    """
    cert_p = Path(directory) / CA_CERT
    cert = _parse_certs(cert_p, _read(cert_p))[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://"):
                return SpiffeId.parse(uri).trust_domain
    except (x509.ExtensionNotFound, SpiffeIdError):
        pass
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode()
        if value.startswith("hbonex CA "):
            return value[len("hbonex CA "):]
    return None


def _check_name(d: Path, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise PKIError(
            f"{d / str(name)}: invalid name {name!r}; use letters, digits, '.', '-', '_'"
            " (a single path component, not starting with '.', '-' or '_')"
        )


def issue(
    directory: StrPath,
    name: str,
    spiffe: str | None = None,
    dns: Iterable[str] = (),
    ip: Iterable[str] = (),
    days: int = 365,
    *,
    force: bool = False,
    trust_domain: str | None = None,
    now: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue DIR/NAME/cert.pem + key.pem signed by DIR's CA; returns (cert_path, key_path).

    An existing NAME is replaced (rotation) only with ``force``, as ``init_ca`` does for the
    CA. With ``trust_domain``, the SPIFFE ID must be in it. The leaf never outlives the CA.
    ``now`` backdates issuance (for tests).
    """
    d = Path(directory)
    _check_name(d, name)
    leaf_dir = d / name
    cert_p, key_p = leaf_dir / LEAF_CERT, leaf_dir / LEAF_KEY
    _check_days(days, cert_p)
    now = _aware(now)
    if not force:
        for p in (cert_p, key_p):
            if p.exists():
                raise PKIError(
                    f"{p}: already exists; refusing to replace identity {name!r} (use --force)"
                )

    sans: list[x509.GeneralName] = []
    if spiffe is not None:
        try:
            sid = SpiffeId.parse(spiffe)
        except SpiffeIdError as e:
            raise PKIError(f"{cert_p}: {e}")
        if trust_domain is not None and sid.trust_domain != trust_domain:
            raise PKIError(
                f"{cert_p}: {sid} is not in trust domain {trust_domain}; pass --trust-domain "
                f"{sid.trust_domain} to issue it anyway"
            )
        sans.append(x509.UniformResourceIdentifier(str(sid)))
    for host in dns:
        try:
            host.encode("ascii")
        except UnicodeEncodeError:
            raise PKIError(f"{cert_p}: DNS name {host!r} must be ASCII (use the IDNA 'xn--' form)")
        if not host or any(c in host for c in " /:@"):
            raise PKIError(f"{cert_p}: invalid DNS name {host!r}")
        sans.append(x509.DNSName(host))
    for addr in ip:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(addr)))
        except ValueError:
            raise PKIError(f"{cert_p}: invalid IP address {addr!r}")
    if not sans:
        raise PKIError(f"{cert_p}: at least one SPIFFE ID, DNS name or IP address is required")

    ca_cert, ca_key = _load_ca(d, now)
    key = _new_key()
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()  # type: ignore[arg-type]
        )
    expires = min(now + datetime.timedelta(days=days), not_after(ca_cert))
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hbonex"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _mkdir(leaf_dir)
    _write_atomic(key_p, _key_pem(key), 0o600)
    _write_atomic(cert_p, _cert_pem(cert), 0o644)
    return cert_p, key_p


def renew(
    directory: StrPath, name: str, days: int | None = None, *,
    now: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Re-issue DIR/NAME in place with a new key and serial, keeping its SPIFFE ID, DNS names
    and IP addresses; ``days`` defaults to the old certificate's validity period."""
    d = Path(directory)
    _check_name(d, name)
    cert_p = d / name / LEAF_CERT
    old = _parse_certs(cert_p, _read(cert_p))[0]
    sans = certificate_san_values(old)
    if days is None:
        days = max(1, (not_after(old) - not_before(old) - _CLOCK_SKEW).days)
    spiffe = next((u for u in sans["URI"] if u.startswith("spiffe://")), None)
    return issue(d, name, spiffe=spiffe, dns=sans["DNS"], ip=sans["IP_ADDRESS"], days=days,
                 force=True, now=now)


def certificate_san_values(cert: x509.Certificate) -> dict[str, list[str]]:
    """URI, DNS and IP SANs of ``cert``."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return {"URI": [], "DNS": [], "IP_ADDRESS": []}
    return {
        "URI": list(ext.get_values_for_type(x509.UniformResourceIdentifier)),
        "DNS": list(ext.get_values_for_type(x509.DNSName)),
        "IP_ADDRESS": [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)],
    }


# --- development PKI ----------------------------------------------------------------------


def default_state_dir() -> Path:
    """``$HBONEX_STATE_DIR``, else ``$XDG_STATE_HOME/hbonex``, else ``~/.local/state/hbonex``."""
    explicit = os.environ.get("HBONEX_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "hbonex"
    return Path.home() / ".local" / "state" / "hbonex"


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock, best effort
        yield
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise PKIError(f"{lock_path}: cannot open lock file: {e.strerror or e}")
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
            except InterruptedError:  # pragma: no cover - EINTR from a signal
                continue
            except OSError as e:
                if e.errno == errno.EINTR:  # pragma: no cover
                    continue
                raise PKIError(f"{lock_path}: cannot lock: {e.strerror or e}")
        yield
    finally:
        os.close(fd)  # closing releases the flock


@attrs.frozen
class _DevIdentity:
    name: str
    spiffe: str
    dns: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()


def _dev_identities(trust_domain: str) -> list[_DevIdentity]:
    return [
        _DevIdentity(
            "server",
            str(SpiffeId.for_workload(trust_domain, "default", "server")),
            dns=("localhost",),
            ip=("127.0.0.1", "::1"),
        ),
        _DevIdentity("client", str(SpiffeId.for_workload(trust_domain, "default", "client"))),
    ]


def _leaf_is_current(dev: Path, name: str, spiffe: str, now: datetime.datetime) -> bool:
    try:
        material = load_pki_dir(dev / name, now=now)
    except PKIError:
        return False
    if not_after(material.certificate) - now < _DEV_RENEW_BEFORE:
        return False
    return str(material.spiffe_id) == spiffe


def _ca_is_current(dev: Path, now: datetime.datetime) -> bool:
    try:
        ca_cert, _ = _load_ca(dev, now)
    except PKIError:
        return False
    return not_after(ca_cert) - now >= _DEV_RENEW_BEFORE


def ensure_dev_pki(
    state_dir: StrPath | None = None,
    trust_domain: str = "cluster.local",
    *,
    now: datetime.datetime | None = None,
) -> Path:
    """Create or reuse STATE/dev-pki with a CA and the ``server`` and ``client`` identities.

    A leaf that is missing, broken, not signed by the current CA, expired or expiring within a
    day is re-issued; an unusable CA is replaced (and all leaves with it). Concurrent callers
    (e.g. a server and a client starting together) serialise on a flock.
    """
    state = Path(state_dir) if state_dir is not None else default_state_dir()
    dev = state / "dev-pki"
    _mkdir(dev, mode=0o700)
    now = _aware(now)
    with _locked(dev / ".lock"):
        if not _ca_is_current(dev, now):
            init_ca(dev, trust_domain=trust_domain, force=True, now=now)
        for ident in _dev_identities(trust_domain):
            if not _leaf_is_current(dev, ident.name, ident.spiffe, now):
                issue(dev, ident.name, spiffe=ident.spiffe, dns=ident.dns, ip=ident.ip,
                      force=True, now=now)
    return dev
