"""
RBAC in a real ``twistd hbone-server --config``: the HTTP filter behind a terminated mTLS
CONNECT (an internal listener's HCM allows one client identity and refuses another with 403,
at the same time), and the network filter in front of tcp_proxy (a refused identity's
connection is closed before the target ever sees a connection).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.web import resource, server

from tests.faults_support import start_yaml_twistd
from tests.support import (
    CLIENT_ID,
    IMPOSTOR_ID,
    RawTLSClient,
    StreamClient,
    connect_tcp,
    connect_tls,
    e2e,
    gather,
    pseudorandom,
    sha256,
    start_echo,
    start_twistd,
    wait_until,
)
from tests.test_e2e_connect_filters import TLS_TYPE
from tests.test_e2e_hcm import HCM_TYPE, Echo
from tests.test_e2e_tunnel import E2ETestCase

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"

TUNNEL_TO_HCM = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
static_resources:
  listeners:
  - name: connect_terminate
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {tls_type}
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
            - certificate_chain: {{filename: {pki}/server/cert.pem}}
              private_key: {{filename: {pki}/server/key.pem}}
            validation_context:
              trusted_ca: {{filename: {pki}/ca.pem}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: connect_terminate
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            virtual_hosts:
            - name: connect
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: main_internal
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.set_filter_state
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config
              on_request_headers:
              - object_key: io.istio.peer_principal
                factory_key: envoy.string
                format_string: {{text_format: "%DOWNSTREAM_PEER_URI_SAN%"}}
                shared_with_upstream: ONCE
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: main_internal
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: waypoint
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                json_format:
                  code: "%RESPONSE_CODE%"
                  details: "%RESPONSE_CODE_DETAILS%"
                  peer: "%DOWNSTREAM_PEER_URI_SAN%"
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": {rbac_type}
              rules:
                action: ALLOW
                policies:
                  client-only:
                    permissions: [{{url_path: {{path: {{prefix: /api/}}}}}}]
                    principals:
                    # Both the tunnel's peer certificate and Istio's filter state object.
                    - and_ids:
                        ids:
                        - authenticated: {{principal_name: {{exact: "{client_id}"}}}}
                        - filter_state:
                            key: io.istio.peer_principal
                            string_match: {{exact: "{client_id}"}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: main_internal
    load_assignment:
      cluster_name: main_internal
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{envoy_internal_address: {{server_listener_name: main_internal}}}}
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

L4_RBAC = """\
static_resources:
  listeners:
  - name: guarded
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {tls_type}
          require_client_certificate: true
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{filename: {pki}/server/cert.pem}}
              private_key: {{filename: {pki}/server/key.pem}}
            validation_context:
              trusted_ca: {{filename: {pki}/ca.pem}}
      filters:
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": {rbac_type}
          stat_prefix: guarded
          rules:
            action: ALLOW
            policies:
              client:
                permissions: [{{any: true}}]
                principals: [{{authenticated: {{principal_name: {{exact: "{client_id}"}}}}}}]
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: guarded
          cluster: echo
  clusters:
  - name: echo
    connect_timeout: 2s
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {echo}}}
"""


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def http_get(port: int, path: str) -> bytes:
    """One HTTP/1.1 GET through a forwarded port (the tunnel); the whole response."""
    c = StreamClient()
    await connect_tcp(port, c)
    await c.send(f"GET {path} HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n".encode())
    await c.done
    return c.data


class HttpRbacTests(E2ETestCase):
    timeout = 60

    @e2e
    async def test_one_identity_allowed_another_refused_at_once(self) -> None:
        root = resource.Resource()
        backend = Echo()
        root.putChild(b"api", backend)
        port = reactor.listenTCP(0, server.Site(root),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        work = Path(self.mktemp()).resolve()
        work.mkdir()
        log = work / "waypoint.json"
        hbone = await start_yaml_twistd(self, "hbone-server", "connect_terminate",
                                        TUNNEL_TO_HCM.format(
                                            tls_type=TLS_TYPE, hcm_type=HCM_TYPE,
                                            rbac_type=RBAC_TYPE, pki=self.pki.root, log=log,
                                            client_id=CLIENT_ID,
                                            backend=port.getHost().port))
        listen = hbone.ports["connect_terminate"]
        clients = [await start_twistd(
            self, "hbone-client",
            ["--forward=127.0.0.1:0=10.9.8.7:80", "--server", f"127.0.0.1:{listen}",
             *self.pki.args(identity)], name=f"hbone-client-{identity}")
            for identity in ("client", "impostor")]
        allowed, refused = await gather([
            http_get(self.forward_port(clients[0]), "/api/data?size=1001"),
            http_get(self.forward_port(clients[1]), "/api/data?size=1002"),
        ])
        head, _, body = allowed.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), allowed[:300])
        self.assertEqual(sha256(body), sha256(pseudorandom(1001, seed=1001)))
        head, _, body = refused.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "), refused[:300])
        self.assertEqual(body, b"RBAC: access denied")
        # Only the allowed request reached the backend.
        self.assertEqual(backend.seen, [(b"GET", b"/api/data?size=1001")])
        await wait_until(lambda: log.exists() and len(records(log)) == 2, "two log records")
        ok, denied = sorted(records(log), key=lambda r: r["code"])
        # The internal listener's connection carries the tunnel client's identity.
        self.assertEqual((ok["code"], ok["peer"]), (200, CLIENT_ID))
        self.assertEqual(denied, {"code": 403, "peer": IMPOSTOR_ID,
                                  "details": "rbac_access_denied_matched_policy[none]"})
        # The same client, outside the policy's paths: refused too.
        other = await http_get(self.forward_port(clients[0]), "/other")
        self.assertTrue(other.startswith(b"HTTP/1.1 403 "), other[:300])


class NetworkRbacTests(E2ETestCase):
    timeout = 60

    @e2e
    async def test_a_refused_identity_never_reaches_the_target(self) -> None:
        echo = await start_echo(self)
        hbone = await start_yaml_twistd(self, "hbone-server", "guarded", L4_RBAC.format(
            tls_type=TLS_TYPE, rbac_type=NETWORK_RBAC_TYPE, pki=self.pki.root,
            client_id=CLIENT_ID, echo=echo.port))
        port = hbone.ports["guarded"]

        def tls(identity: str) -> RawTLSClient:
            return RawTLSClient(self.pki.ca, self.pki.cert(identity), self.pki.key(identity),
                                alpn=())

        payload = pseudorandom(100_003, seed=41)
        refused = StreamClient()
        await connect_tls(port, tls("impostor"), refused)
        await refused.send(payload)
        await refused.done
        self.assertEqual(refused.nbytes, 0)
        self.assertEqual(echo.connections_made, 0)
        allowed = StreamClient()
        await connect_tls(port, tls("client"), allowed)
        await allowed.send(payload)
        await wait_until(lambda: allowed.nbytes >= len(payload), "the echo")
        allowed.close_write()
        await allowed.done
        self.assertEqual(allowed.hexdigest, sha256(payload))
        self.assertEqual(echo.connections_made, 1)
