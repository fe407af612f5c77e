"""
ext_authz end to end: a real ``twistd hbone-server --config`` whose connection managers
check each request with an HTTP authorization service (twisted.web in this process) before
routing it to a backend (twisted.web too), with curl as the client.  The service allows or
denies by a request header and records what it received; a closed port and a service that
never answers exercise failure_mode_allow both ways.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.web import resource, server

from tests.faults_support import start_yaml_twistd
from tests.support import e2e
from tests.test_e2e_hcm import HcmCase

HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"


class Backend(resource.Resource):
    """Answers with the request's headers as JSON; counts requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, str]] = []

    def render(self, request: Any) -> bytes:
        headers = {k.decode().lower(): v.decode()
                   for k, v in request.requestHeaders.getAllRawHeaders() for v in v}
        self.seen.append(headers)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(headers).encode()


class AuthzService(resource.Resource):
    """200 (with x-auth-user) when the request says x-allow: yes, else 403 with a body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    def render(self, request: Any) -> bytes:
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((request.method.decode(), request.uri.decode(), headers))
        if headers.get("x-allow") == "yes":
            request.setHeader(b"x-auth-user", b"alice")
            request.setHeader(b"x-not-for-upstream", b"1")
            return b""
        request.setResponseCode(403)
        request.setHeader(b"x-reason", b"no x-allow")
        return b"denied by the test service\n"


class Hang(resource.Resource):
    """Never answers (the check times out)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return server.NOT_DONE_YET


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return int(port)


def _listener(name: str, cluster: str, extra: str = "", optional: bool = False) -> str:
    skipped = """\
          - name: istio.metadata_exchange
            is_optional: true
            typed_config:
              "@type": type.googleapis.com/istio.Nonexistent
""" if optional else ""
    return f"""\
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /public}}
                route: {{cluster: backend}}
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": {AUTHZ}PerRoute
                    disabled: true
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
{skipped}          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": {AUTHZ}
              http_service:
                server_uri: {{uri: "http://authz", cluster: {cluster}, timeout: 0.5s}}
                path_prefix: /check
                authorization_request:
                  allowed_headers: {{patterns: [{{exact: x-allow}}]}}
                  headers_to_add: [{{key: x-checked-by, value: hbonex}}]
                authorization_response:
                  allowed_upstream_headers: {{patterns: [{{exact: x-auth-user}}]}}
{extra}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


def _cluster(name: str, port: int) -> str:
    return f"""\
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"""


ALLOW = "              failure_mode_allow: true\n              failure_mode_allow_header_add: true"


class ExtAuthzE2ETests(HcmCase):
    def listen(self, site_resource: resource.Resource) -> int:
        port = reactor.listenTCP(0, server.Site(site_resource),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def code(self, url: str, *args: str) -> str:
        return await self.curl("-o", os.devnull, "-w", "%{http_code}", *args, url)

    @e2e
    async def test_allow_deny_and_failures(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir()
        backend, authz, hang = Backend(), AuthzService(), Hang()
        closed = _closed_port()
        text = "static_resources:\n  listeners:\n" + "".join([
            _listener("main", "authz", optional=True),
            _listener("down_closed", "closed"),
            _listener("down_open", "closed", ALLOW),
            _listener("hang_closed", "hang"),
            _listener("hang_open", "hang", ALLOW),
        ]) + "  clusters:\n" + "".join([
            _cluster("backend", self.listen(backend)), _cluster("authz", self.listen(authz)),
            _cluster("hang", self.listen(hang)), _cluster("closed", closed),
        ])
        proxy = await start_yaml_twistd(self, "hbone-server", "ext_authz", text, listeners=5)
        # The optional unknown filter was skipped, and said so once.
        await proxy.wait_for_count(r"optional HTTP filter 'istio\.metadata_exchange' skipped",
                                   1)
        base = f"http://127.0.0.1:{proxy.ports['main']}"

        # Allowed: the service saw the allowed headers (not the others), the backend the
        # service's upstream header (the client's forged one replaced), not the others.
        out = await self.curl("-H", "x-allow: yes", "-H", "cookie: secret", "-H",
                              "x-auth-user: mallory", f"{base}/api/a?b=1")
        seen_by_backend = json.loads(out)
        self.assertEqual(seen_by_backend["x-auth-user"], "alice")
        self.assertNotIn("x-not-for-upstream", seen_by_backend)
        method, uri, headers = authz.seen[-1]
        self.assertEqual((method, uri), ("GET", "/check/api/a?b=1"))
        self.assertEqual(headers["x-allow"], "yes")
        self.assertEqual(headers["x-checked-by"], "hbonex")
        self.assertEqual(headers["host"], f"127.0.0.1:{proxy.ports['main']}")
        self.assertNotIn("cookie", headers)
        self.assertNotIn("x-auth-user", headers)

        # Denied: the service's status, body and headers; the backend never sees it.
        before = len(backend.seen)
        head = self.workdir / "denied.head"
        out = await self.curl("-D", str(head), "-w", "%{http_code}", f"{base}/api/b")
        self.assertEqual(out, "denied by the test service\n403")
        self.assertIn("x-reason: no x-allow", head.read_text().lower())
        self.assertEqual(len(backend.seen), before)
        # A route with the check disabled goes straight through.
        checks = len(authz.seen)
        self.assertEqual(await self.code(f"{base}/public/x"), "200")
        self.assertEqual(len(authz.seen), checks)

        # The service down (a closed port) and never answering (0.5 s timeout).
        for name, expected in (("down_closed", "403"), ("hang_closed", "403")):
            before = len(backend.seen)
            url = f"http://127.0.0.1:{proxy.ports[name]}/api/c"
            self.assertEqual(await self.code(url, "-H", "x-allow: yes"), expected, name)
            self.assertEqual(len(backend.seen), before, name)
        for name in ("down_open", "hang_open"):
            url = f"http://127.0.0.1:{proxy.ports[name]}/api/d"
            seen = json.loads(await self.curl(url))
            self.assertEqual(seen["x-envoy-auth-failure-mode-allowed"], "true", name)
        self.assertEqual(len(hang.requests), 2)
