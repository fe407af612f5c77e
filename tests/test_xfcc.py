"""
x-forwarded-client-cert as Envoy's connection manager writes it (hbonex.http.xfcc), and its
configuration (forward_client_cert_details, set_current_client_cert_details).
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from hbonex.config.loader import load_config
from hbonex.errors import ConfigError
from hbonex.http.connection_manager import HttpOptions, StandardHeaders
from hbonex.http.filter_manager import FilterHeadersStatus
from hbonex.http.headers import Headers
from hbonex.http.xfcc import ClientCertDetails, ForwardClientCert, XfccPolicy
from hbonex.tls.facts import TlsFacts, url_encode

XFCC = b"x-forwarded-client-cert"
UUID = "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
WAYPOINT = "spiffe://cluster.local/ns/default/sa/waypoint"

_KEY = ec.generate_private_key(ec.SECP256R1())


def make_cert(common_name: str = "client", uris: tuple[str, ...] = (CLIENT,),
              dns: tuple[str, ...] = (), org: str = "") -> x509.Certificate:
    attrs_ = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    if org:
        attrs_.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(attrs_)
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(_KEY.public_key()).serial_number(7)
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_KEY, hashes.SHA256())


def _hash(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


PEER = make_cert(dns=("a.example", "b.example"), org="Acme, Inc")
LOCAL = make_cert("waypoint", uris=(WAYPOINT,))
HASH = hashlib.sha256(PEER.public_bytes(Encoding.DER)).hexdigest()
SUBJECT = "CN=client,O=Acme\\, Inc"


def facts(peer: Any = PEER, local: Any = LOCAL, chain: Any = None) -> TlsFacts:
    return TlsFacts(lambda: peer, local, lambda: chain)


def apply(mode: ForwardClientCert, ssl: TlsFacts | None, headers: Headers | None = None,
          **details: bool) -> list[bytes]:
    h = headers if headers is not None else Headers([(b":method", b"GET")])
    XfccPolicy(mode, ClientCertDetails(**details)).apply(h, ssl)
    return h.get_all(XFCC)


class ModeTests(unittest.TestCase):
    """Each forward_client_cert_details mode, with and without mTLS and a client's header."""

    def with_xfcc(self) -> Headers:
        return Headers([(b":method", b"GET"), (XFCC, b"By=spiffe://x;Hash=00")])

    def test_sanitize_removes_even_over_mtls(self) -> None:
        self.assertEqual(apply(ForwardClientCert.SANITIZE, facts(), self.with_xfcc()), [])

    def test_forward_only_keeps_over_mtls_removes_without(self) -> None:
        self.assertEqual(apply(ForwardClientCert.FORWARD_ONLY, facts(), self.with_xfcc()),
                         [b"By=spiffe://x;Hash=00"])
        self.assertEqual(apply(ForwardClientCert.FORWARD_ONLY, None, self.with_xfcc()), [])

    def test_always_forward_only_keeps_without_tls(self) -> None:
        self.assertEqual(apply(ForwardClientCert.ALWAYS_FORWARD_ONLY, None, self.with_xfcc()),
                         [b"By=spiffe://x;Hash=00"])

    def test_append_forward_appends_with_comma(self) -> None:
        self.assertEqual(apply(ForwardClientCert.APPEND_FORWARD, facts(), self.with_xfcc()),
                         [f"By=spiffe://x;Hash=00,By={WAYPOINT};Hash={HASH}".encode()])

    def test_append_forward_joins_several_headers(self) -> None:
        h = Headers([(XFCC, b"By=a"), (XFCC, b"By=b")])
        self.assertEqual(apply(ForwardClientCert.APPEND_FORWARD, facts(), h),
                         [f"By=a,By=b,By={WAYPOINT};Hash={HASH}".encode()])

    def test_append_forward_without_a_header_sets_it(self) -> None:
        self.assertEqual(apply(ForwardClientCert.APPEND_FORWARD, facts()),
                         [f"By={WAYPOINT};Hash={HASH}".encode()])

    def test_sanitize_set_replaces(self) -> None:
        self.assertEqual(apply(ForwardClientCert.SANITIZE_SET, facts(), self.with_xfcc()),
                         [f"By={WAYPOINT};Hash={HASH}".encode()])

    def test_set_modes_without_mtls_remove(self) -> None:
        for mode in (ForwardClientCert.APPEND_FORWARD, ForwardClientCert.SANITIZE_SET):
            self.assertEqual(apply(mode, None, self.with_xfcc()), [], mode)
            # TLS without a client certificate is not mutual TLS either.
            self.assertEqual(apply(mode, facts(peer=None), self.with_xfcc()), [], mode)


class DetailTests(unittest.TestCase):
    """set_current_client_cert_details: each field, Envoy's order and quoting."""

    def element(self, ssl: TlsFacts | None = None, **details: bool) -> str:
        (value,) = apply(ForwardClientCert.SANITIZE_SET, ssl or facts(), **details)
        return value.decode()

    def test_subject_is_quoted_unescaped(self) -> None:
        self.assertEqual(self.element(subject=True),
                         f'By={WAYPOINT};Hash={HASH};Subject="{SUBJECT}"')

    def test_empty_subject_is_still_present(self) -> None:
        # Envoy keeps the key with an empty value.
        anonymous = make_cert(common_name="")
        self.assertEqual(self.element(facts(peer=anonymous), subject=True),
                         f'By={WAYPOINT};Hash={_hash(anonymous)};Subject=""')

    def test_uri_every_san_and_empty(self) -> None:
        two = make_cert(uris=(CLIENT, "spiffe://cluster.local/ns/x/sa/y"))
        self.assertEqual(self.element(facts(peer=two), uri=True).split(";")[2:],
                         [f"URI={CLIENT}", "URI=spiffe://cluster.local/ns/x/sa/y"])
        self.assertEqual(self.element(facts(peer=make_cert(uris=())), uri=True).split(";")[2:],
                         ["URI="])

    def test_dns_each_san_none_when_absent(self) -> None:
        self.assertEqual(self.element(dns=True).split(";")[2:],
                         ["DNS=a.example", "DNS=b.example"])
        self.assertEqual(self.element(facts(peer=make_cert()), dns=True).count("DNS="), 0)

    def test_cert_is_url_encoded_pem(self) -> None:
        pem = PEER.public_bytes(Encoding.PEM).decode()
        value = self.element(cert=True)
        self.assertEqual(value.split(";")[2], f'Cert="{url_encode(pem)}"')
        self.assertTrue(value.split(";")[2].startswith('Cert="-----BEGIN%20CERTIFICATE-----%0A'))
        for raw in "+/=\n ":
            self.assertNotIn(raw, value.split(";")[2][len('Cert="'):])

    def test_chain_starts_with_the_peer(self) -> None:
        issuer = make_cert("issuer", uris=())
        value = self.element(facts(chain=[PEER, issuer]), chain=True)
        both = PEER.public_bytes(Encoding.PEM) + issuer.public_bytes(Encoding.PEM)
        self.assertEqual(value.split(";")[2], f'Chain="{url_encode(both.decode())}"')
        # A server's view of a client's chain leaves out the client's own certificate.
        self.assertEqual(self.element(facts(chain=[issuer]), chain=True), value)

    def test_all_fields_in_envoys_order(self) -> None:
        value = self.element(subject=True, cert=True, chain=True, dns=True, uri=True)
        keys = [part.split("=", 1)[0] for part in value.split(";")]
        self.assertEqual(keys, ["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS", "DNS"])

    def test_no_local_uri_no_by(self) -> None:
        self.assertEqual(self.element(facts(local=make_cert(uris=()))), f"Hash={HASH}")

    def test_url_encode(self) -> None:
        self.assertEqual(url_encode("a-b_c.d~e f+/=\n\""), "a-b_c.d~e%20f%2B%2F%3D%0A%22")


class FactsTests(unittest.TestCase):
    def test_computed_once_when_asked(self) -> None:
        calls: list[int] = []

        def peer() -> x509.Certificate:
            calls.append(1)
            return PEER

        ssl = TlsFacts(peer, LOCAL)
        self.assertEqual(calls, [])
        self.assertEqual(ssl.sha256_peer_digest(), HASH)
        self.assertEqual(ssl.uri_sans_peer(), [CLIENT])
        self.assertEqual(calls, [1])


class _Info:
    remoteAddress = "127.0.0.1:5000"
    ssl: Any = None


class _Decoder:
    def route(self) -> None:
        return None


class StandardHeadersTests(unittest.TestCase):
    """The connection manager's request handling writes XFCC from the connection's facts."""

    def run_headers(self, options: HttpOptions, ssl: TlsFacts | None,
                    method: bytes = b"GET") -> Headers:
        info = _Info()
        info.ssl = ssl
        filt = StandardHeaders(info, options)
        filt.setDecoderFilterCallbacks(_Decoder())
        headers = Headers([(b":method", method), (b":path", b"/"), (b":scheme", b"http"),
                           (XFCC, b"By=spoofed")])
        self.assertIs(filt.decodeHeaders(headers, True), FilterHeadersStatus.Continue)
        return headers

    def test_default_sanitizes(self) -> None:
        self.assertEqual(self.run_headers(HttpOptions(), facts()).get_all(XFCC), [])

    def test_sanitize_set(self) -> None:
        options = HttpOptions(xfcc=XfccPolicy(ForwardClientCert.SANITIZE_SET,
                                              ClientCertDetails(uri=True)))
        self.assertEqual(self.run_headers(options, facts()).get_all(XFCC),
                         [f"By={WAYPOINT};Hash={HASH};URI={CLIENT}".encode()])

    def test_internal_connection_has_no_tls(self) -> None:
        options = HttpOptions(xfcc=XfccPolicy(ForwardClientCert.APPEND_FORWARD))
        self.assertEqual(self.run_headers(options, None).get_all(XFCC), [])


class ConfigTests(unittest.TestCase):
    """The HttpConnectionManager fields, parsed into the connection manager's options."""

    def load(self, extra: str) -> Any:
        from tests.test_config import config_text

        text = config_text("seed-terminate-h2-connect.yaml").replace(
            "          codec_type: AUTO\n", "          codec_type: AUTO\n" + extra)
        return load_config(text, MemoryReactorClock())

    def options(self, extra: str) -> HttpOptions:
        [listener] = self.load(extra).listeners
        return listener.chains[0].filters[0].parsed.http_options  # type: ignore[no-any-return]

    def test_default_is_sanitize_without_details(self) -> None:
        self.assertEqual(self.options("").xfcc, XfccPolicy())

    def test_modes_and_details(self) -> None:
        for mode in ForwardClientCert:
            self.assertEqual(self.options(
                f"          forward_client_cert_details: {mode.value}\n").xfcc.mode, mode)
        options = self.options(
            "          forward_client_cert_details: APPEND_FORWARD\n"
            "          set_current_client_cert_details: {subject: true, uri: true, dns: true,"
            " cert: true, chain: true}\n")
        self.assertEqual(options.xfcc, XfccPolicy(ForwardClientCert.APPEND_FORWARD,
                                                  ClientCertDetails(True, True, True, True,
                                                                    True)))

    def test_uuid_request_id_extension_warns_about_tracing(self) -> None:
        loaded = self.load(
            "          request_id_extension:\n            typed_config:\n"
            '              "@type": ' + UUID + "\n"
            "              pack_trace_reason: false\n"
            "              use_request_id_for_trace_sampling: true\n")
        messages = " ".join(message for _, message in loaded.warnings)
        self.assertIn("pack_trace_reason has no effect in hbonex (no tracing)", messages)
        self.assertIn("use_request_id_for_trace_sampling has no effect in hbonex (no tracing)",
                      messages)

    def test_other_request_id_extension_is_refused(self) -> None:
        error = self.assertRaises(ConfigError, self.load, (
            "          request_id_extension:\n            typed_config:\n"
            '              "@type": type.googleapis.com/google.protobuf.Empty\n'))
        self.assertIn("request_id_extension.typed_config: request ID extension "
                      "type.googleapis.com/google.protobuf.Empty is not supported; use "
                      + UUID, str(error))
