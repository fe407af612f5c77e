"""
x-forwarded-client-cert in a real ``twistd hbone-server --config``: an mTLS listener's
connection manager with forward_client_cert_details SANITIZE_SET (subject, uri, dns) and
APPEND_FORWARD, curl presenting a client certificate, a backend recording what it got.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.web import resource, server

from hbonex.tls import pki
from tests.faults_support import start_yaml_twistd
from tests.support import CLIENT_ID, SERVER_ID, e2e
from tests.test_e2e_configs import run_command
from tests.test_e2e_connect_filters import TLS_TYPE
from tests.test_e2e_hcm import HCM_TYPE
from tests.test_e2e_tunnel import E2ETestCase

CONFIG = """\
static_resources:
  listeners:
  - name: mtls
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {tls_type}
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {{filename: {pki}/server/cert.pem}}
              private_key: {{filename: {pki}/server/key.pem}}
            validation_context:
              trusted_ca: {{filename: {pki}/ca.pem}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: mtls
          forward_client_cert_details: {mode}
          set_current_client_cert_details: {{subject: true, uri: true, dns: true}}
          request_id_extension:
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig
              use_request_id_for_trace_sampling: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    connect_timeout: 2s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {backend}}}
"""


class Recorder(resource.Resource):
    """Answers 200, recording each request's XFCC headers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[bytes]] = []

    def render_GET(self, request: Any) -> bytes:
        self.seen.append(request.requestHeaders.getRawHeaders(b"x-forwarded-client-cert", []))
        return b"ok"


class XfccTests(E2ETestCase):
    timeout = 60

    async def proxy(self, mode: str) -> tuple[Recorder, int]:
        recorder = Recorder()
        port = reactor.listenTCP(0, server.Site(recorder),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        proc = await start_yaml_twistd(self, "hbone-server", "xfcc", CONFIG.format(
            tls_type=TLS_TYPE, hcm_type=HCM_TYPE, pki=self.pki.root, mode=mode,
            backend=port.getHost().port))
        return recorder, proc.ports["mtls"]

    async def curl(self, port: int, identity: str, *args: str) -> None:
        curl = shutil.which("curl")
        if curl is None:
            self.fail("curl is not installed (this test needs the curl command on PATH)")
        leaf = self.pki.root / identity
        out, err, code = await run_command(
            [curl, "-sS", "--max-time", "20", "-o", os.devnull, "-w", "%{http_code}",
             "--cacert", str(self.pki.ca), "--cert", str(leaf / pki.LEAF_CERT),
             "--key", str(leaf / pki.LEAF_KEY), *args, f"https://127.0.0.1:{port}/x"],
            self.pki.root, env=dict(os.environ))
        self.assertEqual((code, out), (0, "200"), err)

    def expected_element(self, identity: str) -> str:
        cert = x509.load_pem_x509_certificate(
            (self.pki.root / identity / pki.LEAF_CERT).read_bytes())
        digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
        subject = cert.subject.rfc4514_string()
        return (f'By={SERVER_ID};Hash={digest};Subject="{subject}";URI={CLIENT_ID};'
                f"DNS=client.example;DNS=alt.example")

    @e2e
    async def test_sanitize_set_replaces_with_this_connections_client(self) -> None:
        pki.issue(self.pki.root, "dnsclient", spiffe=CLIENT_ID,
                  dns=["client.example", "alt.example"])
        recorder, port = await self.proxy("SANITIZE_SET")
        await self.curl(port, "dnsclient", "--http1.1", "-H",
                        "x-forwarded-client-cert: By=spiffe://spoofed;Hash=00")
        await self.curl(port, "dnsclient", "--http2")
        element = self.expected_element("dnsclient").encode()
        self.assertEqual(recorder.seen, [[element], [element]])

    @e2e
    async def test_append_forward_appends_to_the_clients_header(self) -> None:
        pki.issue(self.pki.root, "dnsclient", spiffe=CLIENT_ID,
                  dns=["client.example", "alt.example"])
        recorder, port = await self.proxy("APPEND_FORWARD")
        await self.curl(port, "dnsclient", "-H",
                        "x-forwarded-client-cert: By=spiffe://upstream;Hash=00")
        self.assertEqual(recorder.seen, [[
            b"By=spiffe://upstream;Hash=00," + self.expected_element("dnsclient").encode()]])
