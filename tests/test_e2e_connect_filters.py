"""
A CONNECT through the HCM's HTTP filters, in a real ``twistd hbone-server --config``:
Istio's ``connect_terminate`` (mTLS HTTP/2 CONNECT, set_filter_state storing the tunnel's
target and peer identity, shared with the internal listener the tunnel goes to), and a
third-party filter refusing a CONNECT or tagging its 200 (HTTP/1.1).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.faults_support import start_yaml_twistd
from tests.support import (
    CLIENT_ID,
    StreamClient,
    connect_tcp,
    e2e,
    exchange,
    pseudorandom,
    sha256,
    start_echo,
    start_twistd,
    wait_until,
)
from tests.test_e2e_hcm import HCM_TYPE, json_records
from tests.test_e2e_tunnel import E2ETestCase

TLS_TYPE = ("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "DownstreamTlsContext")
CONNECT_TERMINATE = """\
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
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {outer_log}
              log_format:
                json_format:
                  code: "%RESPONSE_CODE%"
                  target: "%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%"
                  peer: "%FILTER_STATE(io.istio.peer_principal:PLAIN)%"
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
              - object_key: envoy.filters.listener.original_dst.local_ip
                format_string: {{text_format_source: {{inline_string: "%REQ(:AUTHORITY)%"}}}}
                shared_with_upstream: ONCE
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
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: main_internal
          cluster: echo
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {inner_log}
              log_format:
                json_format:
                  target: "%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%"
                  peer: "%FILTER_STATE(io.istio.peer_principal:PLAIN)%"
                  up: "%BYTES_RECEIVED%"
  clusters:
  - name: main_internal
    load_assignment:
      cluster_name: main_internal
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{envoy_internal_address: {{server_listener_name: main_internal}}}}
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


class ConnectTerminateTests(E2ETestCase):
    @e2e
    async def test_filter_state_from_a_connect_reaches_the_internal_listener(self) -> None:
        """
        Istio's connect_terminate: an mTLS HTTP/2 CONNECT runs through set_filter_state,
        which stores %REQ(:AUTHORITY)% and %DOWNSTREAM_PEER_URI_SAN% shared ONCE; the tunnel
        goes to an internal listener whose access log reads both back.
        """
        echo = await start_echo(self)
        work = Path(self.mktemp()).resolve()
        work.mkdir()
        outer, inner = work / "outer.json", work / "inner.json"
        server = await start_yaml_twistd(self, "hbone-server", "connect_terminate",
                                         CONNECT_TERMINATE.format(
                                             hcm_type=HCM_TYPE, tls_type=TLS_TYPE,
                                             pki=self.pki.root, echo=echo.port,
                                             outer_log=outer, inner_log=inner))
        port = server.ports["connect_terminate"]
        # The target named in the CONNECT is only recorded: the route sends every tunnel to
        # main_internal, whose tcp_proxy goes to the echo server.
        client = await start_twistd(
            self, "hbone-client",
            ["--forward=127.0.0.1:0=10.9.8.7:8080", "--server", f"127.0.0.1:{port}",
             *self.pki.args("client")],
            name="hbone-client",
        )
        payload = pseudorandom(300_001, seed=31)
        c = await exchange(self.forward_port(client), payload)
        self.assert_echoed(c, payload, server, client)
        await wait_until(lambda: inner.exists() and outer.exists()
                         and inner.read_text().strip() and outer.read_text().strip(),
                         "both access log lines")
        self.assertEqual(json_records(inner), [
            {"target": "10.9.8.7:8080", "peer": CLIENT_ID, "up": len(payload)}])
        self.assertEqual(json_records(outer), [
            {"code": 200, "target": "10.9.8.7:8080", "peer": CLIENT_ID}])


TAG_TUNNEL = """\
static_resources:
  listeners:
  - name: tunnels
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: tunnels
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            virtual_hosts:
            - name: targets
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: echo
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
{http_filters}
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


class ThirdPartyFilterTests(E2ETestCase):
    def setUp(self) -> None:
        pass  # no PKI: plain-text HTTP/1.1 CONNECT

    async def start(self) -> tuple[Any, Any]:
        """docs/extensions.md's tag filter (a third-party dropin) before the router."""
        text = (Path(__file__).parent.parent / "docs" / "extensions.md").read_text()
        files = dict(re.findall(r"^`([\w/]+\.py)`[^\n]*:\n\n```python\n(.*?)^```", text,
                                re.MULTILINE | re.DOTALL))
        plugin_dir = Path(self.mktemp()).resolve()
        for name in ("mypkg/tag.py", "twisted/plugins/mypkg_tag.py"):
            (plugin_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (plugin_dir / name).write_text(files[name])
        [snippet] = re.findall(r"^```yaml\n(http_filters:\n.*?)^```", text,
                               re.MULTILINE | re.DOTALL)
        filters = "\n".join(" " * 10 + line for line in snippet.splitlines())
        echo = await start_echo(self)
        from tests.support import REPO_ROOT

        server = await start_yaml_twistd(
            self, "hbone-server", "tunnels",
            TAG_TUNNEL.format(hcm_type=HCM_TYPE, http_filters=filters, echo=echo.port),
            env={"PYTHONPATH": f"{plugin_dir}:{REPO_ROOT}"},
        )
        return server, echo

    @e2e
    async def test_a_filter_refuses_or_tags_a_connect(self) -> None:
        server, echo = await self.start()
        port = server.ports["tunnels"]
        # Refused by the filter: its local reply (through the encoders too), nothing upstream.
        denied = StreamClient()
        await connect_tcp(port, denied)
        await denied.send(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nx-deny: 1\r\n\r\n")
        await denied.done
        head, _, body = denied.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "), denied.data)
        self.assertIn(b"x-tag: blue", head.lower())
        self.assertEqual(body, b"denied by tag\n")
        self.assertEqual(echo.connections_made, 0)
        # Let through: the 200 carries the encoder's header, then the tunnel's bytes.
        payload = pseudorandom(200_003, seed=32)
        c = StreamClient()
        await connect_tcp(port, c)
        await c.send(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n" + payload)
        await wait_until(lambda: len(c.data) >= len(payload), "the echo")
        c.close_write()
        await c.done
        head, _, echoed = c.data.partition(b"\r\n\r\n")
        self.assertEqual(head.lower(), b"http/1.1 200 ok\r\nx-tag: blue")
        self.assertEqual(sha256(echoed), sha256(payload))
        self.assertEqual(echo.connections_made, 1)
