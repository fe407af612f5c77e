"""
The HTTP connection manager end to end: a real ``twistd hbone-server --config`` whose HCM
routes ordinary HTTP/1.1 and HTTP/2 (prior knowledge) requests to a twisted.web backend in
this process, with curl as the client; bytes hashed at both ends.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.web import resource, server

from tests.faults_support import start_yaml_twistd
from tests.support import (
    e2e,
    pseudorandom,
    rss_kib,
    sha256,
    start_twistd,
    wait_until,
)
from tests.test_e2e_configs import run_command
from tests.test_e2e_tunnel import E2ETestCase

MiB = 1024 * 1024
ROUTER_ONLY = """\
http_filters:
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)

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
{hcm_extra}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{extra_routes}
              - match: {{prefix: /direct}}
                direct_response: {{status: 200, body: {{inline_string: "straight from the proxy"}}}}
              - match: {{prefix: /slow}}
                route: {{cluster: backend, timeout: 1s}}
              - match: {{prefix: /api}}
                route: {{cluster: backend}}
              - match: {{prefix: /stream}}
                route: {{cluster: backend, timeout: 120s}}
              - match: {{prefix: /flaky}}
                route:
                  cluster: backend
                  retry_policy:
                    retry_on: "gateway-error,connect-failure"
                    num_retries: 2
                    retry_back_off: {{base_interval: 0.01s}}
{http_filters}
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
"""


class Echo(resource.Resource):
    """POST: the body back, with its SHA-256 in a header; GET: a deterministic body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        #: Every request the backend served: (method, uri).
        self.seen: list[tuple[bytes, bytes]] = []

    def render(self, request: Any) -> Any:
        self.seen.append((request.method, request.uri))
        return super().render(request)

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        request.setHeader(b"x-received-sha256", sha256(body).encode())
        return body  # type: ignore[no-any-return]

    def render_GET(self, request: Any) -> bytes:
        size = int(request.args.get(b"size", [b"100"])[0])
        body = pseudorandom(size, seed=size)
        request.setHeader(b"x-body-sha256", sha256(body).encode())
        request.setHeader(b"x-forwarded-for-seen",
                          request.getHeader(b"x-forwarded-for") or b"-")
        request.setHeader(b"x-request-id-seen", request.getHeader(b"x-request-id") or b"-")
        request.setHeader(b"x-tag-seen", request.getHeader(b"x-tag") or b"-")
        request.setHeader(b"x-path-seen", request.uri)
        return body


class Flaky(resource.Resource):
    """503 for the first ``fails`` requests of each path (the number is in the path)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        #: path -> the SHA-256 of each attempt's body.
        self.attempts: dict[bytes, list[str]] = {}

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        seen = self.attempts.setdefault(request.path, [])
        seen.append(sha256(body))
        if len(seen) <= int(request.path.rsplit(b"/", 1)[1]):
            request.setResponseCode(503)
            return b"not yet\n"
        request.setHeader(b"x-received-sha256", sha256(body).encode())
        return b"attempt %d\n" % len(seen)


class Slow(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        return server.NOT_DONE_YET  # never answers


class HcmCase(E2ETestCase):
    """A connection manager config in a real hbone-server, a backend, curl."""

    timeout = 90

    async def setup_hcm(self, http_filters: str = ROUTER_ONLY, pythonpath: str = "",
                        hcm_extra: str = "", extra_args: list[str] | None = None,
                        extra_routes: str = "", env: dict[str, str] | None = None) -> Any:
        root = resource.Resource()
        api = self.backend = Echo()
        root.putChild(b"api", api)
        root.putChild(b"slow", Slow())
        self.flaky = Flaky()
        root.putChild(b"flaky", self.flaky)
        root.putChild(b"stream", Stream())
        site = server.Site(root)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        config = workdir / "hcm.yaml"
        filters = "\n".join(" " * 10 + line for line in http_filters.splitlines())
        extra = "\n".join(" " * 10 + line.replace("WORKDIR", str(workdir))
                          for line in hcm_extra.splitlines())
        routes = "\n".join(" " * 14 + line for line in extra_routes.splitlines())
        config.write_text(CONFIG.format(backend=port.getHost().port, hcm_type=HCM_TYPE,
                                        http_filters=filters, hcm_extra=extra,
                                        extra_routes=routes))
        self.workdir = workdir
        env = dict(env or {})
        if pythonpath:
            from tests.support import REPO_ROOT

            env["PYTHONPATH"] = os.pathsep.join([pythonpath, str(REPO_ROOT)])
        return await start_twistd(self, "hbone-server",
                                  ["--config", str(config), *(extra_args or [])],
                                  name="hcm", env=env)

    async def curl(self, *args: str) -> str:
        curl = shutil.which("curl")
        if curl is None:
            self.fail("curl is not installed (this test needs the curl command on PATH)")
        out, err, code = await run_command([curl, "-sS", "--max-time", "30", *args],
                                           self.workdir, env=dict(os.environ))
        self.assertEqual(code, 0, f"curl {' '.join(args)} failed ({code}): {err}")
        return out  # type: ignore[no-any-return]

    async def check_requests(self, proxy: Any, *mode: str) -> None:
        base = f"http://127.0.0.1:{proxy.port}"
        # GET through the router: every byte, and Envoy's request headers upstream.
        body_file = self.workdir / "get.out"
        headers_file = self.workdir / "get.headers"
        out = await self.curl(*mode, "-o", str(body_file), "-D", str(headers_file),
                              "-w", "%{http_code}", f"{base}/api/data?size=300007")
        self.assertEqual(out, "200")
        data = body_file.read_bytes()
        head = headers_file.read_bytes().decode("latin-1").lower()
        self.assertEqual(len(data), 300007)
        self.assertIn(f"x-body-sha256: {sha256(data)}", head)
        # Envoy appends to x-forwarded-for only with use_remote_address.
        self.assertIn("x-forwarded-for-seen: -", head)
        self.assertIn("server: envoy", head)  # server_header_transformation OVERWRITE
        self.assertRegex(head, r"x-request-id-seen: [0-9a-f-]{36}")
        self.assertIn("x-envoy-upstream-service-time:", head)
        # POST: the body up and back, hashed both ways.
        upload = self.workdir / "upload.bin"
        payload = pseudorandom(5 * MiB + 13, seed=5)
        upload.write_bytes(payload)
        echoed = self.workdir / "echo.out"
        out = await self.curl(*mode, "-o", str(echoed), "-D", str(headers_file), "-w",
                              "%{http_code}", "--data-binary", f"@{upload}",
                              f"{base}/api/echo")
        self.assertEqual(out, "200")
        self.assertEqual(sha256(echoed.read_bytes()), sha256(payload))
        self.assertIn(f"x-received-sha256: {sha256(payload)}",
                      headers_file.read_bytes().decode("latin-1").lower())
        # Direct response, no route (404 NR), route timeout (504 UT).
        out = await self.curl(*mode, "-w", " %{http_code}", f"{base}/direct/x")
        self.assertEqual(out, "straight from the proxy 200")
        out = await self.curl(*mode, "-o", os.devnull, "-w", "%{http_code}", f"{base}/none")
        self.assertEqual(out, "404")
        out = await self.curl(*mode, "-o", os.devnull, "-w", "%{http_code}", f"{base}/slow")
        self.assertEqual(out, "504")



class HcmTests(HcmCase):
    @e2e
    async def test_http11(self) -> None:
        proxy = await self.setup_hcm()
        await self.check_requests(proxy, "--http1.1")

    @e2e
    async def test_http2_prior_knowledge(self) -> None:
        proxy = await self.setup_hcm()
        await self.check_requests(proxy, "--http2-prior-knowledge")

    @e2e
    async def test_100_concurrent_http2_requests_on_one_connection(self) -> None:
        """
        Node's HTTP/2 client (an independent stack) sends 100 requests at once on one
        session: all answered, every body hashed.  (curl 7.88's --parallel with prior
        knowledge fails its second stream against any h2c server, Node's too.)
        """
        import json

        from tests.test_interop_node import node_binary

        proxy = await self.setup_hcm()
        script = Path(__file__).parent / "node" / "h2requests.mjs"
        out, err, code = await run_command(
            [node_binary(), str(script), "--url", f"http://127.0.0.1:{proxy.port}/api/n",
             "--count", "100", "--base-size", "1000"], self.workdir, env=dict(os.environ))
        self.assertEqual(code, 0, err)
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(lines[-1], {"done": True, "sessions": 1})
        results = sorted(lines[:-1], key=lambda r: r["i"])
        self.assertEqual(len(results), 100)
        for r in results:
            size = 1000 + r["i"]
            self.assertEqual((r["status"], r["bytes"]), (200, size))
            self.assertEqual(r["sha256"], sha256(pseudorandom(size, seed=size)))

    @e2e
    async def test_large_transfers_keep_memory_bounded(self) -> None:
        """
        200 MB down and 200 MB up through the proxy, both streamed end to end (the backend
        generates and hashes as it goes): every byte hashed at both ends, and the proxy's RSS
        does not follow.
        """
        proxy = await self.setup_hcm()
        pid = proxy.transport.pid
        before = rss_kib(pid)
        base = f"http://127.0.0.1:{proxy.port}"
        size = 200 * 1000 * 1000
        down = self.workdir / "down.out"
        headers_file = self.workdir / "down.headers"
        out = await self.curl("-o", str(down), "-D", str(headers_file), "-w", "%{http_code}",
                              f"{base}/stream/{size}")
        self.assertEqual(out, "200")
        self.assertEqual(down.stat().st_size, size)
        self.assertIn(f"x-body-sha256: {file_sha256(down)}",
                      headers_file.read_bytes().decode("latin-1").lower())
        # The same bytes back up (curl -T streams the file), hashed by the backend as they come.
        out = await self.curl("-o", os.devnull, "-D", str(headers_file), "-w", "%{http_code}",
                              "-T", str(down), f"{base}/stream/up")
        self.assertEqual(out, "200")
        head = headers_file.read_bytes().decode("latin-1").lower()
        self.assertIn(f"x-received-sha256: {file_sha256(down)}", head)
        self.assertIn(f"x-received-bytes: {size}", head)
        down.unlink()
        grown = rss_kib(pid) - before
        self.assertLess(grown, 48 * 1024, f"proxy RSS grew {grown} KiB for 2 x {size} bytes")


def json_records(path: Path) -> list[dict[str, Any]]:
    """An access log of JSON lines, parsed (none yet if the file is not there)."""
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def stream_block(index: int, size: int) -> bytes:
    """Block ``index`` of a generated body: a fixed pseudorandom MiB numbered in front."""
    return (index.to_bytes(8, "big") + _BLOCK[8:])[:size]


_BLOCK = pseudorandom(MiB, seed=11)


class Stream(resource.Resource):
    """
    GET /stream/N: N generated bytes, streamed as the client reads (a pull producer), their
    SHA-256 in a header; PUT /stream/up: the body hashed as it is read from twisted.web's
    temporary file.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        size = int(request.postpath[0])
        digest = hashlib.sha256()
        for index, offset in enumerate(range(0, size, MiB)):
            digest.update(stream_block(index, min(MiB, size - offset)))
        request.setHeader(b"content-length", str(size).encode())
        request.setHeader(b"x-body-sha256", digest.hexdigest().encode())
        request.registerProducer(_BlockProducer(request, size), False)
        return server.NOT_DONE_YET

    def render_PUT(self, request: Any) -> bytes:
        digest, count = hashlib.sha256(), 0
        request.content.seek(0)
        for block in iter(lambda: request.content.read(MiB), b""):
            digest.update(block)
            count += len(block)
        request.setHeader(b"x-received-sha256", digest.hexdigest().encode())
        request.setHeader(b"x-received-bytes", str(count).encode())
        return b"ok"


class _BlockProducer:
    def __init__(self, request: Any, size: int) -> None:
        self.request, self.size, self.sent, self.index = request, size, 0, 0

    def resumeProducing(self) -> None:
        if self.sent >= self.size:
            self.request.unregisterProducer()
            self.request.finish()
            return
        block = stream_block(self.index, min(MiB, self.size - self.sent))
        self.index += 1
        self.sent += len(block)
        self.request.write(block)

    def stopProducing(self) -> None:
        self.sent = self.size


SMUGGLING = {
    "content-length and transfer-encoding": b"POST /api/echo HTTP/1.1\r\nHost: h\r\n"
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    "conflicting content-lengths": b"POST /api/echo HTTP/1.1\r\nHost: h\r\n"
    b"Content-Length: 3\r\nContent-Length: 40\r\n\r\nabcGET /api/smuggled HTTP/1.1\r\n\r\n",
    "content-length list": b"POST /api/echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 40"
    b"\r\n\r\nabc",
    "bad chunk size": b"POST /api/echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunked not last": b"POST /api/echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, "
    b"identity\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /api/n HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n Transfer-Encoding: chunked"
    b"\r\n\r\n",
    "NUL in a value": b"GET /api/n HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    "bare CR in a value": b"GET /api/n HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
    "LF in a value (header injection)": b"GET /api/n HTTP/1.1\r\nHost: h\r\nX-A: a\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "over-long request line": b"GET /api/" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
}


class RetryTests(HcmCase):
    @e2e
    async def test_a_backend_that_fails_once_is_retried_with_the_body(self) -> None:
        proxy = await self.setup_hcm()
        base = f"http://127.0.0.1:{proxy.port}"
        payload = pseudorandom(300_000, seed=9)
        upload = self.workdir / "body.bin"
        upload.write_bytes(payload)
        headers = self.workdir / "headers"
        out = await self.curl("-o", os.devnull, "-D", str(headers), "-w", "%{http_code}",
                              "--data-binary", f"@{upload}", f"{base}/flaky/1")
        self.assertEqual(out, "200")
        self.assertIn(f"x-received-sha256: {sha256(payload)}",
                      headers.read_text().lower())
        # Two attempts upstream, the same body each time.
        self.assertEqual(self.flaky.attempts[b"/flaky/1"], [sha256(payload)] * 2)
        # Failing past num_retries (2): the third 503 goes to the client.
        out = await self.curl("-o", os.devnull, "-w", "%{http_code}", "--data-binary", "x",
                              f"{base}/flaky/5")
        self.assertEqual(out, "503")
        self.assertEqual(len(self.flaky.attempts[b"/flaky/5"]), 3)
        # A route without a retry_policy is tried once.
        out = await self.curl("-o", os.devnull, "-w", "%{http_code}", "--data-binary", "x",
                              f"{base}/api/echo")
        self.assertEqual(out, "200")


class SmugglingTests(HcmCase):
    @e2e
    async def test_each_case_is_400_and_closed_and_nothing_reaches_the_backend(self) -> None:
        from tests.support import exchange

        proxy = await self.setup_hcm()
        for name, raw in SMUGGLING.items():
            c = await exchange(proxy.port, raw, half_close=False)
            # The proxy answered and closed the connection itself (exchange fires on close).
            self.assertRegex(c.data[:12], rb"^HTTP/1\.1 4\d\d", (name, c.data[:200]))
            status = int(c.data[9:12])
            self.assertIn(status, (400, 414, 431) if "long" in name else (400,), name)
            self.assertIn(b"connection: close", c.data.lower(), name)
        self.assertEqual(self.backend.seen, [])
        # One bad connection harms no other: a good request still goes through.
        out = await self.curl("-o", os.devnull, "-w", "%{http_code}",
                              f"http://127.0.0.1:{proxy.port}/api/n?size=10")
        self.assertEqual(out, "200")
        self.assertEqual(self.backend.seen, [(b"GET", b"/api/n?size=10")])


class RequestHandlingTests(HcmCase):
    @e2e
    async def test_envoy_request_handling_options(self) -> None:
        """
        use_remote_address, normalize_path, merge_slashes, server_name and
        always_set_request_id_in_response from the YAML, seen by curl and by the backend.
        """
        proxy = await self.setup_hcm(hcm_extra=(
            "use_remote_address: true\nnormalize_path: true\nmerge_slashes: true\n"
            "server_name: hbonex-e2e\nalways_set_request_id_in_response: true\n"
        ))
        headers_file = self.workdir / "h"
        out = await self.curl("--path-as-is", "-D", str(headers_file), "-o", os.devnull,
                              "-w", "%{http_code}", "-H", "x-forwarded-for: 192.0.2.7",
                              "-H", "x-request-id: from-client",
                              f"http://127.0.0.1:{proxy.port}//api/./x/../n?size=10")
        self.assertEqual(out, "200")
        head = headers_file.read_text().lower()
        self.assertIn("x-path-seen: /api/n?size=10", head)
        self.assertIn("x-forwarded-for-seen: 192.0.2.7, 127.0.0.1", head)
        self.assertIn("server: hbonex-e2e", head)
        self.assertIn("x-request-id: from-client", head)
        self.assertIn("x-request-id-seen: from-client", head)


class AccessLogTests(HcmCase):
    @e2e
    async def test_json_access_log_per_request(self) -> None:
        """
        json_format with omit_empty_values: one JSON line per request, typed numbers, request
        and response headers, and no key for what is absent.
        """

        proxy = await self.setup_hcm(hcm_extra="""\
access_log:
- name: envoy.access_loggers.file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: WORKDIR/access.json
    log_format:
      omit_empty_values: true
      json_format:
        method: "%REQ(:METHOD)%"
        path: "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"
        code: "%RESPONSE_CODE%"
        flags: "%RESPONSE_FLAGS%"
        sent: "%BYTES_SENT%"
        agent: "%REQ(USER-AGENT):4%"
        server: "%RESP(SERVER)%"
        protocol: "%PROTOCOL%"
        missing: "%REQ(X-NOPE)%"
        fixed: {kind: hcm, version: 1}
""")
        base = f"http://127.0.0.1:{proxy.port}"
        await self.curl("-o", os.devnull, "-A", "curl-test", f"{base}/api/n?size=123")
        await self.curl("--http2-prior-knowledge", "-o", os.devnull, f"{base}/none")
        log_file = self.workdir / "access.json"
        await wait_until(lambda: log_file.exists() and len(log_file.read_text().splitlines())
                         >= 2, "two access log lines")
        first, second = json_records(log_file)
        self.assertEqual(first, {  # no flags: "-" is empty, and empty values are left out
            "method": "GET", "path": "/api/n?size=123", "code": 200, "sent": 123,
            "agent": "curl", "server": "envoy", "protocol": "HTTP/1.1",
            "fixed": {"kind": "hcm", "version": 1},
        })
        self.assertEqual((second["code"], second["flags"], second["protocol"]),
                         (404, "NR", "HTTP/2"))
        self.assertNotIn("missing", second)


class IstioRequestMetricsTests(HcmCase):
    @e2e
    async def test_istio_requests_total_and_histograms(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        proxy = await self.setup_hcm(extra_args=["--admin", "127.0.0.1:0"])
        [m] = await proxy.wait_for_count(r"admin listening on 127\.0\.0\.1:(?P<port>\d+)", 1)
        base = f"http://127.0.0.1:{proxy.port}"
        for _ in range(3):
            await self.curl("-o", os.devnull, f"{base}/api/n?size=1000")
        await self.curl("-o", os.devnull, f"{base}/none")
        text = await self.curl(f"http://127.0.0.1:{m['port']}/stats/prometheus")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        requests = {(s.labels["response_code"], s.labels["response_flags"]): s.value
                    for s in families["istio_requests"].samples}
        self.assertEqual(requests, {("200", "-"): 3.0, ("404", "NR"): 1.0})
        sizes = [s for s in families["istio_response_bytes"].samples
                 if s.name == "istio_response_bytes_sum" and s.labels["response_code"] == "200"]
        self.assertEqual(sizes[0].value, 3000.0)
        counts = [s for s in families["istio_request_duration_milliseconds"].samples
                  if s.name.endswith("_count")]
        self.assertEqual(sum(s.value for s in counts), 4.0)
        # Envoy's per-HCM request stats, tagged with the stat_prefix.

        def envoy(name: str, suffix: str = "_total") -> float:
            [sample] = [s for s in families[name].samples if s.name == name + suffix]
            self.assertEqual(sample.labels, {"envoy_http_conn_manager_prefix": "ingress"})
            return sample.value

        self.assertEqual(envoy("envoy_http_downstream_rq"), 4)
        self.assertEqual(envoy("envoy_http_downstream_rq_2xx"), 3)
        self.assertEqual(envoy("envoy_http_downstream_rq_4xx"), 1)
        self.assertEqual(envoy("envoy_http_downstream_rq_time", "_count"), 4)
        # The effective config, as loaded.
        import json

        dump = json.loads(await self.curl(f"http://127.0.0.1:{m['port']}/config_dump"))
        listener = dump["configs"][0]["static_resources"]["listeners"][0]
        self.assertEqual(listener["name"], "http")


class AccessLogFilterTests(HcmCase):
    @e2e
    async def test_filtered_log_and_reopen_on_sigusr1(self) -> None:
        """
        A status_code_filter (>= 400) keeps only errors; after logrotate moves the file, a
        SIGUSR1 makes the next record open a new file at the configured path.
        """
        proxy = await self.setup_hcm(hcm_extra="""\
access_log:
- name: envoy.access_loggers.file
  filter:
    or_filter:
      filters:
      - status_code_filter:
          comparison: {op: GE, value: {default_value: 400, runtime_key: ""}}
      - response_flag_filter: {flags: [UT]}
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: WORKDIR/errors.log
    log_format: {text_format: "%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_FLAGS%\\n"}
""")
        base = f"http://127.0.0.1:{proxy.port}"
        log_file = self.workdir / "errors.log"
        await self.curl("-o", os.devnull, f"{base}/api/n?size=1")
        await self.curl("-o", os.devnull, f"{base}/missing")
        await wait_until(log_file.exists, "the error log")
        self.assertEqual(log_file.read_text(), "404 /missing NR\n")
        rotated = self.workdir / "errors.log.1"
        log_file.rename(rotated)
        import signal

        proxy.transport.signalProcess(signal.SIGUSR1)
        await proxy.wait_for(r"access log files reopened")
        await self.curl("-o", os.devnull, f"{base}/gone")
        await wait_until(log_file.exists, "a new error log")
        self.assertEqual(log_file.read_text(), "404 /gone NR\n")
        self.assertEqual(rotated.read_text(), "404 /missing NR\n")


class HttpFilterPluginTests(HcmCase):
    """
    docs/extensions.md's HTTP filter, written out as the page shows it (a third-party package
    and its dropin on PYTHONPATH), in a real hbone-server's connection manager.
    """

    @e2e
    async def test_documented_http_filter(self) -> None:
        import re

        text = (Path(__file__).parent.parent / "docs" / "extensions.md").read_text()
        files = dict(re.findall(r"^`([\w/]+\.py)`[^\n]*:\n\n```python\n(.*?)^```", text,
                                re.MULTILINE | re.DOTALL))
        plugin_dir = Path(self.mktemp()).resolve()
        for name in ("mypkg/tag.py", "twisted/plugins/mypkg_tag.py"):
            (plugin_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (plugin_dir / name).write_text(files[name])
        [snippet] = re.findall(r"^```yaml\n(http_filters:\n.*?)^```", text,
                               re.MULTILINE | re.DOTALL)
        [routes] = re.findall(r"^```yaml\nroutes:\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
        routes = routes.replace("cluster: backend", "cluster: backend, prefix_rewrite: /api")
        proxy = await self.setup_hcm(http_filters=snippet, pythonpath=str(plugin_dir),
                                     extra_routes=routes)
        base = f"http://127.0.0.1:{proxy.port}"
        headers_file = self.workdir / "h"
        out = await self.curl("-D", str(headers_file), "-w", " %{http_code}", "-H",
                              "x-deny: 1", f"{base}/api/n?size=10")
        self.assertEqual(out, "denied by tag\n 403")
        self.assertIn("x-tag: blue", headers_file.read_text().lower())  # encoders ran too
        out = await self.curl("-D", str(headers_file), "-o", os.devnull, "-w", "%{http_code}",
                              f"{base}/api/n?size=10")
        self.assertEqual(out, "200")
        head = headers_file.read_text().lower()
        self.assertIn("x-tag: blue", head)
        self.assertIn("x-tag-seen: blue", head)  # the upstream got the request header
        # The route's typed_per_filter_config: another tag, both ways.
        out = await self.curl("-D", str(headers_file), "-o", os.devnull, "-w", "%{http_code}",
                              f"{base}/green/n?size=10")
        self.assertEqual(out, "200")
        head = headers_file.read_text().lower()
        self.assertIn("x-tag: green", head)
        self.assertIn("x-tag-seen: green", head)
        # FilterConfig disabled: the filter is not in this route's chain at all.
        out = await self.curl("-D", str(headers_file), "-o", os.devnull, "-w", "%{http_code}",
                              "-H", "x-deny: 1", f"{base}/plain/n?size=10")
        self.assertEqual(out, "200")
        head = headers_file.read_text().lower()
        self.assertNotIn("x-tag:", head)
        self.assertIn("x-tag-seen: -", head)


ADMIN_LINE = r"admin listening on 127\.0\.0\.1:(?P<port>\d+)"


class AdminEndpointTests(E2ETestCase):
    """The admin endpoint of a real hbone-server (--admin), after real tunnels."""

    @e2e
    async def test_ready_stats_prometheus_and_levers(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families
        from twisted.web.client import Agent, readBody

        from tests.support import connect_tcp, exchange, gather, start_echo

        echo, server = await gather([start_echo(self),
                                     self.start_server("--admin", "127.0.0.1:0")])
        [m] = await server.wait_for_count(ADMIN_LINE, 1)
        admin = f"http://127.0.0.1:{m['port']}"
        client = await self.start_client(server, [echo.port], "--admin", "127.0.0.1:0")
        [client_admin] = await client.wait_for_count(ADMIN_LINE, 1)
        for i in range(3):
            payload = pseudorandom(20_000 + i, seed=i)
            c = await exchange(self.forward_port(client), payload)
            self.assert_echoed(c, payload, server, client)
        await self.closed_tunnels(server, 3)
        # One connection that is not TLS at all: a handshake error on the server's listener.
        plain = await connect_tcp(server.port)
        plain.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        await server.wait_for(r"TLS handshake from 127\.0\.0\.1:\d+ failed")
        agent = Agent(reactor)

        async def call(method: bytes, path: str) -> tuple[int, bytes]:
            url = path if path.startswith("http:") else f"{admin}{path}"
            response = await agent.request(method, url.encode())
            return response.code, await readBody(response)

        self.assertEqual(await call(b"GET", "/ready"), (200, b"LIVE\n"))
        code, text = await call(b"GET", "/stats/prometheus")
        self.assertEqual(code, 200)
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        # TLS: the client's one pooled connection shook hands; the plain one did not.
        def total(name: str) -> float:
            return sum(s.value for s in families[name].samples if s.name.endswith("_total"))

        self.assertEqual(total("envoy_listener_ssl_handshake"), 1)
        self.assertEqual(total("envoy_listener_ssl_connection_error"), 1)
        # Still open: the client's one pooled HTTP/2 connection (the plain one is gone).
        [active] = families["envoy_listener_downstream_cx_active"].samples
        self.assertEqual(active.value, 1)
        client_url = f"http://127.0.0.1:{client_admin['port']}/stats/prometheus"
        code, text = await call(b"GET", client_url)
        client_families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        [handshakes] = [s for s in client_families["envoy_cluster_ssl_handshake"].samples
                        if s.name.endswith("_total")]
        self.assertEqual(handshakes.value, 1)
        upgrades = families["envoy_http_downstream_cx_upgrades"]
        self.assertEqual(sum(s.value for s in upgrades.samples
                             if s.name.endswith("_total")), 3.0)
        # Istio's metrics, with the tunnel's identities both ways.
        identities = {"source_principal": "spiffe://cluster.local/ns/default/sa/client",
                      "destination_principal": "spiffe://cluster.local/ns/default/sa/server",
                      "connection_security_policy": "mutual_tls", "reporter": "destination",
                      "request_protocol": "tcp"}

        def istio(name: str) -> float:
            samples = [s for s in families[name].samples if s.name == name + "_total"]
            for sample in samples:
                for key, value in identities.items():
                    self.assertEqual(sample.labels[key], value, (name, sample.labels))
            return sum(s.value for s in samples)

        self.assertEqual(istio("istio_tcp_connections_opened"), 3)
        self.assertEqual(istio("istio_tcp_connections_closed"), 3)
        self.assertEqual(istio("istio_tcp_sent_bytes"), 3 * 20_000 + 3)
        self.assertEqual(istio("istio_tcp_received_bytes"), 3 * 20_000 + 3)
        code, text = await call(b"GET", "/stats?filter=upgrades_total")
        self.assertRegex(text.decode(), r"http\.\S+\.downstream_cx_upgrades_total: 3\n")
        self.assertEqual((await call(b"GET", "/quitquitquit"))[0], 405)
        self.assertEqual((await call(b"POST", "/healthcheck/fail"))[0], 200)
        self.assertEqual(await call(b"GET", "/ready"), (503, b"UNHEALTHY\n"))
        self.assertEqual((await call(b"POST", "/healthcheck/ok"))[0], 200)
        self.assertEqual((await call(b"POST", "/logging?level=debug"))[0], 200)
        await server.wait_for(r"log level set to debug")
        self.assertEqual((await call(b"POST", "/drain_listeners?graceful"))[0], 200)
        self.assertEqual(await call(b"GET", "/ready"), (503, b"DRAINING\n"))


ROUTES = """\
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
          stat_prefix: routes
          route_config:
            response_headers_to_add:
            - header: {{key: x-level, value: config}}
            virtual_hosts:
            - name: all
              domains: ["*"]
              request_headers_to_add:
              - header: {{key: x-vhost, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}}
              response_headers_to_add:
              - header: {{key: x-level, value: vhost}}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              routes:
              - match: {{prefix: /old}}
                redirect: {{https_redirect: true, prefix_rewrite: /new, response_code: FOUND}}
              - match:
                  prefix: /q
                  query_parameters:
                  - name: tier
                    string_match: {{exact: gold}}
                direct_response: {{status: 200, body: {{inline_string: gold}}}}
              - match: {{prefix: /q}}
                direct_response: {{status: 200, body: {{inline_string: plain}}}}
              - match: {{path_separated_prefix: /svc, case_sensitive: false}}
                route: {{cluster: backend, prefix_rewrite: /api}}
                request_headers_to_add:
                - header: {{key: x-route, value: svc}}
                request_headers_to_remove: [x-secret]
                response_headers_to_remove: [x-body-sha256]
              - match: {{safe_regex: {{regex: "/v[0-9]+/.*"}}}}
                route:
                  cluster: backend
                  regex_rewrite:
                    pattern: {{regex: "^/v([0-9]+)/(.*)$"}}
                    substitution: "/api/\\\\2?version=\\\\1"
              - match: {{prefix: /by-header}}
                route: {{cluster_header: x-cluster, prefix_rewrite: /api/n}}
              - match: {{prefix: /weighted}}
                route:
                  prefix_rewrite: /api/n
                  weighted_clusters:
                    clusters:
                    - {{name: backend, weight: 1}}
                    - {{name: backend2, weight: 3}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend}}}}}}}
  - name: backend2
    load_assignment:
      cluster_name: backend2
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend2}}}}}}}
"""


class RouteFeatureTests(HcmCase):
    """Envoy's route matching and actions for ordinary requests, with curl."""

    @e2e
    async def test_route_features(self) -> None:
        root = resource.Resource()
        root.putChild(b"api", Echo())
        site = server.Site(root)
        one = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(one.stopListening)

        class Other(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"backend2"

        two = reactor.listenTCP(0, server.Site(Other()),  # type: ignore[attr-defined]
                                interface="127.0.0.1")
        self.addCleanup(two.stopListening)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        self.workdir = workdir
        config = workdir / "routes.yaml"
        config.write_text(ROUTES.format(hcm_type=HCM_TYPE, backend=one.getHost().port,
                                        backend2=two.getHost().port))
        proxy = await start_twistd(self, "hbone-server", ["--config", str(config)],
                                   name="routes")
        base = f"http://127.0.0.1:{proxy.port}"
        h = self.workdir / "h"

        async def get(path: str, *args: str) -> tuple[str, str]:
            out = await self.curl("-D", str(h), "-w", " %{http_code}", *args, f"{base}{path}")
            return out, h.read_text().lower()

        out, head = await get("/old/page?x=1", "-o", os.devnull)
        self.assertEqual(out.strip(), "302")
        self.assertIn(f"location: https://127.0.0.1:{proxy.port}/new/page?x=1", head)
        self.assertEqual((await get("/q?tier=gold"))[0], "gold 200")
        self.assertEqual((await get("/q?tier=silver"))[0], "plain 200")
        # path_separated_prefix, case-insensitive, prefix rewrite, header changes per level.
        out, head = await get("/SVC/n?size=5", "-o", os.devnull, "-H", "x-secret: s")
        self.assertEqual(out.strip(), "200")
        self.assertIn("x-path-seen: /api/n?size=5", head)
        self.assertNotIn("x-body-sha256", head)  # removed by the route
        self.assertIn("x-level: config", head)  # the most general level has the last word
        self.assertEqual((await get("/svcx", "-o", os.devnull))[0].strip(), "404")
        out, head = await get("/v2/n", "-o", os.devnull)
        self.assertIn("x-path-seen: /api/n?version=2", head)
        out, _ = await get("/by-header?size=4", "-H", "x-cluster: backend2")
        self.assertEqual(out, "backend2 200")
        out, _ = await get("/by-header", "-o", os.devnull, "-H", "x-cluster: nope")
        self.assertEqual(out.strip(), "503")
        seen = {}
        for _ in range(40):
            out, _ = await get("/weighted?size=3")
            seen[out] = seen.get(out, 0) + 1
        self.assertGreater(seen.get("backend2 200", 0), 15)  # weight 3 of 4: ~30 of 40
        self.assertLess(seen.get("backend2 200", 0), 40)


TUNNEL_LOG_CONFIG = """\
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
          upgrade_configs:
          - upgrade_type: CONNECT{options}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                json_format:
                  authority: "%REQ(:AUTHORITY)%"
                  cluster: "%UPSTREAM_CLUSTER%"
                  connection: "%CONNECTION_ID%"
                  code: "%RESPONSE_CODE%"
                  flags: "%RESPONSE_FLAGS%"
                  failure: "%UPSTREAM_TRANSPORT_FAILURE_REASON%"
                  up: "%BYTES_RECEIVED%"
                  down: "%BYTES_SENT%"
                  type: "%ACCESS_LOG_TYPE%"
          route_config:
            virtual_hosts:
            - name: targets
              domains: ["127.0.0.1:{echo}", "127.0.0.1:{closed}"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: original_dst
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: original_dst
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    original_dst_lb_config:
      use_http_header: true
      http_header_name: ":authority"
"""


class TunnelAccessLogTests(E2ETestCase):
    async def test_tunnel_records_carry_envoys_fields(self) -> None:
        """
        Tunnels through a CONNECT-terminating HCM: one JSON record each with the CONNECT's
        authority, the cluster, a connection id per downstream connection and the response
        flags (UF and the failure reason for a target that refuses, NR for no route).
        """

        from tests.support import exchange, start_echo, unused_port

        echo = await start_echo(self)
        closed = await unused_port(self)
        log_file = Path(self.mktemp()).resolve()
        proxy = await start_yaml_twistd(self, "hbone-server", "tunnels", TUNNEL_LOG_CONFIG.format(
            hcm_type=HCM_TYPE, log=log_file, echo=echo.port, closed=closed, options=""))
        payload = pseudorandom(50_000, seed=3)
        answers = []
        for target in (f"127.0.0.1:{echo.port}", f"127.0.0.1:{closed}", "127.0.0.1:1"):
            head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            c = await exchange(proxy.port, head + payload)
            answers.append(c.data)
        ok = b"HTTP/1.1 200 OK\r\n\r\n"
        self.assertEqual(hashlib.sha256(answers[0]).hexdigest(),
                         hashlib.sha256(ok + payload).hexdigest())
        self.assertTrue(answers[1].startswith(b"HTTP/1.1 503 "), answers[1][:80])
        self.assertTrue(answers[2].startswith(b"HTTP/1.1 404 "), answers[2][:80])
        await wait_until(lambda: log_file.exists() and len(log_file.read_text().splitlines())
                         >= 3, "three access log lines")
        tunnel, refused, no_route = json_records(log_file)
        self.assertEqual(
            {k: tunnel[k] for k in ("authority", "cluster", "code", "flags", "up", "down")},
            {"authority": f"127.0.0.1:{echo.port}", "cluster": "original_dst", "code": 200,
             "flags": None, "up": 50_000, "down": 50_000})  # no flags: null in JSON
        self.assertEqual({r["type"] for r in (tunnel, refused, no_route)}, {"DownstreamEnd"})
        self.assertEqual((refused["code"], refused["flags"], refused["cluster"]),
                         (503, "UF", "original_dst"))
        self.assertIn(f"connect to 127.0.0.1:{closed} failed", refused["failure"])
        self.assertEqual((no_route["code"], no_route["flags"]), (404, "NR"))
        ids = [r["connection"] for r in (tunnel, refused, no_route)]
        self.assertEqual(len(set(ids)), 3, ids)
        self.assertTrue(all(isinstance(i, int) and i > 0 for i in ids), ids)

    async def test_periodic_records_while_a_tunnel_lasts(self) -> None:
        """
        access_log_options: a record when the tunnel is established, periodic records with
        the bytes so far while it lasts, the end record with every byte.
        """

        from tests.support import StreamClient, connect_tcp, start_echo

        echo = await start_echo(self)
        log_file = Path(self.mktemp()).resolve()
        options = ("\n          access_log_options: {access_log_flush_interval: 0.1s, "
                   "flush_log_on_tunnel_successfully_established: true}")
        proxy = await start_yaml_twistd(self, "hbone-server", "tunnels", TUNNEL_LOG_CONFIG.format(
            hcm_type=HCM_TYPE, log=log_file, echo=echo.port, closed=1, options=options))

        def records() -> list[dict[str, Any]]:
            return json_records(log_file)

        first, second = pseudorandom(30_000, seed=1), pseudorandom(20_000, seed=2)
        target = f"127.0.0.1:{echo.port}"
        c = StreamClient()
        await connect_tcp(proxy.port, c)
        await c.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + first)
        await wait_until(lambda: any(r["type"] == "DownstreamPeriodic" and r["up"] == 30_000
                                     for r in records()), "a periodic record of 30000 bytes")
        await c.send(second)
        c.close_write()
        await c.done
        self.assertEqual(sha256(c.data), sha256(b"HTTP/1.1 200 OK\r\n\r\n" + first + second))
        await wait_until(lambda: any(r["type"] == "DownstreamEnd" for r in records()),
                         "the end record")
        log = records()
        self.assertEqual(log[0]["type"], "DownstreamTunnelSuccessfullyEstablished")
        self.assertEqual((log[-1]["type"], log[-1]["up"], log[-1]["down"]),
                         ("DownstreamEnd", 50_000, 50_000))
        periodic = log[1:-1]
        self.assertTrue(periodic and all(r["type"] == "DownstreamPeriodic" for r in periodic),
                        log)
        ups = [r["up"] for r in log]
        self.assertEqual(ups, sorted(ups))  # bytes so far: never going back
        self.assertEqual({r["connection"] for r in log}, {log[0]["connection"]})

    async def test_tcp_proxy_periodic_records(self) -> None:
        """tcp_proxy's access_log_options: TcpUpstreamConnected, TcpPeriodic, TcpConnectionEnd."""

        from tests.support import StreamClient, connect_tcp, start_echo

        echo = await start_echo(self)
        log_file = Path(self.mktemp()).resolve()
        proxy = await start_yaml_twistd(self, "hbone-client", "tcp", TCP_PROXY_LOG_CONFIG.format(
            log=log_file, echo=echo.port))

        def records() -> list[dict[str, Any]]:
            return json_records(log_file)

        first, second = pseudorandom(40_000, seed=4), pseudorandom(10_000, seed=5)
        c = StreamClient()
        await connect_tcp(proxy.port, c)
        await c.send(first)
        await wait_until(lambda: any(r["type"] == "TcpPeriodic" and r["up"] == 40_000
                                     for r in records()), "a periodic record of 40000 bytes")
        await c.send(second)
        c.close_write()
        await c.done
        self.assertEqual(sha256(c.data), sha256(first + second))
        await wait_until(lambda: any(r["type"] == "TcpConnectionEnd" for r in records()),
                         "the end record")
        log = records()
        self.assertEqual((log[0]["type"], log[0]["cluster"]), ("TcpUpstreamConnected", "echo"))
        self.assertEqual((log[-1]["type"], log[-1]["up"], log[-1]["down"]),
                         ("TcpConnectionEnd", 50_000, 50_000))
        self.assertTrue(log[1:-1] and all(r["type"] == "TcpPeriodic" for r in log[1:-1]), log)
        # envoy.filters.network.set_filter_state ran first: its value is in every record.
        self.assertEqual({r["client"] for r in log}, {"from 127.0.0.1"})


TCP_PROXY_LOG_CONFIG = """\
static_resources:
  listeners:
  - name: plain
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.set_filter_state
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config
          on_new_connection:
          - object_key: test.client
            factory_key: envoy.string
            format_string: {{text_format: "from %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}}
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: plain
          cluster: echo
          access_log_options:
            access_log_flush_interval: 0.1s
            flush_access_log_on_connected: true
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                json_format:
                  type: "%ACCESS_LOG_TYPE%"
                  cluster: "%UPSTREAM_CLUSTER%"
                  up: "%BYTES_RECEIVED%"
                  down: "%BYTES_SENT%"
                  client: "%FILTER_STATE(test.client:PLAIN)%"
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


DECAP_CONFIG = """\
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
          upgrade_configs:
          - upgrade_type: CONNECT
          route_config:
            virtual_hosts:
            - name: decap
              domains: ["decap.internal:80"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: decap
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: decap_listener
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: decap
          route_config:
            virtual_hosts:
            - name: inner
              domains: ["*"]
              routes:
              - match: {{prefix: /direct}}
                direct_response: {{status: 200, body: {{inline_string: "decapsulated"}}}}
              - match: {{prefix: /api}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: decap
    load_assignment:
      cluster_name: decap
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {{server_listener_name: decap_listener}}
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


class DecapTests(HcmCase):
    @e2e
    async def test_connect_into_an_internal_listener_whose_hcm_routes(self) -> None:
        """
        The decap config: CONNECT into an internal listener whose HCM serves the tunnel's
        HTTP/1.1 requests, one to a backend (body hashed), one a direct response.
        """
        from twisted.web import resource as web_resource
        from twisted.web import server as web_server

        from tests.support import StreamClient, connect_tcp

        root = web_resource.Resource()
        api = self.backend = Echo()
        root.putChild(b"api", api)
        port = reactor.listenTCP(0, web_server.Site(root),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        proxy = await start_yaml_twistd(self, "hbone-server", "decap", DECAP_CONFIG.format(
            hcm_type=HCM_TYPE, backend=port.getHost().port))
        c = StreamClient()
        await connect_tcp(proxy.ports["tunnels"], c)
        await c.send(b"CONNECT decap.internal:80 HTTP/1.1\r\nHost: decap.internal:80\r\n\r\n"
                     b"GET /api/n?size=70001 HTTP/1.1\r\nHost: app\r\n\r\n"
                     b"GET /direct HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        await c.done
        data = c.data
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n\r\n"), data[:100])
        inner = data[len(b"HTTP/1.1 200 OK\r\n\r\n"):]
        first_head, _, rest = inner.partition(b"\r\n\r\n")
        self.assertTrue(first_head.startswith(b"HTTP/1.1 200"), first_head)
        expected = pseudorandom(70001, seed=70001)
        length = int([line.split(b":")[1] for line in first_head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")][0])
        self.assertEqual(length, 70001)
        self.assertEqual(sha256(rest[:length]), sha256(expected))
        second_head, _, body = rest[length:].partition(b"\r\n\r\n")
        self.assertTrue(second_head.startswith(b"HTTP/1.1 200"), second_head)
        self.assertEqual(body, b"decapsulated")
        self.assertEqual(self.backend.seen, [(b"GET", b"/api/n?size=70001")])


SET_FILTER_STATE = """\
http_filters:
- name: envoy.filters.http.set_filter_state
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config
    on_request_headers:
    - object_key: envoy.filters.listener.original_dst.local_ip
      format_string: {text_format_source: {inline_string: "%REQ(:AUTHORITY)%"}}
      shared_with_upstream: ONCE
    - object_key: io.istio.peer_principal
      factory_key: envoy.string
      format_string: {text_format_source: {inline_string: "%DOWNSTREAM_PEER_URI_SAN%"}}
      skip_if_empty: true
    - object_key: test.agent
      factory_key: envoy.string
      format_string: {text_format: "agent=%REQ(USER-AGENT)%"}
      read_only: true
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


class SetFilterStateTests(HcmCase):
    @e2e
    async def test_values_reach_the_access_log(self) -> None:
        """
        envoy.filters.http.set_filter_state as Istio's connect_terminate uses it: values
        from the request and the connection, read back with %FILTER_STATE(key:PLAIN)%.
        """

        proxy = await self.setup_hcm(http_filters=SET_FILTER_STATE, hcm_extra="""\
access_log:
- name: envoy.access_loggers.file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: WORKDIR/access.json
    log_format:
      json_format:
        target: "%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%"
        peer: "%FILTER_STATE(io.istio.peer_principal:PLAIN)%"
        agent: "%FILTER_STATE(test.agent:PLAIN)%"
""")
        await self.curl("-o", os.devnull, "-A", "probe/1", "-H", "Host: 10.1.2.3:8080",
                        f"http://127.0.0.1:{proxy.port}/api/n?size=5")
        log_file = self.workdir / "access.json"
        await wait_until(lambda: log_file.exists() and log_file.read_text().strip() != "",
                         "the access log line")
        [record] = json_records(log_file)
        # No peer certificate on this plain listener: skip_if_empty left that key out.
        self.assertEqual(record, {"target": "10.1.2.3:8080", "peer": None,
                                  "agent": "agent=probe/1"})


def _hop(name: str, cluster: str, log: Path, first: bool = False) -> str:
    set_state = """\
      - name: envoy.filters.network.set_filter_state
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config
          on_new_connection:
          - {object_key: here.only, factory_key: envoy.string,
             format_string: {text_format: "local"}}
          - object_key: next.hop
            factory_key: envoy.string
            format_string: {text_format: "once"}
            shared_with_upstream: ONCE
          - object_key: every.hop
            factory_key: envoy.string
            format_string: {text_format: "transitive"}
            shared_with_upstream: TRANSITIVE
""" if first else ""
    address = ("address: {socket_address: {address: 127.0.0.1, port_value: 0}}" if first
               else "internal_listener: {}")
    return f"""\
  - name: {name}
    {address}
    filter_chains:
    - filters:
{set_state}\
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                json_format:
                  hop: {name}
                  here: "%FILTER_STATE(here.only:PLAIN)%"
                  next: "%FILTER_STATE(next.hop:PLAIN)%"
                  every: "%FILTER_STATE(every.hop:PLAIN)%"
"""


def _internal_cluster(name: str, listener: str) -> str:
    return f"""\
  - name: {name}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{envoy_internal_address: {{server_listener_name: {listener}}}}}
"""


class FilterStateAcrossHopsTests(E2ETestCase):
    async def test_shared_with_upstream_once_and_transitive(self) -> None:
        """
        Filter state crosses internal-listener hops as Envoy shares it: NONE stays, ONCE
        reaches the next hop only, TRANSITIVE every hop.
        """

        from tests.support import exchange, start_echo

        echo = await start_echo(self)
        log = Path(self.mktemp()).resolve()
        yaml_text = (
            "bootstrap_extensions:\n- name: envoy.bootstrap.internal_listener\n"
            "  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.bootstrap."
            "internal_listener.v3.InternalListener\n"
            "static_resources:\n  listeners:\n"
            + _hop("ingress", "to_a", log, first=True) + _hop("a", "to_b", log)
            + _hop("b", "echo", log)
            + "  clusters:\n" + _internal_cluster("to_a", "a") + _internal_cluster("to_b", "b")
            + f"""\
  - name: echo
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {echo.port}}}}}
""")
        proxy = await start_yaml_twistd(self, "hbone-client", "hops", yaml_text)
        payload = pseudorandom(10_000, seed=12)
        c = await exchange(proxy.ports["ingress"], payload)
        self.assertEqual(sha256(c.data), sha256(payload))
        await wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 3,
                         "three hop records")
        records = {r["hop"]: r for r in json_records(log)}
        self.assertEqual(
            {hop: (r["here"], r["next"], r["every"]) for hop, r in records.items()},
            {"ingress": ("local", "once", "transitive"),
             "a": (None, "once", "transitive"),
             "b": (None, None, "transitive")})
