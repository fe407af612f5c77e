"""Tests for hbonex.tls.spiffe."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.trial import unittest

from hbonex.tls.spiffe import IdentityMatcher, SpiffeId, SpiffeIdError, spiffe_id_of, uri_sans


def make_cert(sans: list[x509.GeneralName] | None) -> x509.Certificate:
    """A throwaway self-signed certificate carrying exactly the given SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


class ParseTests(unittest.TestCase):
    def test_workload_id(self) -> None:
        sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/client")
        self.assertEqual(sid.trust_domain, "cluster.local")
        self.assertEqual(sid.path, "/ns/default/sa/client")
        self.assertEqual(sid.namespace, "default")
        self.assertEqual(sid.service_account, "client")
        self.assertEqual(str(sid), "spiffe://cluster.local/ns/default/sa/client")

    def test_trust_domain_only(self) -> None:
        sid = SpiffeId.parse("spiffe://example.org")
        self.assertEqual(sid, SpiffeId("example.org", ""))
        self.assertEqual(str(sid), "spiffe://example.org")
        self.assertIsNone(sid.namespace)

    def test_non_istio_path(self) -> None:
        sid = SpiffeId.parse("spiffe://td-1_x.example/a/B.c/d-e_f")
        self.assertEqual(sid.path, "/a/B.c/d-e_f")
        self.assertIsNone(sid.namespace)
        self.assertIsNone(sid.service_account)
        # Looks Istio-ish but has an extra segment: not a workload identity.
        extra = SpiffeId.parse("spiffe://td/ns/a/sa/b/c")
        self.assertIsNone(extra.namespace)
        self.assertIsNone(extra.service_account)

    def test_round_trip_and_equality(self) -> None:
        text = "spiffe://cluster.local/ns/x/sa/y"
        self.assertEqual(SpiffeId.parse(text), SpiffeId.parse(str(SpiffeId.parse(text))))
        self.assertEqual(len({SpiffeId.parse(text), SpiffeId.parse(text)}), 1)

    def test_for_workload(self) -> None:
        sid = SpiffeId.for_workload("cluster.local", "prod", "web")
        self.assertEqual(str(sid), "spiffe://cluster.local/ns/prod/sa/web")
        self.assertRaises(SpiffeIdError, SpiffeId.for_workload, "cluster.local", "a/b", "web")
        self.assertRaises(SpiffeIdError, SpiffeId.for_workload, "cluster.local", "", "web")

    def test_invalid(self) -> None:
        cases = {
            "": "empty",
            "http://cluster.local/ns/a": "scheme must be 'spiffe'",
            "SPIFFE://cluster.local/ns/a": "lowercase",
            "cluster.local/ns/a": "must start with 'spiffe://'",
            "spiffe://": "trust domain is missing",
            "spiffe:///ns/a": "trust domain is missing",
            "spiffe://Cluster.local/ns/a": "trust domain contains 'C'",
            "spiffe://user@cluster.local/ns/a": "userinfo",
            "spiffe://cluster.local:8443/ns/a": "port",
            "spiffe://cluster.local/ns/a?x=1": "query",
            "spiffe://cluster.local/ns/a#frag": "fragment",
            "spiffe://cluster.local/": "cannot be '/'",
            "spiffe://cluster.local/ns/a/": "trailing slash",
            "spiffe://cluster.local/ns//a": "empty segments",
            "spiffe://cluster.local/ns/./a": "dot segments ('.')",
            "spiffe://cluster.local/ns/../a": "dot segments ('..')",
            "spiffe://cluster.local/ns/a%20b": "contains '%'",
            "spiffe://cluster.local/ns/a b": "contains ' '",
            "spiffe://" + "a" * 256: "longer than 255",
            "spiffe://td/" + "a" * 2100: "longer than 2048 bytes",
        }
        for uri, fragment in cases.items():
            with self.assertRaises(SpiffeIdError, msg=uri) as cm:
                SpiffeId.parse(uri)
            self.assertIn(fragment, str(cm.exception), uri)
        # SpiffeIdError is a ValueError, so generic callers can catch it.
        self.assertTrue(issubclass(SpiffeIdError, ValueError))

    def test_error_names_the_input(self) -> None:
        with self.assertRaises(SpiffeIdError) as cm:
            SpiffeId.parse("spiffe://cluster.local/ns/a/")
        self.assertIn("'spiffe://cluster.local/ns/a/'", str(cm.exception))

    def test_not_a_string(self) -> None:
        self.assertRaises(SpiffeIdError, SpiffeId.parse, b"spiffe://td/x")


class CertificateTests(unittest.TestCase):
    def test_uri_sans_cryptography_and_openssl(self) -> None:
        cert = make_cert(
            [
                x509.DNSName("localhost"),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b"),
                x509.UniformResourceIdentifier("https://example.org/"),
            ]
        )
        expected = ["spiffe://cluster.local/ns/a/sa/b", "https://example.org/"]
        self.assertEqual(uri_sans(cert), expected)
        self.assertEqual(uri_sans(crypto.X509.from_cryptography(cert)), expected)

    def test_uri_sans_none(self) -> None:
        self.assertEqual(uri_sans(make_cert(None)), [])
        self.assertEqual(uri_sans(make_cert([x509.DNSName("x.example")])), [])

    def test_uri_sans_rejects_other_types(self) -> None:
        self.assertRaises(TypeError, uri_sans, "not a cert")

    def test_spiffe_id_of(self) -> None:
        cert = make_cert(
            [
                x509.UniformResourceIdentifier("https://example.org/"),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b"),
            ]
        )
        self.assertEqual(spiffe_id_of(cert), SpiffeId("cluster.local", "/ns/a/sa/b"))
        self.assertEqual(
            spiffe_id_of(crypto.X509.from_cryptography(cert)),
            SpiffeId("cluster.local", "/ns/a/sa/b"),
        )

    def test_spiffe_id_of_none(self) -> None:
        self.assertIsNone(spiffe_id_of(make_cert(None)))
        cert = make_cert([x509.UniformResourceIdentifier("https://example.org/")])
        self.assertIsNone(spiffe_id_of(cert))

    def test_spiffe_id_of_several(self) -> None:
        cert = make_cert(
            [
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b"),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/admin"),
            ]
        )
        with self.assertRaises(SpiffeIdError) as cm:
            spiffe_id_of(cert)
        self.assertIn("2 SPIFFE URI SANs", str(cm.exception))

    def test_spiffe_id_of_malformed(self) -> None:
        cert = make_cert([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/../sa/b")])
        with self.assertRaises(SpiffeIdError) as cm:
            spiffe_id_of(cert)
        self.assertIn("dot segments", str(cm.exception))
        # An upper-case scheme is still a SPIFFE URI, just a malformed one: not silently ignored.
        upper = make_cert([x509.UniformResourceIdentifier("SPIFFE://cluster.local/ns/a")])
        self.assertRaises(SpiffeIdError, spiffe_id_of, upper)


class MatcherTests(unittest.TestCase):
    client = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/client")

    def test_exact(self) -> None:
        m = IdentityMatcher(["spiffe://cluster.local/ns/default/sa/client"])
        self.assertTrue(m.matches(self.client))
        self.assertTrue(m.matches("spiffe://cluster.local/ns/default/sa/client"))
        self.assertFalse(m.matches("spiffe://cluster.local/ns/default/sa/client2"))
        self.assertFalse(m.matches("spiffe://cluster.local/ns/default/sa"))
        self.assertFalse(m.matches("spiffe://other.local/ns/default/sa/client"))

    def test_trust_domain(self) -> None:
        for pattern in ("spiffe://cluster.local", "spiffe://cluster.local/"):
            m = IdentityMatcher([pattern])
            self.assertTrue(m.matches(self.client), pattern)
            self.assertTrue(m.matches("spiffe://cluster.local"), pattern)
            self.assertFalse(m.matches("spiffe://cluster.local.evil/ns/default/sa/client"))
            self.assertFalse(m.matches("spiffe://other/ns/default/sa/client"), pattern)
        td = IdentityMatcher.trust_domain("cluster.local")
        self.assertTrue(td.matches(self.client))
        self.assertFalse(td.matches("spiffe://example.org/x"))
        self.assertEqual(str(td), "spiffe://cluster.local")

    def test_glob(self) -> None:
        m = IdentityMatcher(["spiffe://cluster.local/ns/*/sa/client"])
        self.assertTrue(m.matches(self.client))
        self.assertTrue(m.matches("spiffe://cluster.local/ns/prod/sa/client"))
        self.assertFalse(m.matches("spiffe://cluster.local/ns/prod/sa/server"))
        self.assertFalse(m.matches("spiffe://other/ns/prod/sa/client"))
        # '*' stays within one path segment.
        self.assertFalse(m.matches("spiffe://cluster.local/ns/a/sa/x/ns/b/sa/client"))
        # Matching is case-sensitive (SPIFFE paths are).
        self.assertFalse(m.matches("spiffe://cluster.local/ns/prod/sa/CLIENT"))

    def test_glob_prefix_and_trust_domain(self) -> None:
        m = IdentityMatcher(["spiffe://cluster.local/ns/team-*/sa/*"])
        self.assertTrue(m.matches("spiffe://cluster.local/ns/team-a/sa/web"))
        self.assertFalse(m.matches("spiffe://cluster.local/ns/infra/sa/web"))
        anytd = IdentityMatcher(["spiffe://*/ns/default/sa/client"])
        self.assertTrue(anytd.matches("spiffe://example.org/ns/default/sa/client"))
        self.assertFalse(anytd.matches("spiffe://example.org/ns/other/sa/client"))

    def test_several_patterns(self) -> None:
        m = IdentityMatcher(["spiffe://a.local/ns/x/sa/y", "spiffe://b.local"])
        self.assertTrue(m.matches("spiffe://a.local/ns/x/sa/y"))
        self.assertTrue(m.matches("spiffe://b.local/anything"))
        self.assertFalse(m.matches("spiffe://a.local/ns/x/sa/z"))
        self.assertEqual(str(m), "spiffe://a.local/ns/x/sa/y, spiffe://b.local")
        self.assertIn("b.local", repr(m))

    def test_empty_matches_nothing(self) -> None:
        m = IdentityMatcher([])
        self.assertFalse(m.matches(self.client))
        self.assertEqual(str(m), "<no identity>")

    def test_malformed_peer_does_not_match(self) -> None:
        m = IdentityMatcher(["spiffe://cluster.local"])
        self.assertFalse(m.matches("spiffe://cluster.local/ns/../x"))
        self.assertFalse(m.matches("not a uri"))

    def test_invalid_patterns(self) -> None:
        for pattern in (
            "cluster.local",
            "spiffe://Cluster.local",
            "spiffe://cluster.local/ns//sa/*",
            "https://cluster.local/ns/*",
            "spiffe://cluster.local/ns/a/",
        ):
            self.assertRaises(SpiffeIdError, IdentityMatcher, [pattern])

    def test_equality(self) -> None:
        self.assertEqual(IdentityMatcher(["spiffe://a"]), IdentityMatcher(["spiffe://a"]))
        self.assertNotEqual(IdentityMatcher(["spiffe://a"]), IdentityMatcher(["spiffe://b"]))
