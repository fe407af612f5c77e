"""
hbonex.tls.certwatch: certificate files reloaded when they change (flags' files and Envoy's file
SDS), bad files refused with one line, expiry gauges and warnings.  Driven by a fake clock.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import task
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from hbonex.config import load_bootstrap
from hbonex.errors import ConfigError
from hbonex.observability.stats import STATS
from hbonex.tls import pki
from hbonex.tls.certwatch import DAYS_UNTIL_FIRST_CERT_EXPIRING, CertificateWatcher
from hbonex.tls.context import PeerPolicy, ServerTLS, tls_settings_from_material
from tests.support import CLIENT_ID, SERVER_ID, make_pki

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
DOWNSTREAM = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)


class Harness:
    def __init__(self, test: unittest.TestCase, bootstrap: Any, warning_days: float = 7.0):
        self.clock = task.Clock()
        self.lines: list[str] = []
        self.watcher = CertificateWatcher(bootstrap, 1.0, warning_days, clock=self.clock)
        self.watcher.log = Logger(observer=lambda e: self.lines.append(formatEvent(e)))
        self.watcher.startService()
        test.addCleanup(self.watcher.stopService)

    def polls(self, n: int = 2) -> None:
        for _ in range(n):
            self.clock.advance(1.0)


def flags_bootstrap(material: Any) -> tuple[Any, ServerTLS]:
    tls = ServerTLS(tls_settings_from_material(material, peer_policy=PeerPolicy()))
    chain = SimpleNamespace(tls=tls)
    listener = SimpleNamespace(name="hbone", filter_chains=[chain], all_chains=[chain])
    return SimpleNamespace(listeners=[listener], clusters={}, reactor=None), tls


def serial(tls: ServerTLS) -> int:
    return tls.settings.certificate.serial_number


class FileRotationTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pki = make_pki(self)
        material = pki.load_pki_dir(self.pki.root / "server", self.pki.ca)
        bootstrap, self.tls = flags_bootstrap(material)
        self.harness = Harness(self, bootstrap)
        self.old = serial(self.tls)

    def test_reissue_is_used_for_new_handshakes(self) -> None:
        context = self.tls.context
        pki.issue(self.pki.root, "server", spiffe=SERVER_ID, ip=["127.0.0.1"], force=True)
        new = pki.load_pki_dir(self.pki.root / "server", self.pki.ca).certificate.serial_number
        self.harness.polls(1)
        self.assertEqual(serial(self.tls), self.old, "applied before the files settled")
        self.harness.polls(1)
        self.assertEqual(serial(self.tls), new)
        self.assertIsNot(self.tls.context, context)
        [line] = self.harness.lines
        self.assertIn(f"serial {new:x} (was {self.old:x})", line)
        self.assertIn("certificates reloaded (changed)", line)

    def refused(self, problem: str) -> None:
        context = self.tls.context
        self.harness.polls(2)
        self.assertEqual(serial(self.tls), self.old)
        self.assertIs(self.tls.context, context)
        [line] = self.harness.lines
        self.assertIn("certificate reload refused (changed): ", line)
        self.assertIn(problem, line)
        self.assertIn(f"still using serial {self.old:x}", line)
        self.harness.polls(3)
        self.assertEqual(len(self.harness.lines), 1, "the same bad file is reported once")

    def test_unparsable_certificate(self) -> None:
        self.pki.cert("server").write_text("garbage\n")
        self.refused(f"{self.pki.cert('server')}: not a PEM certificate")

    def test_key_mismatch(self) -> None:
        self.pki.key("server").write_bytes(self.pki.key("client").read_bytes())
        self.refused(f"{self.pki.key('server')}: private key does not match certificate")

    def test_expired(self) -> None:
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
        pki.issue(self.pki.root, "server", spiffe=SERVER_ID, days=2, force=True, now=past)
        self.refused(f"{self.pki.cert('server')}: certificate expired on")

    def test_other_identity(self) -> None:
        pki.issue(self.pki.root, "server", spiffe=CLIENT_ID, force=True)
        self.refused(f"identity {CLIENT_ID} is not the identity in use ({SERVER_ID})")

    def test_fixed_file_is_used_afterwards(self) -> None:
        self.pki.cert("server").write_text("garbage\n")
        self.harness.polls(2)
        pki.issue(self.pki.root, "server", spiffe=SERVER_ID, ip=["127.0.0.1"], force=True)
        self.harness.polls(2)
        self.assertNotEqual(serial(self.tls), self.old)
        self.assertIn("certificates reloaded", self.harness.lines[-1])

    def test_sighup_reloads_at_once(self) -> None:
        pki.issue(self.pki.root, "server", spiffe=SERVER_ID, ip=["127.0.0.1"], force=True)
        self.harness.watcher.reload_all("SIGHUP")
        self.assertNotEqual(serial(self.tls), self.old)
        self.assertIn("certificates reloaded (SIGHUP)", self.harness.lines[-1])

    def test_ca_bundle(self) -> None:
        bundle = self.pki.ca.read_bytes() + self.pki.other_ca.read_bytes()
        pki._write_atomic(self.pki.ca, bundle, 0o644)
        self.harness.polls(2)
        self.assertEqual(len(self.tls.settings.ca_certificates), 2)
        self.assertIn("trust bundle of 2 CA(s)", self.harness.lines[-1])


class ExpiryTests(unittest.TestCase):
    def test_gauges_and_one_warning(self) -> None:
        p = make_pki(self)
        material = pki.load_pki_dir(p.root / "server", p.ca)
        bootstrap, tls = flags_bootstrap(material)
        harness = Harness(self, bootstrap, warning_days=400)
        days = (pki.not_after(tls.settings.certificate)
                - datetime.datetime.now(datetime.timezone.utc)).days
        self.assertEqual(STATS.gauge(DAYS_UNTIL_FIRST_CERT_EXPIRING).value, days)
        self.assertEqual(
            STATS.gauge("listener.hbone.ssl.certificate.default.expiration_unix_time_seconds")
            .value, int(pki.not_after(tls.settings.certificate).timestamp()))
        warnings = [line for line in harness.lines if "expires in" in line]
        self.assertIn(f"certificate serial {serial(tls):x}", warnings[0])
        self.assertIn("of listener hbone expires in 36", warnings[0])
        self.assertIn("(warning at 400 days)", warnings[0])
        harness.polls(3)
        self.assertEqual(len([line for line in harness.lines if "expires in" in line]),
                         len(warnings), "each certificate is warned about once")

    def test_no_warning_far_from_expiry(self) -> None:
        p = make_pki(self)
        bootstrap, _ = flags_bootstrap(pki.load_pki_dir(p.root / "server", p.ca))
        harness = Harness(self, bootstrap)
        self.assertEqual([line for line in harness.lines if "expires in" in line], [])


def sds_file(path: Path, name: str, body: dict[str, Any]) -> None:
    data = json.dumps({"resources": [{"@type": SECRET, "name": name, **body}]})
    pki._write_atomic(path, data.encode(), 0o644)


def tls_secret(p: Any, name: str = "server") -> dict[str, Any]:
    return {"tls_certificate": {"certificate_chain": {"filename": str(p.cert(name))},
                                "private_key": {"filename": str(p.key(name))}}}


class SdsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pki = make_pki(self)
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.cert_sds = self.dir / "cert.yaml"
        self.ca_sds = self.dir / "ca.yaml"
        sds_file(self.cert_sds, "server_cert", tls_secret(self.pki))
        sds_file(self.ca_sds, "trust", {"validation_context": {
            "trusted_ca": {"filename": str(self.pki.ca)}}})

    def config(self) -> str:
        return f"""
static_resources:
  listeners:
  - name: hbone
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {DOWNSTREAM}
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: server_cert
              sds_config: {{path_config_source: {{path: {self.cert_sds}}}}}
            validation_context_sds_secret_config:
              name: trust
              sds_config: {{path_config_source: {{path: {self.ca_sds}}}}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: backend
  clusters:
  - name: backend
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}
"""

    def test_loads_and_reloads(self) -> None:
        bootstrap = load_bootstrap(self.config(), task.Clock())
        tls = bootstrap.listeners[0].filter_chains[0].tls
        old = tls.settings.certificate.serial_number
        self.assertEqual(tls.settings.certificate, self.pki_cert("server"))
        harness = Harness(self, bootstrap)
        # The files the secret names are watched too.
        pki.issue(self.pki.root, "server", spiffe=SERVER_ID, ip=["127.0.0.1"], force=True)
        harness.polls(2)
        self.assertNotEqual(tls.settings.certificate.serial_number, old)
        self.assertEqual(tls.settings.certificate, self.pki_cert("server"))
        self.assertIn(f"from {self.cert_sds}, {self.ca_sds}", harness.lines[-1])
        self.assertEqual(
            STATS.gauge("listener.hbone.ssl.certificate.server_cert."
                        "expiration_unix_time_seconds").value,
            int(pki.not_after(tls.settings.certificate).timestamp()))
        # A new SDS file naming other files.
        sds_file(self.ca_sds, "trust", {"validation_context": {
            "trusted_ca": {"filename": str(self.pki.both_cas)}}})
        harness.polls(2)
        self.assertEqual(len(tls.settings.ca_certificates), 2)

    def test_combined_validation_context(self) -> None:
        """
        Istio's shape: SAN matchers in default_validation_context, the trust bundle from
        the SDS secret (Envoy merges the two); the matchers are enforced.
        """
        from hbonex.tls.context import ServerTLS

        text = self.config().replace("""\
            validation_context_sds_secret_config:
              name: trust""", """\
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names:
                - san_type: URI
                  matcher: {prefix: "spiffe://cluster.local/ns/default/"}
              validation_context_sds_secret_config:
                name: trust""").replace(
            f"              sds_config: {{path_config_source: {{path: {self.ca_sds}}}}}",
            f"                sds_config: {{path_config_source: {{path: {self.ca_sds}}}}}")
        self.assertIn("combined_validation_context", text)
        bootstrap = load_bootstrap(text, task.Clock())
        tls = bootstrap.listeners[0].filter_chains[0].tls
        assert isinstance(tls, ServerTLS)
        self.assertEqual(len(tls.settings.ca_certificates), 1)  # from the secret
        [matcher] = tls.settings.peer_policy.san_matchers  # from the default context
        self.assertEqual((matcher.kind, matcher.value),
                         ("prefix", "spiffe://cluster.local/ns/default/"))
        # A new trust bundle from the secret keeps the default context's matchers.
        harness = Harness(self, bootstrap)
        sds_file(self.ca_sds, "trust", {"validation_context": {
            "trusted_ca": {"filename": str(self.pki.both_cas)}}})
        harness.polls(2)
        self.assertEqual(len(tls.settings.ca_certificates), 2)
        self.assertEqual(tls.settings.peer_policy.san_matchers, (matcher,))

    def pki_cert(self, name: str) -> Any:
        return pki._parse_certs(self.pki.cert(name), self.pki.cert(name).read_bytes())[0]

    def test_bad_sds_file_refused(self) -> None:
        bootstrap = load_bootstrap(self.config(), task.Clock())
        tls = bootstrap.listeners[0].filter_chains[0].tls
        old = tls.settings.certificate.serial_number
        harness = Harness(self, bootstrap)
        pki._write_atomic(self.cert_sds, b"resources: [", 0o644)
        harness.polls(2)
        self.assertEqual(tls.settings.certificate.serial_number, old)
        self.assertIn(f"refused (changed): {self.cert_sds}: not YAML or JSON", harness.lines[-1])
        sds_file(self.cert_sds, "other", tls_secret(self.pki))
        harness.polls(2)
        self.assertIn(f"{self.cert_sds}: no secret named 'server_cert' (found: 'other')",
                      harness.lines[-1])

    def test_bad_sds_file_at_load(self) -> None:
        sds_file(self.cert_sds, "server_cert", {"tls_certificate": {
            "certificate_chain": {"filename": str(self.pki.cert("server"))},
            "private_key": {"filename": str(self.pki.key("client"))}}})
        error = self.assertRaises(ConfigError, load_bootstrap, self.config(), task.Clock())
        self.assertIn("tls_certificate_sds_secret_configs[0]", str(error))
        self.assertIn("private key does not match", str(error))

    def test_xds_sources_refused(self) -> None:
        config = self.config().replace(
            f"sds_config: {{path_config_source: {{path: {self.cert_sds}}}}}",
            "sds_config: {ads: {}}")
        error = self.assertRaises(ConfigError, load_bootstrap, config, task.Clock())
        self.assertIn("no xDS server: use path_config_source", str(error))


class RenewTests(unittest.TestCase):
    def test_renew_keeps_the_sans(self) -> None:
        from hbonex.cli.main import main

        p = make_pki(self)
        old = pki.load_pki_dir(p.root / "server", p.ca).certificate
        self.assertEqual(main(["pki", "renew", str(p.root), "server"]), 0)
        new = pki.load_pki_dir(p.root / "server", p.ca).certificate
        self.assertNotEqual(new.serial_number, old.serial_number)
        self.assertNotEqual(pki._public_der(new), pki._public_der(old))
        self.assertEqual(pki.certificate_san_values(new), pki.certificate_san_values(old))
        self.assertEqual(pki.certificate_san_values(new)["IP_ADDRESS"], ["127.0.0.1"])
        self.assertEqual((pki.not_after(new) - pki.not_after(old)).days, 0)
