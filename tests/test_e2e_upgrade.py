"""
HTTP/1.1 upgrades (websocket) through the connection manager end to end: a real ``twistd
hbone-server --config`` between a raw TCP client and an independent backend
(``tests/node/upgrade_backend.mjs``, node:http's 'upgrade' event); every byte hashed at both
ends, half-close checked both ways, the access log and Envoy's upgrade counters read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from tests.support import (
    StreamClient,
    connect_tcp,
    e2e,
    pseudorandom,
    sha256,
    start_twistd,
    wait_until,
)
from tests.test_e2e_hcm import HCM_TYPE
from tests.test_e2e_tunnel import E2ETestCase
from tests.test_interop_node import NodeProcess, node_binary

BACKEND = Path(__file__).resolve().parent / "node" / "upgrade_backend.mjs"
MiB = 1024 * 1024

CONFIG = """\
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
          upgrade_configs:
          - upgrade_type: WebSocket
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                json_format:
                  path: "%REQ(:PATH)%"
                  code: "%RESPONSE_CODE%"
                  details: "%RESPONSE_CODE_DETAILS%"
                  flags: "%RESPONSE_FLAGS%"
                  received: "%BYTES_RECEIVED%"
                  sent: "%BYTES_SENT%"
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /off}}
                route:
                  cluster: backend
                  upgrade_configs: [{{upgrade_type: websocket, enabled: false}}]
              - match: {{prefix: /viah2}}
                route: {{cluster: backend_h2}}
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {backend}}}
  - name: backend_h2
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: backend_h2
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {backend_h2}}}
"""


def upgrade_request(path: str, extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: ws.test\r\nConnection: keep-alive, Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").encode()


class UpgradeBase(E2ETestCase):
    """The backend and the proxy (CONFIG), for the HTTP/1.1 and the HTTP/2 upgrade tests."""

    timeout = 90

    async def start(self) -> tuple[Any, NodeProcess, Path]:
        node = node_binary()
        backend = NodeProcess("upgrade backend")
        reactor.spawnProcess(  # type: ignore[attr-defined]
            backend, node, [node, str(BACKEND)], env=dict(os.environ),
            path=str(BACKEND.parent), childFDs={0: "w", 1: "r", 2: "r"})
        self.addCleanup(backend.stop)
        [ready] = await backend.wait("out", lambda r: r.get("ready") is True)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        log = workdir / "access.json"
        config = workdir / "hcm.yaml"
        config.write_text(CONFIG.format(backend=ready["port"], backend_h2=ready["h2c"], log=log,
                                       hcm_type=HCM_TYPE))
        proxy = await start_twistd(self, "hbone-server",
                                   ["--config", str(config), "--admin", "127.0.0.1:0"],
                                   name="hcm")
        return proxy, backend, log

    async def open(self, port: int, head: bytes) -> tuple[StreamClient, bytes]:
        """Send ``head`` (and whatever follows it in the same write); the response head."""
        client: StreamClient = await connect_tcp(port)
        client.transport.write(head)  # type: ignore[union-attr]
        await client.wait_contains(b"\r\n\r\n")
        response, _, _ = client.data.partition(b"\r\n\r\n")
        return client, response

    async def stats(self, proxy: Any) -> str:
        [m] = await proxy.wait_for_count(r"admin listening on 127\.0\.0\.1:(?P<port>\d+)", 1)
        client: StreamClient = await connect_tcp(int(m["port"]))
        client.transport.write(b"GET /stats HTTP/1.0\r\n\r\n")  # type: ignore[union-attr]
        await client.done
        return client.data.decode("latin-1")


class UpgradeE2E(UpgradeBase):
    @e2e
    async def test_websocket_bytes_and_half_close_both_ways(self) -> None:
        """
        The upgrade goes through with its headers, early bytes sent with the request head
        arrive, then 3 MiB up and the client's EOF; the backend answers (after that EOF) with
        2 MiB down and its own EOF.  One access record at the end, counters counted.
        """
        proxy, backend, log = await self.start()
        early = pseudorandom(1000, seed=1)
        up = pseudorandom(3 * MiB + 7, seed=2)
        client, head = await self.open(proxy.port,
                                       upgrade_request("/chat?down=2097169") + early)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), head)
        lower = head.lower()
        self.assertIn(b"\r\nupgrade: websocket", lower)
        self.assertIn(b"\r\nconnection: upgrade", lower)
        self.assertNotIn(b"content-length", lower)
        self.assertNotIn(b"transfer-encoding", lower)
        self.assertTrue(await client.send(up))
        client.close_write()
        await client.done
        self.assertTrue(client.closed_cleanly, client.reason)
        self.assertTrue(client.eof)
        down = client.data[len(head) + 4:]
        [record] = await backend.wait("out", lambda r: "upgrade" in r)
        self.assertEqual(record["upgrade"], "websocket")
        self.assertIn("upgrade", record["headers"]["connection"].lower())
        self.assertEqual(record["headers"]["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==")
        self.assertRegex(record["headers"]["x-request-id"], r"^[0-9a-f-]{36}$")
        self.assertEqual((record["received"], record["received_sha256"]),
                         (len(early + up), sha256(early + up)))
        self.assertEqual((len(down), sha256(down)), (record["sent"], record["sent_sha256"]))
        self.assertEqual(len(down), 2097169)
        await wait_until(lambda: log.exists() and log.read_text().strip() != "",
                         "the access record")
        [entry] = [json.loads(line) for line in log.read_text().splitlines()]
        self.assertEqual(entry["path"], "/chat?down=2097169")
        self.assertEqual((entry["code"], entry["flags"]), (101, None))  # no flag: null
        self.assertEqual((entry["received"], entry["sent"]), (len(early + up), len(down)))
        stats = await self.stats(proxy)
        self.assertIn("http.ingress.downstream_cx_upgrades_total: 1\n", stats)
        self.assertIn("http.ingress.downstream_cx_upgrades_active: 0\n", stats)

    @e2e
    async def test_route_disables_the_upgrade(self) -> None:
        """A route's enabled: false overrides the HCM: 403 upgrade_failed, closed."""
        proxy, backend, log = await self.start()
        client, head = await self.open(proxy.port, upgrade_request("/off/x?down=5"))
        self.assertTrue(head.startswith(b"HTTP/1.1 403 Forbidden\r\n"), head)
        self.assertIn(b"\r\nconnection: close", head.lower())
        await client.done
        self.assertEqual(backend.out[1:], [], "the backend saw the refused upgrade")
        await wait_until(lambda: log.exists() and log.read_text().strip() != "",
                         "the access record")
        [entry] = [json.loads(line) for line in log.read_text().splitlines()]
        self.assertEqual((entry["code"], entry["details"]), (403, "upgrade_failed"))
        stats = await self.stats(proxy)
        self.assertIn("http.ingress.downstream_rq_ws_on_non_ws_route: 1\n", stats)
        self.assertIn("http.ingress.downstream_cx_upgrades_total: 0\n", stats)

    @e2e
    async def test_backend_refusing_the_upgrade_is_an_ordinary_response(self) -> None:
        proxy, backend, log = await self.start()
        client, head = await self.open(proxy.port, upgrade_request("/refuse"))
        self.assertTrue(head.startswith(b"HTTP/1.1 403 Forbidden\r\n"), head)
        await client.wait_contains(b"nope!\n")
        await client.done
        self.assertTrue(client.data.endswith(b"\r\n\r\nnope!\n"), client.data)
        self.assertNotIn(b"upgrade", head.lower())
        await wait_until(lambda: log.exists() and log.read_text().strip() != "",
                         "the access record")
        [entry] = [json.loads(line) for line in log.read_text().splitlines()]
        self.assertEqual((entry["code"], entry["sent"]), (403, 6))
