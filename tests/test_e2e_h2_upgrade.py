"""
HTTP/2 extended CONNECT (RFC 8441, websocket over HTTP/2) through the connection manager end
to end: a real ``twistd hbone-server --config`` between an independent node:http2 client
(``tests/node/h2_extended_connect.mjs``) and the independent HTTP/1.1 upgrade backend
(``tests/node/upgrade_backend.mjs``); every byte hashed at both ends, half-close carried both
ways, the access log and Envoy's upgrade counters read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.support import e2e, pseudorandom, sha256, wait_until
from tests.test_e2e_configs import run_command
from tests.test_e2e_upgrade import MiB, UpgradeBase, upgrade_request
from tests.test_interop_node import node_binary

CLIENT = Path(__file__).resolve().parent / "node" / "h2_extended_connect.mjs"


class H2UpgradeE2E(UpgradeBase):
    async def connect(self, port: int, path: str, *extra: str) -> dict[str, Any]:
        """One extended CONNECT by the Node client; its result line."""
        out, err, code = await run_command(
            [node_binary(), str(CLIENT), "--url", f"http://127.0.0.1:{port}", "--path", path,
             "--authority", "ws.test", *extra], CLIENT.parent, env=dict(os.environ))
        self.assertEqual(code, 0, f"{out}\n{err}")
        [line] = out.splitlines()
        result: dict[str, Any] = json.loads(line)
        return result

    async def records(self, log: Path, count: int) -> list[dict[str, Any]]:
        await wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= count,
                         f"{count} access records")
        return [json.loads(line) for line in log.read_text().splitlines()]

    @e2e
    async def test_websocket_over_http2_bytes_and_half_close_both_ways(self) -> None:
        """
        1000 early bytes (sent before the 200) and 3 MiB after it, then END_STREAM; the
        backend answers only after that EOF, with 2 MiB and its own EOF, which arrives as
        END_STREAM.  The 101 reached the client as a 200 without upgrade headers.
        """
        proxy, backend, log = await self.start()
        result = await self.connect(proxy.port, "/chat?down=2097169", "--early", "1000",
                                    "--bytes", str(3 * MiB + 7))
        self.assertEqual(result["status"], 200, result)
        for name in ("upgrade", "connection", "content-length"):
            self.assertNotIn(name, result["headers"])
        self.assertEqual(result["headers"]["server"], "envoy")
        [record] = await backend.wait("out", lambda r: "upgrade" in r)
        self.assertEqual(record["upgrade"], "websocket")
        self.assertEqual(record["path"], "/chat?down=2097169")
        self.assertIn("upgrade", record["headers"]["connection"].lower())
        self.assertEqual(record["headers"]["host"], "ws.test")
        self.assertEqual(record["headers"]["sec-websocket-version"], "13")
        self.assertRegex(record["headers"]["x-request-id"], r"^[0-9a-f-]{36}$")
        self.assertEqual((record["received"], record["received_sha256"]),
                         (result["sent"], result["sent_sha256"]))
        self.assertEqual(result["sent"], 1000 + 3 * MiB + 7)
        self.assertEqual((result["received"], result["received_sha256"]),
                         (record["sent"], record["sent_sha256"]))
        self.assertEqual(result["received"], 2097169)
        self.assertEqual((result["end_stream"], result["rst_code"], result["error"]),
                         (True, 0, None))
        [entry] = await self.records(log, 1)
        self.assertEqual(entry["path"], "/chat?down=2097169")
        self.assertEqual((entry["code"], entry["flags"]), (101, None))  # as Envoy logs it
        self.assertEqual((entry["received"], entry["sent"]),
                         (result["sent"], result["received"]))
        stats = await self.stats(proxy)
        self.assertIn("http.ingress.downstream_cx_upgrades_total: 1\n", stats)
        self.assertIn("http.ingress.downstream_cx_upgrades_active: 0\n", stats)

    @e2e
    async def test_route_disabling_the_upgrade_and_unknown_protocols_get_403(self) -> None:
        """
        The route's enabled: false overrides the HCM's websocket; a :protocol nothing
        enables is refused the same way (Envoy's createUpgradeFilterChain).  403, END_STREAM,
        then RST_STREAM(NO_ERROR) for the client's side.
        """
        proxy, backend, log = await self.start()
        off = await self.connect(proxy.port, "/off/x?down=5", "--bytes", "10")
        unknown = await self.connect(proxy.port, "/chat?down=5", "--protocol", "foo")
        for result in (off, unknown):
            self.assertEqual((result["status"], result["end_stream"], result["rst_code"]),
                             (403, True, 0), result)
            self.assertEqual(result["sent"], 0)  # never a 200, so nothing was sent
        self.assertEqual(backend.out[1:], [], "the backend saw a refused upgrade")
        entries = await self.records(log, 2)
        self.assertEqual([(e["code"], e["details"]) for e in entries],
                         [(403, "upgrade_failed")] * 2)
        stats = await self.stats(proxy)
        self.assertIn("http.ingress.downstream_rq_ws_on_non_ws_route: 2\n", stats)
        self.assertIn("http.ingress.downstream_cx_upgrades_total: 0\n", stats)

    @e2e
    async def test_backend_refusing_the_upgrade_is_an_ordinary_http2_response(self) -> None:
        proxy, backend, log = await self.start()
        result = await self.connect(proxy.port, "/refuse")
        self.assertEqual((result["status"], result["received"], result["end_stream"]),
                         (403, 6, True), result)
        self.assertEqual(result["headers"]["content-length"], "6")
        self.assertEqual(result["rst_code"], 0)
        [entry] = await self.records(log, 1)
        self.assertEqual((entry["code"], entry["sent"]), (403, 6))

    @e2e
    async def test_http1_upgrade_to_an_http2_cluster_is_an_extended_connect(self) -> None:
        """
        An HTTP/1.1 websocket upgrade routed to a cluster speaking HTTP/2 goes upstream as
        an extended CONNECT (:protocol websocket) to node:http2; its 200 comes back as the
        101, then bytes both ways with half-close, as over HTTP/1.1.
        """
        proxy, backend, log = await self.start()
        early = pseudorandom(1000, seed=3)
        up = pseudorandom(MiB + 5, seed=4)
        client, head = await self.open(proxy.port,
                                       upgrade_request("/viah2/chat?down=65537") + early)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), head)
        self.assertIn(b"\r\nupgrade: websocket", head.lower())
        self.assertTrue(await client.send(up))
        client.close_write()
        await client.done
        self.assertTrue(client.closed_cleanly, client.reason)
        down = client.data[len(head) + 4:]
        [record] = await backend.wait("out", lambda r: "upgrade" in r)
        self.assertEqual((record["upgrade"], record["h2"]), ("websocket", True))
        self.assertEqual(record["headers"][":method"], "CONNECT")
        self.assertEqual(record["headers"][":path"], "/viah2/chat?down=65537")
        self.assertNotIn("upgrade", record["headers"])
        self.assertEqual((record["received"], record["received_sha256"]),
                         (len(early + up), sha256(early + up)))
        self.assertEqual((len(down), sha256(down)), (record["sent"], record["sent_sha256"]))
        self.assertEqual(len(down), 65537)
        [entry] = await self.records(log, 1)
        self.assertEqual((entry["code"], entry["flags"]), (101, None))

    @e2e
    async def test_http2_end_to_end_through_an_http2_cluster(self) -> None:
        """Extended CONNECT downstream and upstream (node:http2 at both ends)."""
        proxy, backend, log = await self.start()
        result = await self.connect(proxy.port, "/viah2/x?down=100000", "--early", "10",
                                    "--bytes", str(MiB))
        self.assertEqual((result["status"], result["end_stream"], result["rst_code"]),
                         (200, True, 0), result)
        [record] = await backend.wait("out", lambda r: "upgrade" in r)
        self.assertEqual((record["upgrade"], record["h2"]), ("websocket", True))
        self.assertEqual((record["received"], record["received_sha256"]),
                         (result["sent"], result["sent_sha256"]))
        self.assertEqual((result["received"], result["received_sha256"]),
                         (record["sent"], record["sent_sha256"]))
        self.assertEqual(result["received"], 100000)
