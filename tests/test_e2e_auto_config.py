"""
Upstream ``auto_config`` end to end in a real ``twistd hbone-server --config``: the router's
requests to a TLS backend offering h2 go as HTTP/2 streams, to one offering only http/1.1 as
HTTP/1.1; the backends (TLS listeners of the same process, over real sockets) log the
protocol that carried each request.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults_support import start_yaml_twistd
from tests.support import exchange, make_pki, unused_port, wait_until
from tests.test_e2e_hcm import HCM_TYPE, json_records
from tests.test_e2e_tunnel import E2ETestCase

ROUTER = """\
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
BACKEND = """\
  - name: backend_{name}
    address:
      socket_address: {{address: 127.0.0.1, port_value: {port}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": """ + TLS_TYPE + """.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: {alpn}
            tls_certificates:
            - certificate_chain: {{filename: {cert}}}
              private_key: {{filename: {key}}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": """ + HCM_TYPE + """
          stat_prefix: backend_{name}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                json_format:
                  path: "%REQ(:PATH)%"
                  protocol: "%PROTOCOL%"
                  connection: "%CONNECTION_ID%"
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                direct_response: {{status: 200, body: {{inline_string: "from {name}"}}}}
""" + ROUTER
CLUSTER = """\
  - name: auto_{name}
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        auto_config: {{}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": """ + TLS_TYPE + """.UpstreamTlsContext
        common_tls_context:
          tls_certificates:
          - certificate_chain: {{filename: {cert}}}
            private_key: {{filename: {key}}}
          validation_context:
            trusted_ca: {{filename: {ca}}}
    load_assignment:
      cluster_name: auto_{name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {port}}}
"""
FRONT = """\
static_resources:
  listeners:
  - name: front
    address:
      socket_address: {address: 127.0.0.1, port_value: 0}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": """ + HCM_TYPE + """
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /h2}
                route: {cluster: auto_h2}
              - match: {prefix: /h1}
                route: {cluster: auto_h1}
""" + ROUTER


class AutoConfigTests(E2ETestCase):
    async def test_alpn_chooses_the_upstream_protocol(self) -> None:
        """
        Three requests to each backend through auto_config clusters: the backend offering h2
        serves them as HTTP/2 on one connection, the http/1.1-only one as HTTP/1.1 on one
        kept-alive connection; every response is the backend's.
        """
        pki = make_pki(self)
        ports = {"h2": await unused_port(self), "h1": await unused_port(self)}
        logs = {name: Path(self.mktemp()).resolve() for name in ports}
        alpn = {"h2": "[h2, http/1.1]", "h1": "[http/1.1]"}
        server = {"cert": pki.cert("server"), "key": pki.key("server")}
        client = {"cert": pki.cert("client"), "key": pki.key("client"), "ca": pki.ca}
        text = FRONT + "".join(
            BACKEND.format(name=name, port=port, alpn=alpn[name], log=logs[name], **server)
            for name, port in ports.items()
        ) + "  clusters:\n" + "".join(
            CLUSTER.format(name=name, port=port, **client) for name, port in ports.items())
        proxy = await start_yaml_twistd(self, "hbone-server", "auto", text, listeners=3)
        front = proxy.ports["front"]
        for index in range(3):
            for name in ("h2", "h1"):
                request = (f"GET /{name}/{index} HTTP/1.1\r\nHost: example\r\n"
                           "Connection: close\r\n\r\n").encode()
                answer = (await exchange(front, request, half_close=False)).data
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
                self.assertTrue(answer.endswith(f"from {name}".encode()), answer[-200:])
        for name in ports:
            await wait_until(lambda name=name: len(json_records(logs[name])) >= 3,  # type: ignore[misc]
                             f"three records of backend {name}")
        h2, h1 = json_records(logs["h2"]), json_records(logs["h1"])
        self.assertEqual([(r["path"], r["protocol"]) for r in h2],
                         [(f"/h2/{i}", "HTTP/2") for i in range(3)])
        self.assertEqual([(r["path"], r["protocol"]) for r in h1],
                         [(f"/h1/{i}", "HTTP/1.1") for i in range(3)])
        # Pooled: one upstream connection each (a stream per request, or kept alive).
        self.assertEqual(len({r["connection"] for r in h2}), 1, h2)
        self.assertEqual(len({r["connection"] for r in h1}), 1, h1)


DOWNSTREAM_CONFIG = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
static_resources:
  listeners:
  - name: front
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: same}}
{router}\
  - name: back
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: back
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format: {{json_format: {{protocol: "%PROTOCOL%", path: "%REQ(:PATH)%"}}}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                direct_response: {{status: 200, body: {{inline_string: "back"}}}}
{router}\
  clusters:
  - name: same
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: same
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{envoy_internal_address: {{server_listener_name: back}}}}
"""


class DownstreamProtocolTests(E2ETestCase):
    def setUp(self) -> None:
        pass  # plain text: no PKI

    async def test_upstream_speaks_the_requests_protocol(self) -> None:
        """
        use_downstream_protocol_config: an HTTP/1.1 request goes upstream as HTTP/1.1, an
        HTTP/2 one as HTTP/2 (the upstream HCM logs which).
        """
        import os
        import shutil

        from tests.test_e2e_configs import run_command

        log = Path(self.mktemp()).resolve()
        proxy = await start_yaml_twistd(self, "hbone-server", "front", DOWNSTREAM_CONFIG.format(
            hcm=HCM_TYPE, router=ROUTER, log=log))
        curl = shutil.which("curl")
        assert curl is not None, "curl is needed on PATH"
        for mode, path in (("--http1.1", "/one"), ("--http2-prior-knowledge", "/two"),
                           ("--http1.1", "/three")):
            out, err, code = await run_command(
                [curl, "-sS", "--max-time", "20", mode, f"http://127.0.0.1:{proxy.port}{path}"],
                Path(self.mktemp()).parent, env=dict(os.environ))
            self.assertEqual((code, out), (0, "back"), err)
        await wait_until(lambda: len(json_records(log)) >= 3, "three upstream records")
        self.assertEqual(json_records(log), [
            {"protocol": "HTTP/1.1", "path": "/one"},
            {"protocol": "HTTP/2", "path": "/two"},
            {"protocol": "HTTP/1.1", "path": "/three"}])
