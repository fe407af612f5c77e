"""
The waypoint topology with real processes, on the example config shipped in
docs/examples/waypoint.yaml: app client -> ``twistd hbone-client`` (mutual TLS HTTP/2 CONNECT,
one process per client identity) -> ``twistd hbone-server --config waypoint.yaml``
(connect_terminate -> main_internal: header_mutation -> rbac -> router) -> an HTTP app.
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

from hbonex.tls import pki
from tests.faults_support import start_yaml_twistd
from tests.support import (
    CLIENT_ID,
    IMPOSTOR_ID,
    e2e,
    gather,
    make_pki,
    start_twistd,
    unused_port,
    wait_until,
)
from tests.test_e2e_configs import run_command

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "waypoint.yaml"
WAYPOINT_ID = "spiffe://cluster.local/ns/default/sa/waypoint"


class App(resource.Resource):
    """The app: says which client the waypoint named, and what it was asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes | None]] = []

    def render_GET(self, request: Any) -> bytes:
        client = request.getHeader(b"x-waypoint-client")
        self.seen.append((request.uri, client))
        return b"app saw " + (client or b"-") + b" for " + request.uri


class WaypointTests(unittest.TestCase):
    timeout = 90

    async def start(self) -> tuple[Any, dict[str, int]]:
        """The app, the waypoint on the example config, and one hbone-client per identity."""
        self.app = App()
        port = reactor.listenTCP(0, server.Site(self.app),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        app_port = port.getHost().port
        keys = make_pki(self)
        pki.issue(keys.root, "waypoint", spiffe=WAYPOINT_ID, ip=["127.0.0.1"])
        hbone = await unused_port(self)
        config = EXAMPLE.read_text()
        for old, new in (("port_value: 15008", f"port_value: {hbone}"),
                         ("port_value: 8080", f"port_value: {app_port}"),
                         ("pki/", f"{keys.root}/")):
            self.assertIn(old, config)
            config = config.replace(old, new)
        waypoint = await start_yaml_twistd(self, "hbone-server", "waypoint", config)
        clients = await gather([
            start_twistd(self, "hbone-client", [
                f"--forward=127.0.0.1:0=127.0.0.1:{app_port}", "--server",
                f"127.0.0.1:{hbone}", "--server-identity", WAYPOINT_ID, *keys.args(name)],
                name=f"hbone-client-{name}")
            for name in ("client", "impostor")])
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir()
        return waypoint, {name: c.ports["forward_0"]
                          for name, c in zip(("client", "impostor"), clients, strict=True)}

    async def curl(self, port: int, path: str, *args: str) -> tuple[str, str]:
        curl = shutil.which("curl")
        if curl is None:
            self.fail("curl is not installed (this test needs the curl command on PATH)")
        head = self.workdir / f"head-{port}"
        out, err, code = await run_command(
            [curl, "-sS", "--max-time", "30", "-D", str(head), "-w", " %{http_code}", *args,
             f"http://127.0.0.1:{port}{path}"], self.workdir, env=dict(os.environ))
        self.assertEqual(code, 0, err)
        return out, head.read_text().lower()

    @e2e
    async def test_mutation_rbac_by_tunnel_identity_and_access_log(self) -> None:
        waypoint, ports = await self.start()
        # Both clients at once, on the same waypoint: one passes, one is denied.
        (allowed, allowed_head), (denied, denied_head) = await gather([
            self.curl(ports["client"], "/hello"), self.curl(ports["impostor"], "/hello")])
        self.assertEqual(allowed, f"app saw {CLIENT_ID} for /hello 200")
        self.assertIn("x-waypoint: hbonex", allowed_head)  # response mutation
        self.assertEqual(denied, "RBAC: access denied 403")
        self.assertEqual(self.app.seen, [(b"/hello", CLIENT_ID.encode())])
        # The inner connection manager's access log names each tunnel's client identity.
        def records() -> list[dict[str, Any]]:
            return [json.loads(line) for line in waypoint.output().splitlines()
                    if line.startswith("{")]

        await wait_until(lambda: len(records()) >= 2, "two access records")
        by_client = {r["client"]: r for r in records()}
        self.assertEqual(by_client[CLIENT_ID]["code"], 200)
        self.assertEqual(by_client[IMPOSTOR_ID]["code"], 403)
        self.assertEqual(by_client[IMPOSTOR_ID]["request"], "GET /hello")

    @e2e
    async def test_fault_and_route_rate_limit(self) -> None:
        waypoint, ports = await self.start()
        port = ports["client"]
        # A fault asked for in a header: aborted at the waypoint, flagged FI.
        out, _ = await self.curl(port, "/faulty", "-H", "x-envoy-fault-abort-request: 503")
        self.assertTrue(out.endswith(" 503"), out)
        # The /limited route's own bucket: 2 requests, then 429 (RL), the app untouched.
        codes = [(await self.curl(port, "/limited"))[0][-3:] for _ in range(3)]
        self.assertEqual(codes, ["200", "200", "429"])
        self.assertEqual([uri for uri, _ in self.app.seen], [b"/limited", b"/limited"])
        # Other routes are not limited.
        out, _ = await self.curl(port, "/free")
        self.assertTrue(out.endswith(" 200"), out)

        def flags() -> list[tuple[str, str]]:
            return [(r["request"], r["flags"]) for r in map(
                json.loads, (line for line in waypoint.output().splitlines()
                             if line.startswith("{")))]

        await wait_until(lambda: len(flags()) >= 5, "five access records")
        self.assertIn(("GET /faulty", "FI"), flags())
        self.assertIn(("GET /limited", "RL"), flags())
