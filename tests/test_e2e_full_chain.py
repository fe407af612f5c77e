"""
The article's full chain for ordinary HTTP, with two real processes: HTTP in -> HCM ->
internal listener -> tcp_proxy HTTP/2 CONNECT tunnel -> hbone-server's HCM -> internal
listener -> HCM -> backend. Clients are curl (HTTP/1.1 and HTTP/2 with prior knowledge) and
Node's node:http2 (an independent stack, 100 concurrent streams on one session); the HTTP
inside the tunnel is HTTP/1.1 or HTTP/2 by the encapsulating cluster's protocol options.
Every body is hashed at both ends.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web import resource, server

from tests.faults_support import start_yaml_twistd
from tests.support import e2e, pseudorandom, sha256, wait_until
from tests.test_e2e_configs import run_command
from tests.test_e2e_hcm import HCM_TYPE, Echo

MiB = 1024 * 1024
HTTP2_OPTIONS = """\
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"""
ROUTER = """\
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

# The client side: the article's encapsulation (HTTP -> internal listener -> CONNECT).
ENCAPSULATE = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
static_resources:
  listeners:
  - name: http
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: encap_cluster, timeout: 60s}}
{router}\
  - name: encap
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: encap
          cluster: tunnel
          tunneling_config: {{hostname: "decap.internal:80"}}
  clusters:
  - name: encap_cluster
{inner_protocol}\
    load_assignment:
      cluster_name: encap_cluster
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{envoy_internal_address: {{server_listener_name: encap}}}}
  - name: tunnel
    connect_timeout: 2s
{http2_options}\
    load_assignment:
      cluster_name: tunnel
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {tunnel_port}}}
"""

# The server side: CONNECT terminated into an internal listener whose HCM routes.
DECAPSULATE = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
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
            - name: decap
              domains: ["decap.internal:80"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: decap
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
{router}\
  - name: decap_listener
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: decap
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format: {{text_format: "%PROTOCOL% %RESPONSE_CODE%\\n"}}
          route_config:
            virtual_hosts:
            - name: inner
              domains: ["*"]
              routes:
              - match: {{prefix: /api}}
                route: {{cluster: backend, timeout: 60s}}
{router}\
  clusters:
  - name: decap
    load_assignment:
      cluster_name: decap
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{envoy_internal_address: {{server_listener_name: decap_listener}}}}
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


class FullChainTests(unittest.TestCase):
    timeout = 120

    async def start(self, inner_http2: bool) -> int:
        """Backend, hbone-server, client proxy; the client proxy's HTTP port."""
        root = resource.Resource()
        self.backend = Echo()
        root.putChild(b"api", self.backend)
        port = reactor.listenTCP(0, server.Site(root),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir()
        self.inner_log = self.workdir / "inner.log"
        decap = await start_yaml_twistd(self, "hbone-server", "decap", DECAPSULATE.format(
            hcm_type=HCM_TYPE, router=ROUTER, backend=port.getHost().port, log=self.inner_log))
        encap = await start_yaml_twistd(self, "hbone-client", "encap", ENCAPSULATE.format(
            hcm_type=HCM_TYPE, router=ROUTER, http2_options=HTTP2_OPTIONS,
            tunnel_port=decap.ports["tunnels"],
            inner_protocol=HTTP2_OPTIONS if inner_http2 else ""))
        return int(encap.ports["http"])

    async def curl(self, *args: str) -> str:
        curl = shutil.which("curl")
        if curl is None:
            self.fail("curl is not installed (this test needs the curl command on PATH)")
        out, err, code = await run_command([curl, "-sS", "--max-time", "60", *args],
                                           self.workdir, env=dict(os.environ))
        self.assertEqual(code, 0, f"curl {' '.join(args)} failed ({code}): {err}")
        return out  # type: ignore[no-any-return]

    async def check_curl(self, port: int, *mode: str) -> None:
        base = f"http://127.0.0.1:{port}/api"
        body = self.workdir / "get.out"
        head = self.workdir / "get.head"
        out = await self.curl(*mode, "-o", str(body), "-D", str(head), "-w",
                              "%{http_code} %{http_version}", f"{base}/n?size=1000003")
        self.assertEqual(out, "200 " + ("2" if "--http2-prior-knowledge" in mode else "1.1"))
        data = body.read_bytes()
        self.assertEqual(sha256(data), sha256(pseudorandom(1000003, seed=1000003)))
        self.assertIn(f"x-body-sha256: {sha256(data)}", head.read_text().lower())
        upload = self.workdir / "upload.bin"
        payload = pseudorandom(3 * MiB + 5, seed=8)
        upload.write_bytes(payload)
        echoed = self.workdir / "echo.out"
        out = await self.curl(*mode, "-o", str(echoed), "-D", str(head), "-w", "%{http_code}",
                              "--data-binary", f"@{upload}", f"{base}/echo")
        self.assertEqual(out, "200")
        self.assertEqual(sha256(echoed.read_bytes()), sha256(payload))
        self.assertIn(f"x-received-sha256: {sha256(payload)}", head.read_text().lower())

    async def node_requests(self, port: int, *args: str) -> list[dict[str, Any]]:
        from tests.test_interop_node import node_binary

        script = Path(__file__).parent / "node" / "h2requests.mjs"
        out, err, code = await run_command(
            [node_binary(), str(script), "--count", "100", *args], self.workdir,
            env=dict(os.environ))
        self.assertEqual(code, 0, err)
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(lines[-1], {"done": True, "sessions": 1})
        self.assertEqual(len(lines), 101)
        return sorted(lines[:-1], key=lambda r: r["i"])

    async def check_node(self, port: int) -> None:
        results = await self.node_requests(port, "--url", f"http://127.0.0.1:{port}/api/n",
                                           "--base-size", "5000")
        for r in results:
            size = 5000 + r["i"]
            self.assertEqual((r["status"], r["bytes"]), (200, size))
            self.assertEqual(r["sha256"], sha256(pseudorandom(size, seed=size)))
        results = await self.node_requests(port, "--url", f"http://127.0.0.1:{port}/api/echo",
                                           "--post-size", "20000")
        for r in results:
            self.assertEqual((r["status"], r["bytes"]), (200, 20000 + r["i"]))
            self.assertEqual(r["sent"], r["sha256"])  # echoed intact
            self.assertEqual(r["sent"], r["received"])  # and the backend got it intact

    @e2e
    async def test_http1_inside_the_tunnel(self) -> None:
        port = await self.start(inner_http2=False)
        await self.check_curl(port, "--http1.1")
        await self.check_curl(port, "--http2-prior-knowledge")
        await self.check_node(port)
        self.assertEqual(len(self.backend.seen), 4 + 200)
        # The inner connection manager saw the protocol the encapsulating cluster speaks.
        await wait_until(lambda: self.inner_log.exists()
                         and len(self.inner_log.read_text().splitlines()) == 204,
                         "204 access log lines")
        self.assertEqual(set(self.inner_log.read_text().splitlines()), {"HTTP/1.1 200"})

    @e2e
    async def test_http2_inside_the_tunnel(self) -> None:
        port = await self.start(inner_http2=True)
        await self.check_curl(port, "--http1.1")
        await self.check_curl(port, "--http2-prior-knowledge")
        await self.check_node(port)
        self.assertEqual(len(self.backend.seen), 4 + 200)
        # The inner connection manager saw the protocol the encapsulating cluster speaks.
        await wait_until(lambda: self.inner_log.exists()
                         and len(self.inner_log.read_text().splitlines()) == 204,
                         "204 access log lines")
        self.assertEqual(set(self.inner_log.read_text().splitlines()), {"HTTP/2 200"})
