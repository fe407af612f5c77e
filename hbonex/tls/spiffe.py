"""SPIFFE IDs: parsing, extraction from X.509 certificates, and authorization matching.

Parsing follows the SPIFFE ID specification
(https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md), with the same strictness
as go-spiffe: no percent-encoding, no normalisation, and errors that say exactly what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Union

import attrs
from cryptography import x509
from OpenSSL import crypto

__all__ = [
    "IdentityMatcher",
    "SpiffeId",
    "SpiffeIdError",
    "spiffe_id_of",
    "uri_sans",
]

_SCHEME = "spiffe://"
_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")
# The spec caps the whole URI at 2048 bytes and the trust domain at 255 characters.
_MAX_URI_LENGTH = 2048
_MAX_TRUST_DOMAIN_LENGTH = 255

Certificate = Union[crypto.X509, x509.Certificate]


class SpiffeIdError(ValueError):
    """A string is not a valid SPIFFE ID (or a certificate carries an invalid/ambiguous one)."""


def _validate_trust_domain(td: str, uri: str) -> None:
    def fail(problem: str) -> SpiffeIdError:
        return SpiffeIdError(f"invalid SPIFFE ID {uri!r}: {problem}")

    if not td:
        raise fail("trust domain is missing")
    if "@" in td:
        raise fail("userinfo is not allowed")
    if ":" in td:
        raise fail("port is not allowed")
    if len(td) > _MAX_TRUST_DOMAIN_LENGTH:
        raise fail(f"trust domain is longer than {_MAX_TRUST_DOMAIN_LENGTH} characters")
    if not _TRUST_DOMAIN_CHARS.fullmatch(td):
        bad = next(c for c in td if not _TRUST_DOMAIN_CHARS.fullmatch(c))
        raise fail(
            f"trust domain contains {bad!r}; only lowercase letters, digits, '.', '-' and '_'"
            " are allowed"
        )


def _validate_path(path: str, uri: str) -> None:
    def fail(problem: str) -> SpiffeIdError:
        return SpiffeIdError(f"invalid SPIFFE ID {uri!r}: {problem}")

    if not path:
        return
    if path == "/":
        raise fail("path cannot be '/' (omit it to name the trust domain itself)")
    segments = path.split("/")[1:]
    if segments[-1] == "":
        raise fail("path cannot have a trailing slash")
    for segment in segments:
        if segment == "":
            raise fail("path cannot contain empty segments ('//')")
        if segment in (".", ".."):
            raise fail(f"path cannot contain dot segments ({segment!r})")
        if not _SEGMENT_CHARS.fullmatch(segment):
            bad = next(c for c in segment if not _SEGMENT_CHARS.fullmatch(c))
            raise fail(
                f"path segment {segment!r} contains {bad!r}; only letters, digits, '.', '-'"
                " and '_' are allowed"
            )


@attrs.frozen(order=True)
class SpiffeId:
    """A validated SPIFFE ID. ``path`` is ``""`` or starts with ``/``."""

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if not isinstance(uri, str):
            raise SpiffeIdError(f"invalid SPIFFE ID {uri!r}: not a string")
        if not uri:
            raise SpiffeIdError("invalid SPIFFE ID '': empty string")
        if len(uri.encode("utf-8")) > _MAX_URI_LENGTH:
            raise SpiffeIdError(
                f"invalid SPIFFE ID {uri[:40]!r}...: longer than {_MAX_URI_LENGTH} bytes"
            )
        if not uri.startswith(_SCHEME):
            scheme, sep, _ = uri.partition("://")
            if sep and scheme.lower() == "spiffe":
                problem = f"scheme must be lowercase 'spiffe', not {scheme!r}"
            elif sep:
                problem = f"scheme must be 'spiffe', not {scheme!r}"
            else:
                problem = "must start with 'spiffe://'"
            raise SpiffeIdError(f"invalid SPIFFE ID {uri!r}: {problem}")
        rest = uri[len(_SCHEME) :]
        # Query and fragment are checked first so that e.g. '?' is not blamed on the path.
        if "?" in rest:
            raise SpiffeIdError(f"invalid SPIFFE ID {uri!r}: query is not allowed")
        if "#" in rest:
            raise SpiffeIdError(f"invalid SPIFFE ID {uri!r}: fragment is not allowed")
        td, slash, tail = rest.partition("/")
        path = slash + tail
        _validate_trust_domain(td, uri)
        _validate_path(path, uri)
        return cls(td, path)

    @classmethod
    def for_workload(cls, trust_domain: str, ns: str, sa: str) -> SpiffeId:
        """The Istio-style identity ``spiffe://TD/ns/NS/sa/SA``."""
        uri = f"{_SCHEME}{trust_domain}/ns/{ns}/sa/{sa}"
        # Without this, ns="a/b" would silently produce a different identity shape.
        for label, value in (
            ("trust domain", trust_domain),
            ("namespace", ns),
            ("service account", sa),
        ):
            if "/" in value:
                raise SpiffeIdError(f"invalid SPIFFE ID {uri!r}: {label} {value!r} contains '/'")
        return cls.parse(uri)

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"

    def _istio_parts(self) -> tuple[str, str] | None:
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    @property
    def namespace(self) -> str | None:
        parts = self._istio_parts()
        return parts[0] if parts else None

    @property
    def service_account(self) -> str | None:
        parts = self._istio_parts()
        return parts[1] if parts else None


def _to_cryptography(cert: Certificate) -> x509.Certificate:
    if isinstance(cert, crypto.X509):
        return cert.to_cryptography()
    if isinstance(cert, x509.Certificate):
        return cert
    raise TypeError(f"expected an X.509 certificate, got {type(cert).__name__}")


def uri_sans(cert: Certificate) -> list[str]:
    """All URI SubjectAltNames of ``cert``, in certificate order."""
    try:
        ext = _to_cryptography(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: Certificate) -> SpiffeId | None:
    """The certificate's SPIFFE ID, or None if it has no spiffe:// URI SAN.

    Non-SPIFFE URI SANs are ignored. More than one SPIFFE URI is an error: the X.509-SVID spec
    requires exactly one, and picking one would let a CA-signed cert claim two identities.
    """
    candidates = [u for u in uri_sans(cert) if u[: len(_SCHEME)].lower() == _SCHEME]
    if not candidates:
        return None
    if len(candidates) > 1:
        raise SpiffeIdError(
            f"certificate has {len(candidates)} SPIFFE URI SANs ({', '.join(candidates)});"
            " exactly one is allowed"
        )
    return SpiffeId.parse(candidates[0])


@attrs.frozen
class _Pattern:
    text: str
    kind: str  # "exact" | "trust-domain" | "glob"
    regex: re.Pattern[str] | None = None

    def matches(self, sid: SpiffeId, text: str) -> bool:
        if self.kind == "exact":
            return text == self.text
        if self.kind == "trust-domain":
            return sid.trust_domain == self.text
        assert self.regex is not None
        return self.regex.fullmatch(text) is not None


def _compile_pattern(pattern: str) -> _Pattern:
    if not isinstance(pattern, str):
        raise SpiffeIdError(f"invalid identity pattern {pattern!r}: not a string")
    if "*" in pattern:
        if not pattern.startswith(_SCHEME):
            raise SpiffeIdError(
                f"invalid identity pattern {pattern!r}: must start with 'spiffe://'"
            )
        # Validate the non-wildcard parts by substituting a legal character for '*'.
        try:
            SpiffeId.parse(pattern.replace("*", "x"))
        except SpiffeIdError as e:
            raise SpiffeIdError(f"invalid identity pattern {pattern!r}: {e}")
        # fnmatch-style, but case-sensitive and '*' never crosses '/': otherwise
        # 'spiffe://td/ns/*/sa/client' would also admit 'spiffe://td/ns/a/sa/b/ns/c/sa/client'.
        regex = "".join("[^/]*" if c == "*" else re.escape(c) for c in pattern)
        return _Pattern(pattern, "glob", re.compile(regex))
    if pattern.startswith(_SCHEME) and pattern.endswith("/") and pattern.count("/") == 3:
        pattern = pattern[:-1]  # 'spiffe://td/' means the same as 'spiffe://td'
    sid = SpiffeId.parse(pattern)
    if sid.path == "":
        return _Pattern(sid.trust_domain, "trust-domain")
    return _Pattern(str(sid), "exact")


class IdentityMatcher:
    """Decides whether a peer SPIFFE ID is acceptable.

    Patterns (any one matching is enough):

    * an exact SPIFFE ID: ``spiffe://cluster.local/ns/default/sa/client``;
    * ``spiffe://TD`` or ``spiffe://TD/``: any identity in trust domain TD;
    * a glob where ``*`` matches any run of characters within one path segment (or within the
      trust domain): ``spiffe://cluster.local/ns/*/sa/client``.

    An empty matcher matches nothing.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        self._compiled: Sequence[_Pattern] = [_compile_pattern(p) for p in self.patterns]

    @classmethod
    def trust_domain(cls, td: str) -> IdentityMatcher:
        return cls([f"{_SCHEME}{td}"])

    def matches(self, spiffe_id: SpiffeId | str) -> bool:
        if isinstance(spiffe_id, str):
            try:
                spiffe_id = SpiffeId.parse(spiffe_id)
            except SpiffeIdError:
                # A malformed peer identity is simply not authorized.
                return False
        text = str(spiffe_id)
        return any(p.matches(spiffe_id, text) for p in self._compiled)

    def __str__(self) -> str:
        if not self.patterns:
            return "<no identity>"
        return ", ".join(self.patterns)

    def __repr__(self) -> str:
        return f"IdentityMatcher({list(self.patterns)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdentityMatcher):
            return NotImplemented
        return self.patterns == other.patterns

    def __hash__(self) -> int:
        return hash(self.patterns)
