"""
Istio ambient's path through a waypoint, end to end, with the waypoint configured by
tests/configs/istio-waypoint.yaml (istiod's shape: connect_terminate -> main_internal ->
inbound-vip cluster -> connect_originate) and real processes for every role:

    curl (the app client)
      -> twistd hbone-client (the source ztunnel: mTLS HTTP/2 CONNECT to the service VIP
         127.0.0.10:8000, with ztunnel's baggage header)
      -> twistd hbone-server --config istio-waypoint.yaml (the waypoint)
      -> twistd hbone-server (the destination ztunnel: mTLS HTTP/2 CONNECT to the pod)
      -> the app (twisted.web in this process).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web import resource, server

from hbonex.config.loader import load_config
from hbonex.tls import pki
from tests.faults_support import start_yaml_twistd
from tests.support import (
    CLIENT_ID,
    IMPOSTOR_ID,
    REPO_ROOT,
    TUNNEL_CLOSED_RE,
    e2e,
    pseudorandom,
    sha256,
    start_twistd,
    wait_until,
)
from tests.test_e2e_configs import run_command
from tests.test_e2e_hcm import json_records
from tests.test_e2e_tunnel import E2ETestCase

CONFIG = REPO_ROOT / "tests" / "configs" / "istio-waypoint.yaml"
SDS = REPO_ROOT / "tests" / "configs" / "sds" / "waypoint-sds.yaml"
WAYPOINT_ID = "spiffe://cluster.local/ns/default/sa/waypoint"
#: The service's VIP and port, as the waypoint's filter_chain_matcher has them.
VIP = "127.0.0.10:8000"
#: What ztunnel sends in its CONNECT's baggage header: the source workload.
BAGGAGE = ("k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,"
           "service.version=v1,k8s.cluster.name=Kubernetes")


class App(resource.Resource):
    """The destination workload: records each request; answers ``size`` seeded bytes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.seen.append({
            "method": request.method.decode(), "path": request.path.decode(),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "headers": {k.decode().lower(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
        })
        size = int(request.args.get(b"size", [b"0"])[0])
        return pseudorandom(size, seed=size)


class WaypointConfigTests(unittest.TestCase):
    def test_loads_with_the_warnings_its_header_lists(self) -> None:
        """
        The config loads as written (pki/ and logs/ relative to the working directory);
        what hbonex ignores is warned about, and the file's header names each of them.
        """
        work = Path(self.mktemp()).resolve()
        pki.init_ca(work / "pki", "cluster.local")
        pki.issue(work / "pki", "waypoint", spiffe=WAYPOINT_ID, ip=["127.0.0.1"])
        (work / "pki" / "waypoint-sds.yaml").write_text(SDS.read_text())
        (work / "logs").mkdir()
        old = os.getcwd()
        os.chdir(work)
        self.addCleanup(os.chdir, old)
        text = CONFIG.read_text()
        loaded = load_config(text, reactor)
        warned = {path.rsplit(".", 1)[-1].split("[")[0]
                  for path, _ in loaded.warnings}  # type: ignore[attr-defined]
        self.assertEqual(warned, {
            "initial_fetch_timeout", "resource_api_version", "max_stream_duration",
            "decorator", "tracing", "use_request_id_for_trace_sampling", "traffic_direction",
            "common_lb_config", "cleanup_interval", "workload_discovery"})
        header = "".join(line for line in text.splitlines(keepends=True)
                         if line.startswith("#"))
        for field in warned:
            self.assertIn(field, header)


#: Istio's opt-in XFCC for ambient waypoints (istio/istio#59986): the inner connection
#: manager keeps XFCC as the filters leave it, and XFCC is written from the identities
#: connect_terminate stored (the waypoint's own, the tunnel client's).
XFCC_OPT_IN_HCM = "          forward_client_cert_details: ALWAYS_FORWARD_ONLY\n"
XFCC_VALUE = ("By=%FILTER_STATE(io.istio.local_principal:PLAIN)%;"
              "URI=%FILTER_STATE(io.istio.peer_principal:PLAIN)%")
XFCC_OPT_IN_FILTER = """\
          - name: waypoint_xfcc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.\
HeaderMutation
              mutations:
                request_mutations:
                - append:
                    header: {key: x-forwarded-client-cert, value: "VALUE"}
                    append_action: OVERWRITE_IF_EXISTS_OR_ADD
""".replace("VALUE", XFCC_VALUE)


class IstioAmbientPathTests(E2ETestCase):
    timeout = 60
    maxDiff = None

    async def start_topology(self, xfcc_opt_in: bool = False) -> None:
        """
        The app, the destination ztunnel, the waypoint; the source ztunnels are per test.
        ``xfcc_opt_in``: the waypoint as Istio's ``ambient.istio.io/xfcc-include-client-identity``
        annotation makes it (istio/istio#59986): main_internal forwards XFCC unchanged and
        builds it from the tunnel's identities in filter state (a header_mutation here).
        """
        pki.issue(self.pki.root, "waypoint", spiffe=WAYPOINT_ID, ip=["127.0.0.1"])
        self.app = App()
        app_port = reactor.listenTCP(0, server.Site(self.app),  # type: ignore[attr-defined]
                                     interface="127.0.0.1")
        self.addCleanup(app_port.stopListening)
        self.pod = f"127.0.0.1:{app_port.getHost().port}"
        # The destination ztunnel: the CLI server, default target policy (loopback).
        self.ztunnel = await self.start_server()
        work = Path(self.mktemp()).resolve()
        self.logs = work / "logs"
        self.logs.mkdir(parents=True)
        root = str(self.pki.root)
        (self.pki.root / "waypoint-sds.yaml").write_text(SDS.read_text().replace(
            " pki/", f" {root}/"))
        config = CONFIG.read_text()
        # Only ports and paths change (the file's header says so).
        for old, new in (("port_value: 15008", "port_value: 0"),
                         ("upstream_port_override: 15088",
                          f"upstream_port_override: {self.ztunnel.port}"),
                         ("127.0.0.1:8080", self.pod), (" pki/", f" {root}/"),
                         (" logs/", f" {self.logs}/")):
            self.assertIn(old, config)
            config = config.replace(old, new)
        if xfcc_opt_in:
            inner = "          stat_prefix: inbound_0.0.0.0_8000\n"
            self.assertEqual(config.count(inner), 1)
            config = config.replace(inner, inner + XFCC_OPT_IN_HCM)
            filters = "          http_filters:\n          - name: envoy.filters.http.rbac\n"
            self.assertEqual(config.count(filters), 1)
            config = config.replace(filters, "          http_filters:\n" + XFCC_OPT_IN_FILTER
                                    + "          - name: envoy.filters.http.rbac\n")
        self.waypoint = await start_yaml_twistd(self, "hbone-server", "waypoint", config)
        self.workdir = work

    async def start_source(self, identity: str) -> Any:
        """A source ztunnel for ``identity``: CONNECT to the VIP, with ztunnel's baggage."""
        return await start_twistd(
            self, "hbone-client",
            [f"--forward=127.0.0.1:0={VIP}", "--server", f"127.0.0.1:{self.waypoint.port}",
             "--server-identity", WAYPOINT_ID, "--header", f"baggage={BAGGAGE}",
             *self.pki.args(identity)],
            name=f"ztunnel-{identity}")

    async def curl(self, port: int, path: str, *args: str) -> tuple[int, bytes]:
        curl = shutil.which("curl")
        if curl is None:
            self.fail("curl is not installed (this test needs the curl command on PATH)")
        out = self.workdir / "out"
        cmd = [curl, "-sS", "--max-time", "30", "-o", str(out), "-w", "%{http_code}",
               *args, f"http://127.0.0.1:{port}{path}"]
        code_text, err, code = await run_command(cmd, self.workdir, env=dict(os.environ))
        self.assertEqual(code, 0, f"curl failed ({code}): {err}")
        return int(code_text), out.read_bytes()

    def records(self, name: str) -> list[dict[str, Any]]:
        return json_records(self.logs / f"{name}.json")

    @e2e
    async def test_request_and_response_cross_the_waypoint_intact(self) -> None:
        """
        A 300 kB POST and a 200 kB answer through ztunnel -> waypoint -> ztunnel, hashed at
        both ends; the destination ztunnel's peer is the waypoint; each hop's log names who
        its client was; the app gets no x-forwarded-client-cert (as with Envoy and Istio's
        config: main_internal's connection manager sanitises it).
        """
        await self.start_topology()
        source = await self.start_source("client")
        payload = pseudorandom(300_000, seed=41)
        upload = self.workdir / "upload"
        upload.write_bytes(payload)
        status, body = await self.curl(
            self.forward_port(source), "/upload?size=200000", "--data-binary", f"@{upload}",
            "-H", "content-type: application/octet-stream",
            "-H", "x-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/forged")
        self.assertEqual(status, 200)
        self.assertEqual(sha256(body), sha256(pseudorandom(200_000, seed=200_000)))
        [seen] = self.app.seen
        self.assertEqual((seen["method"], seen["path"], seen["body_sha256"]),
                         ("POST", "/upload", sha256(payload)))
        self.assertNotIn("x-forwarded-client-cert", seen["headers"])
        # The waypoint's pooled tunnels end with it: then every hop has logged.
        await self.waypoint.stop()
        match = await self.ztunnel.wait_for(TUNNEL_CLOSED_RE)
        self.assertEqual((match["identity"], match["target"]), (WAYPOINT_ID, self.pod))
        self.assertGreaterEqual(int(match["up"]), len(payload))
        self.assertGreaterEqual(int(match["down"]), 200_000)
        await wait_until(lambda: self.records("connect_terminate"), "connect_terminate's log")
        self.assertEqual(self.records("connect_terminate"), [
            {"authority": VIP, "code": 200, "peer": CLIENT_ID,
             "upstream_cluster": "main_internal"}])
        [inner] = self.records("main_internal")
        cluster = "inbound-vip|8000|http|echo.default.svc.cluster.local"
        self.assertEqual(inner, {
            "method": "POST", "path": "/upload?size=200000", "code": 200, "flags": None,
            "details": "via_upstream", "peer": CLIENT_ID, "local": VIP,
            "source": inner["source"], "upstream_host": f"envoy://connect_originate/{self.pod}",
            "upstream_cluster": cluster, "route": "default"})
        self.assertIn("sleep", inner["source"])
        [originate] = self.records("connect_originate")
        # ONCE: the client's identity was shared with main_internal only, as in Envoy.
        self.assertEqual(originate, {
            "peer": originate["peer"], "local": self.pod,
            "upstream_host": f"127.0.0.1:{self.ztunnel.port}"})
        self.assertIn(originate["peer"], (None, "-", ""))

    @e2e
    async def test_xfcc_names_the_original_client_when_opted_in(self) -> None:
        """
        With Istio's XFCC opt-in the app sees x-forwarded-client-cert naming the waypoint
        (By) and the original client (URI), whatever the client sent.
        """
        await self.start_topology(xfcc_opt_in=True)
        source = await self.start_source("client")
        status, _ = await self.curl(
            self.forward_port(source), "/who?size=10",
            "-H", "x-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/forged")
        self.assertEqual(status, 200)
        [seen] = self.app.seen
        self.assertEqual(seen["headers"]["x-forwarded-client-cert"],
                         [f"By={WAYPOINT_ID};URI={CLIENT_ID}"])

    @e2e
    async def test_authorization_policy_and_fault(self) -> None:
        """
        Istio's AuthorizationPolicy (rbac on io.istio.peer_principal) lets the client in and
        answers the impostor 403; the route's fault answers /fault 418; neither reaches the
        app.
        """
        await self.start_topology()
        client = await self.start_source("client")
        impostor = await self.start_source("impostor")
        status, body = await self.curl(self.forward_port(impostor), "/get?size=10")
        self.assertEqual((status, body), (403, b"RBAC: access denied"))
        status, body = await self.curl(self.forward_port(client), "/fault/x")
        self.assertEqual(status, 418)
        self.assertEqual(self.app.seen, [])
        status, body = await self.curl(self.forward_port(client), "/get?size=1000")
        self.assertEqual((status, sha256(body)),
                         (200, sha256(pseudorandom(1000, seed=1000))))
        self.assertEqual([s["path"] for s in self.app.seen], ["/get"])
        await wait_until(lambda: len(self.records("main_internal")) >= 3, "3 request records")
        got = [(r["path"], r["code"], r["flags"], r["details"], r["peer"], r["route"])
               for r in self.records("main_internal")]
        self.assertEqual(got, [
            ("/get?size=10", 403, None, "rbac_access_denied_matched_policy[none]",
             IMPOSTOR_ID, "default"),
            ("/fault/x", 418, "FI", "fault_filter_abort", CLIENT_ID, "default.echo.0"),
            ("/get?size=1000", 200, None, "via_upstream", CLIENT_ID, "default")])
