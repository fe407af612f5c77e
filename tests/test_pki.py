"""hbonex.tls.pki: CA creation, issuance, material loading, dev PKI, and a real handshake."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.trial import unittest

from hbonex.tls import pki
from hbonex.tls.context import ClientTLS, PeerPolicy, ServerTLS, tls_settings_from_material
from hbonex.tls.pki import (
    PKIError,
    TLSMaterial,
    default_state_dir,
    ensure_dev_pki,
    init_ca,
    issue,
    load_material,
    load_pki_dir,
)
from hbonex.tls.spiffe import SpiffeId, spiffe_id_of

UTC = datetime.timezone.utc
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


def now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_ca(
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    path_length: int | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (root if issuer is None, else an intermediate) built by hand, for chain tests."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(hours=1))
        .not_valid_after(now() + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .sign(signing_key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], spiffe: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(hours=1))
        .not_valid_after(now() + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=False
        )
        .sign(issuer[1], hashes.SHA256())
    )
    return cert, key


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class PKITestCase(unittest.TestCase):
    def make_pki(self) -> Path:
        d = Path(self.mktemp())
        init_ca(d)
        issue(d, "server", spiffe=SERVER_ID, dns=["localhost"], ip=["127.0.0.1", "::1"])
        issue(d, "client", spiffe=CLIENT_ID)
        return d

    def assertPKIError(self, fragments: list[str], f: Any, *args: Any, **kw: Any) -> str:
        with self.assertRaises(PKIError) as cm:
            f(*args, **kw)
        message = str(cm.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class InitCATests(PKITestCase):
    def test_files_and_modes(self) -> None:
        d = Path(self.mktemp())
        init_ca(d, trust_domain="example.org", days=10)
        self.assertEqual(mode(d / "ca-key.pem"), 0o600)
        self.assertTrue((d / "ca.pem").is_file())
        # No temp files left behind by the atomic writes.
        self.assertEqual(sorted(p.name for p in d.iterdir()), ["ca-key.pem", "ca.pem"])

    def test_ca_certificate(self) -> None:
        d = Path(self.mktemp())
        init_ca(d, trust_domain="example.org", days=10)
        ca = read_cert(d / "ca.pem")
        cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "hbonex CA example.org")
        self.assertEqual(ca.subject, ca.issuer)
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertTrue(bc.value.ca)
        self.assertEqual(bc.value.path_length, 0)
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.key_cert_sign)
        self.assertTrue(ku.crl_sign)
        self.assertFalse(ku.digital_signature)
        ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self.assertIsInstance(ca.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(ca.public_key().curve.name, "secp256r1")  # type: ignore[union-attr]
        lifetime = pki.not_after(ca) - pki.not_before(ca)
        self.assertEqual(lifetime, datetime.timedelta(days=10, minutes=5))
        ca.verify_directly_issued_by(ca)

    def test_key_created_private(self) -> None:
        """The key file is opened with 0600, not chmod-ed afterwards."""
        calls: list[tuple[str, int]] = []
        real_open = os.open

        def recording_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            calls.append((os.fspath(path), mode))
            return real_open(path, flags, mode, **kw)

        self.patch(os, "open", recording_open)
        init_ca(Path(self.mktemp()))
        key_modes = [m for p, m in calls if "ca-key.pem" in p]
        self.assertEqual(key_modes, [0o600])

    def test_refuses_overwrite(self) -> None:
        d = Path(self.mktemp())
        init_ca(d)
        before = (d / "ca.pem").read_bytes()
        self.assertPKIError([str(d / "ca.pem"), "already exists", "--force"], init_ca, d)
        self.assertEqual((d / "ca.pem").read_bytes(), before)
        # Either file existing is enough to refuse.
        (d / "ca.pem").unlink()
        self.assertPKIError([str(d / "ca-key.pem"), "already exists"], init_ca, d)

    def test_force(self) -> None:
        d = Path(self.mktemp())
        init_ca(d)
        before = (d / "ca.pem").read_bytes()
        init_ca(d, force=True)
        self.assertNotEqual((d / "ca.pem").read_bytes(), before)
        load_material(d / "ca.pem", d / "ca-key.pem", d / "ca.pem")

    def test_bad_arguments(self) -> None:
        d = Path(self.mktemp())
        self.assertPKIError(["invalid trust domain 'Bad'"], init_ca, d, trust_domain="Bad")
        self.assertPKIError(["must not contain '/'"], init_ca, d, trust_domain="td/x")
        self.assertPKIError(["at least 1 day"], init_ca, d, days=0)
        self.assertFalse(d.exists())


class IssueTests(PKITestCase):
    def test_files_and_modes(self) -> None:
        d = Path(self.mktemp())
        init_ca(d)
        cert_p, key_p = issue(d, "server", spiffe=SERVER_ID, dns=["localhost"])
        self.assertEqual(cert_p, d / "server" / "cert.pem")
        self.assertEqual(key_p, d / "server" / "key.pem")
        self.assertEqual(mode(key_p), 0o600)
        self.assertEqual(sorted(p.name for p in (d / "server").iterdir()), ["cert.pem", "key.pem"])

    def test_leaf_contents(self) -> None:
        d = self.make_pki()
        ca = read_cert(d / "ca.pem")
        leaf = read_cert(d / "server" / "cert.pem")
        leaf.verify_directly_issued_by(ca)

        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.UniformResourceIdentifier), [SERVER_ID])
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(
            list(eku), [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.digital_signature)
        self.assertTrue(ku.key_agreement)
        self.assertFalse(ku.key_cert_sign)
        self.assertFalse(leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.assertEqual(aki.key_identifier, ski.digest)
        # Backdated for clock skew.
        skew = now() - pki.not_before(leaf)
        self.assertTrue(datetime.timedelta(minutes=4) < skew < datetime.timedelta(minutes=6), skew)
        client = read_cert(d / "client" / "cert.pem")
        self.assertEqual(spiffe_id_of(client), SpiffeId.parse(CLIENT_ID))

    def test_openssl_verifies_leaf(self) -> None:
        """OpenSSL's own chain building accepts the leaf (not just our signature check)."""
        d = self.make_pki()
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(read_cert(d / "ca.pem")))
        leaf = crypto.X509.from_cryptography(read_cert(d / "client" / "cert.pem"))
        crypto.X509StoreContext(store, leaf).verify_certificate()
        other = Path(self.mktemp())
        init_ca(other)
        store2 = crypto.X509Store()
        store2.add_cert(crypto.X509.from_cryptography(read_cert(other / "ca.pem")))
        self.assertRaises(
            crypto.X509StoreContextError,
            crypto.X509StoreContext(store2, leaf).verify_certificate,
        )

    def test_dns_only(self) -> None:
        d = Path(self.mktemp())
        init_ca(d)
        cert_p, _ = issue(d, "web", dns=["example.org"], days=3)
        leaf = read_cert(cert_p)
        self.assertIsNone(spiffe_id_of(leaf))
        self.assertEqual(
            pki.not_after(leaf) - pki.not_before(leaf), datetime.timedelta(days=3, minutes=5)
        )

    def test_leaf_never_outlives_ca(self) -> None:
        d = Path(self.mktemp())
        init_ca(d, days=2)
        cert_p, _ = issue(d, "x", spiffe=CLIENT_ID, days=365)
        self.assertEqual(pki.not_after(read_cert(cert_p)), pki.not_after(read_cert(d / "ca.pem")))

    def test_reissue_needs_force(self) -> None:
        d = self.make_pki()
        before = (d / "client" / "key.pem").read_bytes()
        self.assertPKIError(
            ["client/cert.pem: already exists; refusing to replace identity 'client' "
             "(use --force)"],
            issue, d, "client", spiffe=CLIENT_ID,
        )
        self.assertEqual((d / "client" / "key.pem").read_bytes(), before)
        issue(d, "client", spiffe=CLIENT_ID, force=True)
        self.assertNotEqual((d / "client" / "key.pem").read_bytes(), before)
        load_pki_dir(d / "client")

    def test_trust_domain(self) -> None:
        d = self.make_pki()
        self.assertEqual(pki.ca_trust_domain(d), "cluster.local")
        self.assertPKIError(
            ["x/cert.pem: spiffe://example.org/ns/a/sa/b is not in trust domain cluster.local;"
             " pass --trust-domain example.org to issue it anyway"],
            issue, d, "x", spiffe="spiffe://example.org/ns/a/sa/b", trust_domain="cluster.local",
        )
        self.assertFalse((d / "x").exists())
        issue(d, "x", spiffe="spiffe://example.org/ns/a/sa/b", trust_domain="example.org")
        issue(d, "y", spiffe="spiffe://example.org/ns/a/sa/b")  # no trust_domain: no check

    def test_errors(self) -> None:
        d = Path(self.mktemp())
        init_ca(d)
        self.assertPKIError(["at least one"], issue, d, "x")
        self.assertPKIError(
            ["x/cert.pem", "invalid SPIFFE ID", "trailing slash"],
            issue,
            d,
            "x",
            spiffe="spiffe://cluster.local/ns/a/",
        )
        self.assertPKIError(["invalid IP address '1.2.3'"], issue, d, "x", ip=["1.2.3"])
        self.assertPKIError(["must be ASCII"], issue, d, "x", dns=["bücher.example"])
        self.assertPKIError(["invalid DNS name"], issue, d, "x", dns=["a b"])
        self.assertPKIError(["at least 1 day"], issue, d, "x", dns=["a"], days=-1)
        for bad in ("", ".", "..", "a/b", "../x", ".hidden", "a\0b"):
            self.assertPKIError(["invalid name"], issue, d, bad, spiffe=CLIENT_ID)
        self.assertFalse((d / "x").exists())

    def test_missing_ca(self) -> None:
        d = Path(self.mktemp())
        self.assertPKIError([str(d / "ca.pem"), "no such file"], issue, d, "x", dns=["a"])

    def test_expired_ca(self) -> None:
        d = Path(self.mktemp())
        init_ca(d, days=1, now=now() - datetime.timedelta(days=3))
        self.assertPKIError(
            [str(d / "ca.pem"), "CA certificate expired on"], issue, d, "x", dns=["a"]
        )

    def test_mismatched_ca_key(self) -> None:
        d = Path(self.mktemp())
        init_ca(d)
        other = Path(self.mktemp())
        init_ca(other)
        (d / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())
        self.assertPKIError(
            [f"{d / 'ca-key.pem'}: private key does not match certificate {d / 'ca.pem'}"],
            issue,
            d,
            "x",
            dns=["a"],
        )


class LoadMaterialTests(PKITestCase):
    def test_success(self) -> None:
        d = self.make_pki()
        m = load_material(d / "server" / "cert.pem", d / "server" / "key.pem", d / "ca.pem")
        self.assertIsInstance(m, TLSMaterial)
        self.assertEqual(m.spiffe_id, SpiffeId.parse(SERVER_ID))
        self.assertEqual(m.cert_path, d / "server" / "cert.pem")
        self.assertEqual(m.ca_certificates, [read_cert(d / "ca.pem")])
        self.assertEqual(m.chain, [])
        # The pyOpenSSL views are the same objects underneath.
        self.assertEqual(m.openssl_certificate().to_cryptography(), m.certificate)
        self.assertEqual(
            m.openssl_key().to_cryptography_key().public_key(),  # type: ignore[union-attr]
            m.certificate.public_key(),
        )
        cas = m.openssl_ca_certificates()
        self.assertEqual(len(cas), 1)
        self.assertEqual(cas[0].to_cryptography(), read_cert(d / "ca.pem"))
        self.assertEqual(spiffe_id_of(m.openssl_certificate()), SpiffeId.parse(SERVER_ID))

    def test_accepts_str_paths(self) -> None:
        d = self.make_pki()
        m = load_material(
            str(d / "client" / "cert.pem"), str(d / "client" / "key.pem"), str(d / "ca.pem")
        )
        self.assertEqual(m.key_path, d / "client" / "key.pem")

    def test_load_pki_dir(self) -> None:
        d = self.make_pki()
        m = load_pki_dir(d / "client")
        self.assertEqual(m.ca_path, d / "ca.pem")
        self.assertEqual(m.key_path, d / "client" / "key.pem")
        self.assertEqual(m.spiffe_id, SpiffeId.parse(CLIENT_ID))
        other = Path(self.mktemp())
        init_ca(other)
        self.assertPKIError(
            ["not signed by any CA in", str(other / "ca.pem")],
            load_pki_dir,
            d / "client",
            ca_path=other / "ca.pem",
        )
        self.assertPKIError(
            [str(d / "nobody" / "cert.pem"), "no such file"], load_pki_dir, d / "nobody"
        )

    def test_missing_files(self) -> None:
        d = self.make_pki()
        cert, key, ca = d / "client" / "cert.pem", d / "client" / "key.pem", d / "ca.pem"
        missing = d / "missing.pem"
        self.assertPKIError([f"{missing}: no such file"], load_material, missing, key, ca)
        self.assertPKIError([f"{missing}: no such file"], load_material, cert, missing, ca)
        self.assertPKIError([f"{missing}: no such file"], load_material, cert, key, missing)
        self.assertPKIError([f"{d}: is a directory"], load_material, cert, key, d)

    def test_permission_denied(self) -> None:
        d = self.make_pki()
        key = d / "client" / "key.pem"
        real = Path.read_bytes

        def deny(self: Path) -> bytes:
            if self == key:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        self.patch(Path, "read_bytes", deny)
        self.assertPKIError(
            [f"{key}: permission denied"],
            load_material,
            d / "client" / "cert.pem",
            key,
            d / "ca.pem",
        )

    def test_garbage(self) -> None:
        d = self.make_pki()
        cert, key, ca = d / "client" / "cert.pem", d / "client" / "key.pem", d / "ca.pem"
        junk = d / "junk.pem"
        junk.write_bytes(b"hello\n")
        self.assertPKIError([f"{junk}: not a PEM certificate"], load_material, junk, key, ca)
        self.assertPKIError([f"{junk}: not a PEM certificate"], load_material, cert, key, junk)
        self.assertPKIError([f"{junk}: not a PEM private key"], load_material, cert, junk, ca)
        # A key where a certificate belongs, and vice versa.
        self.assertPKIError([f"{key}: not a PEM certificate"], load_material, key, key, ca)
        self.assertPKIError([f"{cert}: not a PEM private key"], load_material, cert, cert, ca)
        # PEM armour around garbage.
        corrupt = d / "corrupt.pem"
        corrupt.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertPKIError([f"{corrupt}: not a PEM certificate"], load_material, corrupt, key, ca)
        empty = d / "empty.pem"
        empty.write_bytes(b"")
        self.assertPKIError(
            [f"{empty}: not a PEM certificate (file is empty)"], load_material, cert, key, empty
        )

    def test_encrypted_key(self) -> None:
        d = self.make_pki()
        key = serialization.load_pem_private_key(
            (d / "client" / "key.pem").read_bytes(), password=None
        )
        enc = d / "client" / "enc.pem"
        enc.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        self.assertPKIError(
            [f"{enc}: private key is encrypted"],
            load_material,
            d / "client" / "cert.pem",
            enc,
            d / "ca.pem",
        )

    def test_mismatched_key(self) -> None:
        d = self.make_pki()
        self.assertPKIError(
            [
                f"{d / 'server' / 'key.pem'}: private key does not match certificate"
                f" {d / 'client' / 'cert.pem'}"
            ],
            load_material,
            d / "client" / "cert.pem",
            d / "server" / "key.pem",
            d / "ca.pem",
        )

    def test_expired(self) -> None:
        d = Path(self.mktemp())
        issued = now() - datetime.timedelta(days=10)
        init_ca(d, now=issued)
        issue(d, "old", spiffe=CLIENT_ID, days=2, now=issued)
        expiry = pki.format_time(issued + datetime.timedelta(days=2))
        self.assertPKIError(
            [f"{d / 'old' / 'cert.pem'}: certificate expired on {expiry}"],
            load_pki_dir,
            d / "old",
        )
        # Still fine at a time when it was valid.
        load_pki_dir(d / "old", now=issued + datetime.timedelta(days=1))

    def test_expired_message_format(self) -> None:
        d = self.make_pki()
        self.assertPKIError(
            ["certificate expired on 20", "Z"],
            load_pki_dir,
            d / "client",
            now=now() + datetime.timedelta(days=400),
        )
        message = self.assertPKIError(
            [], load_pki_dir, d / "client", now=datetime.datetime(2200, 1, 1, tzinfo=UTC)
        )
        self.assertRegex(message, r"expired on \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    def test_not_yet_valid(self) -> None:
        d = self.make_pki()
        self.assertPKIError(
            [f"{d / 'client' / 'cert.pem'}: certificate is not valid until"],
            load_pki_dir,
            d / "client",
            now=now() - datetime.timedelta(hours=1),
        )

    def test_naive_now_is_utc(self) -> None:
        d = self.make_pki()
        naive = datetime.datetime.now(UTC).replace(tzinfo=None)
        self.assertEqual(load_pki_dir(d / "client", now=naive).spiffe_id, SpiffeId.parse(CLIENT_ID))
        self.assertPKIError(
            ["expired"], load_pki_dir, d / "client", now=naive + datetime.timedelta(days=400)
        )

    def test_other_ca(self) -> None:
        d = self.make_pki()
        other = Path(self.mktemp())
        init_ca(other)
        issue(other, "client", spiffe=CLIENT_ID)
        self.assertPKIError(
            [f"{other / 'client' / 'cert.pem'}: certificate is not signed by any CA in {d}"],
            load_material,
            other / "client" / "cert.pem",
            other / "client" / "key.pem",
            d / "ca.pem",
        )

    def test_same_name_other_ca(self) -> None:
        """Same CA subject (same trust domain) but a different key: the signature decides."""
        d = self.make_pki()
        other = Path(self.mktemp())
        init_ca(other)  # same CN "hbonex CA cluster.local"
        self.assertEqual(read_cert(d / "ca.pem").subject, read_cert(other / "ca.pem").subject)
        self.assertPKIError(
            ["not signed by any CA"], load_pki_dir, d / "client", ca_path=other / "ca.pem"
        )

    def test_bundle_with_several_cas(self) -> None:
        d = self.make_pki()
        other = Path(self.mktemp())
        init_ca(other, trust_domain="example.org")
        bundle = d / "bundle.pem"
        bundle.write_bytes((other / "ca.pem").read_bytes() + (d / "ca.pem").read_bytes())
        m = load_pki_dir(d / "client", ca_path=bundle)
        self.assertEqual(len(m.ca_certificates), 2)
        self.assertEqual(len(m.openssl_ca_certificates()), 2)

    def test_expired_ca(self) -> None:
        """A bundle whose CA (same key and name) has expired is rejected, naming the bundle."""
        d = self.make_pki()
        ca = read_cert(d / "ca.pem")
        ca_key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), password=None)
        expired = (
            x509.CertificateBuilder()
            .subject_name(ca.subject)
            .issuer_name(ca.subject)
            .public_key(ca.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=UTC))
            .not_valid_after(datetime.datetime(2021, 1, 1, tzinfo=UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        old = d / "old-ca.pem"
        old.write_bytes(pem(expired))
        self.assertPKIError(
            [f"{old}: CA certificate", "expired on 2021-01-01T00:00:00Z"],
            load_pki_dir,
            d / "client",
            ca_path=old,
        )
        # With the renewed CA next to the expired one, the valid one is used.
        both = d / "both.pem"
        both.write_bytes(pem(expired) + (d / "ca.pem").read_bytes())
        load_pki_dir(d / "client", ca_path=both)

    def test_bundle_cert_not_a_ca(self) -> None:
        """A leaf placed in the CA bundle does not make its 'children' trusted."""
        d = Path(self.mktemp())
        d.mkdir()
        root = make_ca("root")
        not_ca_key = ec.generate_private_key(ec.SECP256R1())
        not_ca = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "notca")]))
            .issuer_name(root[0].subject)
            .public_key(not_ca_key.public_key())
            .serial_number(1)
            .not_valid_before(now() - datetime.timedelta(hours=1))
            .not_valid_after(now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(root[1], hashes.SHA256())
        )
        leaf, leaf_key = make_leaf((not_ca, not_ca_key), CLIENT_ID)
        (d / "cert.pem").write_bytes(pem(leaf))
        (d / "key.pem").write_bytes(key_pem(leaf_key))
        (d / "ca.pem").write_bytes(pem(not_ca))
        self.assertPKIError(["is not a CA"], load_pki_dir, d, ca_path=d / "ca.pem")

    def test_malformed_spiffe_san(self) -> None:
        d = Path(self.mktemp())
        d.mkdir()
        root = make_ca("root")
        leaf, leaf_key = make_leaf(root, "spiffe://cluster.local/ns/../x")
        (d / "cert.pem").write_bytes(pem(leaf))
        (d / "key.pem").write_bytes(key_pem(leaf_key))
        (d / "ca.pem").write_bytes(pem(root[0]))
        self.assertPKIError(
            [f"{d / 'cert.pem'}: invalid SPIFFE ID", "dot segments"],
            load_pki_dir,
            d,
            ca_path=d / "ca.pem",
        )


class ChainTests(PKITestCase):
    """Leaf files that carry intermediates after the leaf."""

    def write(self, leaf_file: bytes, key: ec.EllipticCurvePrivateKey, ca: bytes) -> Path:
        d = Path(self.mktemp())
        d.mkdir()
        (d / "cert.pem").write_bytes(leaf_file)
        (d / "key.pem").write_bytes(key_pem(key))
        (d / "ca.pem").write_bytes(ca)
        return d

    def test_intermediate(self) -> None:
        root = make_ca("root", path_length=1)
        inter = make_ca("intermediate", issuer=root, path_length=0)
        leaf, key = make_leaf(inter, CLIENT_ID)
        d = self.write(pem(leaf, inter[0]), key, pem(root[0]))
        m = load_pki_dir(d, ca_path=d / "ca.pem")
        self.assertEqual(m.certificate, leaf)
        self.assertEqual(m.chain, [inter[0]])
        self.assertEqual([c.to_cryptography() for c in m.openssl_chain()], [inter[0]])
        self.assertEqual(m.spiffe_id, SpiffeId.parse(CLIENT_ID))

    def test_missing_intermediate(self) -> None:
        root = make_ca("root")
        inter = make_ca("intermediate", issuer=root)
        leaf, key = make_leaf(inter, CLIENT_ID)
        d = self.write(pem(leaf), key, pem(root[0]))
        self.assertPKIError(
            ["not signed by any CA", "issuer: CN=intermediate"],
            load_pki_dir,
            d,
            ca_path=d / "ca.pem",
        )

    def test_intermediate_from_other_root(self) -> None:
        root, other = make_ca("root"), make_ca("other")
        inter = make_ca("intermediate", issuer=other)
        leaf, key = make_leaf(inter, CLIENT_ID)
        d = self.write(pem(leaf, inter[0]), key, pem(root[0]))
        self.assertPKIError(
            ["intermediate 'CN=intermediate' is not signed by any CA"],
            load_pki_dir,
            d,
            ca_path=d / "ca.pem",
        )

    def test_path_length(self) -> None:
        """Our CAs have pathlen 0, so an intermediate under them is refused (as OpenSSL would)."""
        root = make_ca("root", path_length=0)
        inter = make_ca("intermediate", issuer=root)
        leaf, key = make_leaf(inter, CLIENT_ID)
        d = self.write(pem(leaf, inter[0]), key, pem(root[0]))
        self.assertPKIError(["pathlen"], load_pki_dir, d, ca_path=d / "ca.pem")


class StateDirTests(unittest.TestCase):
    def test_explicit(self) -> None:
        self.patch(os, "environ", {"HBONEX_STATE_DIR": "/srv/hb", "XDG_STATE_HOME": "/x"})
        self.assertEqual(default_state_dir(), Path("/srv/hb"))

    def test_xdg(self) -> None:
        self.patch(os, "environ", {"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"})
        self.assertEqual(default_state_dir(), Path("/x/state/hbonex"))

    def test_relative_xdg_ignored(self) -> None:
        self.patch(os, "environ", {"XDG_STATE_HOME": "rel", "HOME": "/home/u"})
        self.assertEqual(default_state_dir(), Path("/home/u/.local/state/hbonex"))

    def test_home(self) -> None:
        self.patch(os, "environ", {"HOME": "/home/u"})
        self.assertEqual(default_state_dir(), Path("/home/u/.local/state/hbonex"))


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*.pem"))
    }


class DevPKITests(unittest.TestCase):
    def test_creates(self) -> None:
        state = Path(self.mktemp())
        dev = ensure_dev_pki(state)
        self.assertEqual(dev, state / "dev-pki")
        self.assertEqual(mode(dev), 0o700)
        self.assertEqual(
            sorted(snapshot(dev)),
            [
                "ca-key.pem",
                "ca.pem",
                "client/cert.pem",
                "client/key.pem",
                "server/cert.pem",
                "server/key.pem",
            ],
        )
        for key in ("ca-key.pem", "client/key.pem", "server/key.pem"):
            self.assertEqual(mode(dev / key), 0o600, key)
        server = load_pki_dir(dev / "server")
        client = load_pki_dir(dev / "client")
        self.assertEqual(str(server.spiffe_id), SERVER_ID)
        self.assertEqual(str(client.spiffe_id), CLIENT_ID)
        san = server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.value.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_default_state_dir(self) -> None:
        state = Path(self.mktemp())
        self.patch(os, "environ", {**os.environ, "HBONEX_STATE_DIR": str(state)})
        self.assertEqual(ensure_dev_pki(), state / "dev-pki")
        self.assertTrue((state / "dev-pki" / "ca.pem").exists())

    def test_trust_domain(self) -> None:
        dev = ensure_dev_pki(self.mktemp(), trust_domain="example.org")
        self.assertEqual(
            str(load_pki_dir(dev / "server").spiffe_id), "spiffe://example.org/ns/default/sa/server"
        )

    def test_reuses(self) -> None:
        state = Path(self.mktemp())
        dev = ensure_dev_pki(state)
        before = snapshot(dev)
        self.assertEqual(ensure_dev_pki(state), dev)
        self.assertEqual(snapshot(dev), before)

    def test_reissues_expired_leaf(self) -> None:
        state = Path(self.mktemp())
        dev = ensure_dev_pki(state)
        issue(
            dev,
            "server",
            spiffe=SERVER_ID,
            dns=["localhost"],
            days=1,
            now=now() - datetime.timedelta(days=5),
            force=True,
        )
        self.assertRaises(PKIError, load_pki_dir, dev / "server")
        before = snapshot(dev)
        ensure_dev_pki(state)
        after = snapshot(dev)
        load_pki_dir(dev / "server")
        self.assertNotEqual(after["server/cert.pem"], before["server/cert.pem"])
        self.assertNotEqual(after["server/key.pem"], before["server/key.pem"])
        # Only the broken identity is touched.
        for name in ("ca.pem", "ca-key.pem", "client/cert.pem", "client/key.pem"):
            self.assertEqual(after[name], before[name], name)

    def test_reissues_expiring_leaf(self) -> None:
        state = Path(self.mktemp())
        dev = ensure_dev_pki(state)
        # Valid now, but for only about 12 more hours.
        issue(dev, "client", spiffe=CLIENT_ID, days=2, now=now() - datetime.timedelta(hours=36),
              force=True)
        load_pki_dir(dev / "client")
        before = (dev / "client" / "cert.pem").read_bytes()
        ensure_dev_pki(state)
        self.assertNotEqual((dev / "client" / "cert.pem").read_bytes(), before)
        m = load_pki_dir(dev / "client")
        self.assertGreater(pki.not_after(m.certificate) - now(), datetime.timedelta(days=300))

    def test_reissues_missing_or_mismatched_leaf(self) -> None:
        state = Path(self.mktemp())
        dev = ensure_dev_pki(state)
        (dev / "server" / "key.pem").unlink()
        (dev / "client" / "key.pem").write_bytes(b"junk")
        ensure_dev_pki(state)
        load_pki_dir(dev / "server")
        load_pki_dir(dev / "client")

    def test_reissues_leaf_with_wrong_identity(self) -> None:
        state = Path(self.mktemp())
        dev = ensure_dev_pki(state)
        issue(dev, "client", spiffe="spiffe://cluster.local/ns/other/sa/x", force=True)
        ensure_dev_pki(state)
        self.assertEqual(str(load_pki_dir(dev / "client").spiffe_id), CLIENT_ID)

    def test_replaces_broken_ca(self) -> None:
        state = Path(self.mktemp())
        dev = ensure_dev_pki(state)
        before = snapshot(dev)
        (dev / "ca-key.pem").unlink()
        ensure_dev_pki(state)
        after = snapshot(dev)
        self.assertNotEqual(after["ca.pem"], before["ca.pem"])
        # Leaves of the old CA would no longer verify, so they are re-issued too.
        self.assertNotEqual(after["server/cert.pem"], before["server/cert.pem"])
        load_pki_dir(dev / "server")
        load_pki_dir(dev / "client")

    def test_concurrent_processes(self) -> None:
        """Several processes racing on a fresh state dir end up agreeing on one PKI."""
        state = Path(self.mktemp()).absolute()
        # Imports first, then all processes start at the same instant, so they really race.
        script = (
            "import hashlib, sys, time\n"
            "from hbonex.tls.pki import ensure_dev_pki\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "dev = ensure_dev_pki(sys.argv[1])\n"
            "for n in ('ca.pem', 'server/cert.pem', 'client/cert.pem'):\n"
            "    print(hashlib.sha256((dev / n).read_bytes()).hexdigest())\n"
        )
        env = {**os.environ, "PYTHONPATH": str(Path(pki.__file__).parent.parent.parent)}
        start = time.time() + 1.5
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(state), str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for _ in range(4)
        ]
        outputs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0, err.decode())
            outputs.append(out)
        self.assertEqual(len(set(outputs)), 1, outputs)
        dev = state / "dev-pki"
        expected = [
            hashlib.sha256((dev / n).read_bytes()).hexdigest().encode()
            for n in ("ca.pem", "server/cert.pem", "client/cert.pem")
        ]
        self.assertEqual(outputs[0].split(), expected)
        load_pki_dir(dev / "server")
        load_pki_dir(dev / "client")
        self.assertEqual([p.name for p in dev.glob(".*.tmp")], [])


# --- real TLS handshake -------------------------------------------------------------------


def tls_context(material: TLSMaterial, server: bool) -> SSL.Context:
    """Mutual-TLS 1.3 context as an HBONE endpoint builds it (hbonex.tls.context)."""
    settings = tls_settings_from_material(material, peer_policy=PeerPolicy(), alpn=())
    return ServerTLS(settings).context if server else ClientTLS(settings).context


def pump(a: SSL.Connection, b: SSL.Connection) -> bool:
    """Move pending ciphertext from a to b; True if anything moved."""
    try:
        data = a.bio_read(65536)
    except SSL.WantReadError:
        return False
    b.bio_write(data)
    return True


def handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Drive both ends over memory BIOs until both handshakes finish (or one raises)."""
    done = {id(client): False, id(server): False}
    for _ in range(50):
        for conn in (client, server):
            if not done[id(conn)]:
                try:
                    conn.do_handshake()
                    done[id(conn)] = True
                except SSL.WantReadError:
                    pass
        moved = pump(client, server) | pump(server, client)
        if all(done.values()) and not moved:
            return
    raise AssertionError("handshake did not complete")


class HandshakeTests(PKITestCase):
    def connect(
        self, client_m: TLSMaterial, server_m: TLSMaterial
    ) -> tuple[SSL.Connection, SSL.Connection]:
        client = SSL.Connection(tls_context(client_m, server=False), None)
        client.set_connect_state()
        server = SSL.Connection(tls_context(server_m, server=True), None)
        server.set_accept_state()
        handshake(client, server)
        return client, server

    def test_mutual_tls_sees_spiffe_ids(self) -> None:
        d = self.make_pki()
        client, server = self.connect(load_pki_dir(d / "client"), load_pki_dir(d / "server"))
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.3")
        server_cert = client.get_peer_certificate()
        client_cert = server.get_peer_certificate()
        assert server_cert is not None and client_cert is not None
        self.assertEqual(spiffe_id_of(server_cert), SpiffeId.parse(SERVER_ID))
        self.assertEqual(spiffe_id_of(client_cert), SpiffeId.parse(CLIENT_ID))
        # And application data flows.
        client.sendall(b"CONNECT")
        pump(client, server)
        self.assertEqual(server.recv(100), b"CONNECT")

    def test_dev_pki_handshake(self) -> None:
        dev = ensure_dev_pki(self.mktemp())
        client, server = self.connect(load_pki_dir(dev / "client"), load_pki_dir(dev / "server"))
        peer = server.get_peer_certificate()
        assert peer is not None
        self.assertEqual(str(spiffe_id_of(peer)), CLIENT_ID)

    def test_client_rejects_server_from_other_ca(self) -> None:
        d = self.make_pki()
        other = Path(self.mktemp())
        init_ca(other)
        issue(other, "server", spiffe=SERVER_ID)
        with self.assertRaises(SSL.Error) as cm:
            self.connect(load_pki_dir(d / "client"), load_pki_dir(other / "server"))
        self.assertIn("certificate verify failed", str(cm.exception))

    def test_server_rejects_client_from_other_ca(self) -> None:
        d = self.make_pki()
        other = Path(self.mktemp())
        init_ca(other)
        issue(other, "client", spiffe=CLIENT_ID)
        # The rogue client trusts our CA, so only the server's check can stop it.
        rogue = attrs.evolve(
            load_pki_dir(other / "client"),
            ca_path=d / "ca.pem",
            ca_certificates=[read_cert(d / "ca.pem")],
        )
        with self.assertRaises(SSL.Error):
            self.connect(rogue, load_pki_dir(d / "server"))
