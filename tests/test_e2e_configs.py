"""
End-to-end tests of the Envoy YAML acceptance configurations: real ``twistd hbone-client`` /
``twistd hbone-server --config FILE`` processes, real sockets on 127.0.0.1, certificates from
``hbonex pki``, HTTP through ``curl`` and twisted.web.

The acceptance configurations are used unmodified: they are copied byte for byte into each
test's working directory, which is the twistd process's working directory (their certificate
paths, ``pki/...``, are relative to it).  They come from ``<repo>/../shared/configs`` when that
exists, else from the copy in ``tests/configs`` (the two must be identical).

They bind fixed ports (9999, 8080, 8081, 10000, 10001, 9000, 15008; these tests add 8082), so
every test that uses them holds an exclusive lock (``flock`` on a file in the system temp
directory) from setUp until its processes have exited and its ports are closed: trial -jN
workers never run two of them at once.  A busy port fails the test with the port's number.

Tests that write their own configurations (third-party filter, chained internal listeners,
startup errors) use ephemeral ports and run in parallel.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import shutil
import socket
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import h2.events
from twisted.internet import defer, endpoints, protocol, reactor, utils
from twisted.internet import error as ierror
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from hbonex.tls import pki
from tests.support import (
    LISTENER_RE,
    REPO_ROOT,
    STOP_TIMEOUT,
    TUNNEL_CLOSED_RE,
    TUNNEL_REFUSED_RE,
    WAIT_TIMEOUT,
    EchoProtocol,
    RawH2Client,
    RawTLSClient,
    SinkProtocol,
    StreamClient,
    Target,
    TwistdProcess,
    connect_tcp,
    connect_tls,
    e2e,
    exchange,
    gather,
    pseudorandom,
    response_status,
    sha256,
    start_echo,
    twistd_argv,
)

MiB = 1024 * 1024

CONFIG_NAMES = (
    "hbone-client.yaml",
    "hbone-server.yaml",
    "seed-encapsulate-http-in-h2-connect.yaml",
    "seed-internal-listener-chain.yaml",
    "seed-terminate-h2-connect.yaml",
)
SHARED_CONFIGS = REPO_ROOT.parent / "shared" / "configs"
LOCAL_CONFIGS = REPO_ROOT / "tests" / "configs"

SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"

TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
INTERNAL_LISTENER_EXTENSION = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
"""

#: The lock that serialises the tests binding the acceptance configs' fixed ports.
LOCK_FILE = Path(tempfile.gettempdir()) / "hbonex-e2e-fixed-ports.lock"
#: How long a test waits for that lock (the other worker's fixed-port test) before failing.
LOCK_TIMEOUT = 60.0


# --- helpers ---------------------------------------------------------------------------------




def with_timeout(
    d: defer.Deferred[Any], timeout: float, what: str | Callable[[], str]
) -> defer.Deferred[Any]:
    """Fail ``d`` with an AssertionError saying what we waited for if it is late."""

    def on_timeout(result: Any, t: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            text = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out after {t:g}s: {text}")
        return result

    return d.addTimeout(timeout, reactor, onTimeoutCancel=on_timeout)


def configs_dir() -> Path:
    """Where the acceptance configs are: ../shared/configs if present, else tests/configs."""
    return SHARED_CONFIGS if SHARED_CONFIGS.is_dir() else LOCAL_CONFIGS


def copy_configs(test: unittest.TestCase, workdir: Path, *names: str) -> None:
    """Copy acceptance configs byte for byte into ``workdir`` (checking both copies agree)."""
    source = configs_dir()
    for name in names:
        original = (source / name).read_bytes()
        if source != LOCAL_CONFIGS and (LOCAL_CONFIGS / name).exists():
            test.assertEqual(
                (LOCAL_CONFIGS / name).read_bytes(), original,
                f"tests/configs/{name} differs from {source / name}",
            )
        (workdir / name).write_bytes(original)


def make_workdir(test: unittest.TestCase) -> Path:
    workdir = Path(test.mktemp()).resolve()
    workdir.mkdir(parents=True)
    return workdir


def child_env(*extra_paths: Path | str, **env: str) -> dict[str, str]:
    """This process's environment with ``extra_paths`` and the repository on PYTHONPATH."""
    result = dict(os.environ)
    paths = [str(p) for p in extra_paths] + [str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    result["PYTHONPATH"] = os.pathsep.join(paths)
    result["PYTHONUNBUFFERED"] = "1"
    result.update(env)
    return result


def start_config_twistd(
    test: unittest.TestCase,
    plugin: str,
    config: str,
    cwd: Path,
    *,
    listeners: int,
    name: str,
    env: dict[str, str] | None = None,
) -> defer.Deferred[TwistdProcess]:
    """
    ``twistd -n <plugin> --config <config>`` with working directory ``cwd``; fires once
    ``listeners`` listeners are listening.  A cleanup stops it (SIGTERM) and fails the test if
    it needed SIGKILL or logged a traceback.
    """
    proc = TwistdProcess(name)
    environment = env if env is not None else child_env()
    environment.setdefault("HBONEX_STATE_DIR", str(cwd / "state"))
    reactor.spawnProcess(
        proc, sys.executable, twistd_argv(plugin, ["--config", config]), env=environment,
        path=str(cwd),
    )

    def cleanup() -> defer.Deferred[None]:
        def check(_: Any) -> None:
            if proc.killed:
                raise AssertionError(
                    f"{name} did not stop within {STOP_TIMEOUT:g}s of SIGTERM; output:\n"
                    f"{proc.output(last=200)}"
                )
            crashes = proc.crashes()
            if crashes:
                raise AssertionError(
                    f"{name} logged a crash:\n{crashes[0]}\noutput:\n{proc.output(last=200)}"
                )

        return proc.stop().addCallback(check)

    test.addCleanup(cleanup)
    d = proc.wait_for_count(LISTENER_RE, listeners)
    return d.addCallback(lambda _: proc)


async def run_until_exit(
    test: unittest.TestCase, argv: list[str], cwd: Path, env: dict[str, str], name: str
) -> tuple[TwistdProcess, int | None]:
    """
    Run ``argv`` in ``cwd`` to completion (stdout and stderr lines in the TwistdProcess);
    returns it and the exit code.
    """
    proc = TwistdProcess(name)
    reactor.spawnProcess(proc, argv[0], argv, env=env, path=str(cwd))
    test.addCleanup(proc.stop)  # only if it is still running: a failed wait
    status = await with_timeout(
        proc.wait_exit(), WAIT_TIMEOUT, lambda: f"{name} to exit; output:\n{proc.output()}"
    )
    return proc, getattr(status, "exitCode", None)


async def run_command(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[str, str, int]:
    """Run a short command (hbonex CLI, curl): (stdout, stderr, exit code)."""
    out, err, code = await with_timeout(
        utils.getProcessOutputAndValue(
            argv[0], argv[1:], env=env if env is not None else child_env(), path=str(cwd)
        ),
        WAIT_TIMEOUT, f"{' '.join(argv)} to finish",
    )
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code


def hbonex_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hbonex", *args]


class FixedPortsLock:
    """
    An exclusive ``flock`` on LOCK_FILE, taken in a daemon thread (never blocking the reactor)
    and released by closing the descriptor.
    """

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self) -> defer.Deferred[None]:
        fd = self.fd = os.open(LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o666)
        d: defer.Deferred[None] = defer.Deferred()

        def fire(failure: Failure | None) -> None:
            if d.called:  # timed out already
                return
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)

        def wait() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                reactor.callFromThread(fire, Failure(e))
            else:
                reactor.callFromThread(fire, None)

        threading.Thread(target=wait, name="hbonex-fixed-ports-lock", daemon=True).start()
        return with_timeout(
            d, LOCK_TIMEOUT,
            f"the lock {LOCK_FILE} (another test process is using the fixed ports)",
        )

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def assert_port_free(port: int) -> None:
    """Fail naming ``port`` if something listens on 127.0.0.1:port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)
    except OSError as e:
        raise AssertionError(
            f"port 127.0.0.1:{port} is busy ({e.strerror}): the acceptance configurations "
            f"need it; stop whatever listens there"
        )
    finally:
        s.close()


async def listen_on(factory: Any, port: int) -> Any:
    """
    Listen on 127.0.0.1:``port`` (0: any free port); a fixed port that is busy fails the test
    naming the port.
    """
    endpoint = endpoints.TCP4ServerEndpoint(reactor, port, backlog=1024, interface="127.0.0.1")
    try:
        return await endpoint.listen(factory)
    except ierror.CannotListenError as e:
        raise AssertionError(
            f"port 127.0.0.1:{port} is busy ({e.socketError}): the acceptance configurations "
            f"need it for their backend; stop whatever listens there"
        )


def echo_or_sink(target: Any) -> protocol.Protocol:
    """
    A backend connection: EchoProtocol, or SinkProtocol (reads to EOF, then answers the
    SHA-256 of what it got) once the target's ``kind`` is "sink".
    """
    return SinkProtocol() if getattr(target, "kind", "echo") == "sink" else EchoProtocol()


async def start_target(
    test: unittest.TestCase, port: int = 0, make: Callable[[Any], protocol.Protocol] = echo_or_sink
) -> Target:
    """A tests.support Target on 127.0.0.1:``port``, closed by a cleanup."""
    target = Target(make)
    target.listening = await listen_on(target, port)
    target.port = target.listening.getHost().port
    test.addCleanup(target.shutdown)
    return target


class E2EConfigTestCase(unittest.TestCase):
    """A working directory per test (the twistd processes' CWD) and byte-checking helpers."""

    timeout = 90

    def setUp(self) -> Any:
        self.workdir = make_workdir(self)

    def assert_echoed(self, c: StreamClient, payload: bytes, *procs: TwistdProcess) -> None:
        if c.nbytes != len(payload):
            self.fail(
                f"{c.nbytes} bytes echoed of {len(payload)} ({c.reason}); "
                + "\n".join(f"{p.name}:\n{p.output(last=40)}" for p in procs)
            )
        self.assertEqual(c.hexdigest, sha256(payload))
        self.assertTrue(c.eof, "no EOF after the echo")
        self.assertTrue(c.closed_cleanly, f"connection ended with {c.reason}")

    async def echo_8mib(self, port: int, seed: int, *procs: TwistdProcess) -> None:
        """8 MiB up and echoed back, then half-close: SHA-256 at both ends."""
        payload = pseudorandom(8 * MiB, seed=seed)
        c = StreamClient(keep=False, chunk=256 * 1024)
        await connect_tcp(port, c)
        self.assertTrue(await c.send(payload))
        c.close_write()
        await with_timeout(c.done, 40, f"the 8 MiB echo through port {port}")
        self.assertEqual(c.sent, len(payload))
        self.assert_echoed(c, payload, *procs)

    async def sink_after_half_close(self, port: int, sink: Target, seed: int) -> None:
        """
        Send 8 MiB, shut down writing, and still get the reply the backend sends only after
        EOF (the SHA-256 of what it received).
        """
        payload = pseudorandom(8 * MiB + 11, seed=seed)
        before = len(sink.records)
        c = await with_timeout(exchange(port, payload), 40, f"the sink exchange via {port}")
        self.assertEqual(c.data, sha256(payload).encode("ascii"))
        self.assertTrue(c.eof)
        self.assertTrue(c.closed_cleanly, str(c.reason))
        records = await sink.wait_records(before + 1)
        self.assertEqual(records[before], (len(payload), sha256(payload)))


class FixedPortsTestCase(E2EConfigTestCase):
    """Tests using the acceptance configs' fixed ports: one at a time across trial workers."""

    def setUp(self) -> defer.Deferred[None]:
        super().setUp()
        lock = FixedPortsLock()
        # The first cleanup, so it runs last: after the processes exited and ports closed.
        self.addCleanup(lock.release)
        return lock.acquire()

    async def start(
        self, plugin: str, config: str, ports: tuple[int, ...], name: str | None = None,
    ) -> TwistdProcess:
        """twistd running acceptance config ``config`` in the working directory."""
        for port in ports:
            assert_port_free(port)
        proc = await start_config_twistd(
            self, plugin, config, self.workdir, listeners=len(ports), name=name or config,
        )
        self.assertEqual(sorted(proc.ports.values()), sorted(ports), proc.output())
        return proc


# --- the configs themselves ------------------------------------------------------------------


class ConfigCopyTests(unittest.TestCase):
    def test_local_copies_match_shared(self) -> None:
        """
        tests/configs holds all five acceptance configs, byte for byte the same as
        ../shared/configs when that exists (CI has it beside the clone).
        """
        for name in CONFIG_NAMES:
            local = LOCAL_CONFIGS / name
            self.assertTrue(local.is_file(), f"{local} is missing")
            if SHARED_CONFIGS.is_dir():
                self.assertEqual(
                    local.read_bytes(), (SHARED_CONFIGS / name).read_bytes(),
                    f"{local} differs from {SHARED_CONFIGS / name}",
                )
        self.assertEqual(configs_dir(), SHARED_CONFIGS if SHARED_CONFIGS.is_dir()
                         else LOCAL_CONFIGS)


# --- 1. seed-internal-listener-chain.yaml ----------------------------------------------------


class SeedInternalListenerChainTests(FixedPortsTestCase):
    @e2e
    async def test_tcp_through_internal_listener_to_backend(self) -> None:
        """
        127.0.0.1:9999 -> internal listener demo_internal_listener -> 127.0.0.1:8080: 8 MiB
        echoed with hashes at both ends, and half-close (the reply comes after our EOF).
        """
        copy_configs(self, self.workdir, "seed-internal-listener-chain.yaml")
        backend = await start_target(self, 8080)
        proc = await self.start("hbone-client", "seed-internal-listener-chain.yaml", (9999,))
        self.assertEqual(proc.ports, {"ingress": 9999})

        await self.echo_8mib(9999, 1, proc)
        backend.kind = "sink"  # type: ignore[attr-defined]
        await self.sink_after_half_close(9999, backend, 2)
        self.assertEqual(backend.connections_made, 2)
        self.assertEqual(proc.matches(r"failed|\[-\] Unhandled|#warn\]"), [])


# --- 2. seed-encapsulate-http-in-h2-connect.yaml + seed-terminate-h2-connect.yaml -----------

BIG_BODY = pseudorandom(2 * MiB + 123, seed=2024)
HELLO_BODY = b"hello through an HTTP/2 CONNECT tunnel\n"


class CountingSite(server.Site):
    """A Site that counts the TCP connections it accepted (one per tunnel)."""

    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        pass


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"x-backend", b"hbonex-e2e")
        return HELLO_BODY


class Big(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"x-body-sha256", sha256(BIG_BODY).encode())
        return BIG_BODY


class Echo(resource.Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        request.setHeader(b"content-type", request.getHeader(b"content-type") or b"x/unknown")
        request.setHeader(b"x-received-sha256", sha256(body).encode())
        return body  # type: ignore[no-any-return]


def http_backend() -> CountingSite:
    root = resource.Resource()
    root.putChild(b"hello", Hello())
    root.putChild(b"big", Big())
    root.putChild(b"echo", Echo())
    return CountingSite(root)


async def agent_request(
    agent: Agent, method: bytes, path: str, body: bytes | None = None
) -> tuple[Any, bytes]:
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    headers = Headers({b"content-type": [b"application/octet-stream"]}) if body else Headers()
    d = agent.request(method, f"http://127.0.0.1:10000{path}".encode(), headers, producer)
    response = await with_timeout(d, WAIT_TIMEOUT, f"{method.decode()} {path}")
    data = await with_timeout(readBody(response), WAIT_TIMEOUT, f"the body of {path}")
    return response, data


class SeedHttpInH2ConnectTests(FixedPortsTestCase):
    def check_hello(self, response: Any, data: bytes) -> None:
        self.assertEqual(response.code, 200)
        self.assertEqual(data, HELLO_BODY)
        self.assertEqual(response.headers.getRawHeaders(b"x-backend"), [b"hbonex-e2e"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/plain; charset=utf-8"])

    def check_big(self, response: Any, data: bytes) -> None:
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(BIG_BODY))
        self.assertEqual(len(data), len(BIG_BODY))
        self.assertEqual(sha256(data), sha256(BIG_BODY))
        self.assertEqual(response.headers.getRawHeaders(b"x-body-sha256"),
                         [sha256(BIG_BODY).encode()])

    def check_echo(self, response: Any, data: bytes, body: bytes) -> None:
        self.assertEqual(response.code, 200)
        self.assertEqual(sha256(data), sha256(body))
        self.assertEqual(response.headers.getRawHeaders(b"x-received-sha256"),
                         [sha256(body).encode()])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"application/octet-stream"])

    async def curl(self, *args: str) -> tuple[str, str]:
        """curl ARGS: (stdout, stderr); fails unless curl exits 0."""
        curl = shutil.which("curl")
        if curl is None:
            self.fail("curl is not installed (this test needs the curl command on PATH)")
        out, err, code = await run_command(
            [curl, "-sS", "--max-time", "20", *args], self.workdir, env=dict(os.environ)
        )
        self.assertEqual(code, 0, f"curl {' '.join(args)} failed ({code}): {err}")
        return out, err

    async def curl_requests(self) -> int:
        """GET /hello, /big and a missing page, POST /echo with curl; returns the bytes."""
        headers = self.workdir / "curl-headers"
        out, _ = await self.curl("-D", str(headers), "-w", "%{http_code}",
                                 "http://127.0.0.1:10000/hello")
        self.assertTrue(out.endswith("200"), out)
        self.assertEqual(out[:-3].encode(), HELLO_BODY)
        head = headers.read_bytes().decode("latin-1")
        self.assertRegex(head, r"^HTTP/1\.1 200 ")
        self.assertRegex(head, r"(?im)^x-backend: hbonex-e2e\r$")
        self.assertRegex(head, rf"(?im)^content-length: {len(HELLO_BODY)}\r$")

        big = self.workdir / "big.out"
        out, _ = await self.curl("-o", str(big), "-w", "%{http_code} %{size_download}",
                                 "http://127.0.0.1:10000/big")
        self.assertEqual(out, f"200 {len(BIG_BODY)}")
        self.assertEqual(sha256(big.read_bytes()), sha256(BIG_BODY))

        out, _ = await self.curl("-o", os.devnull, "-w", "%{http_code}",
                                 "http://127.0.0.1:10000/no/such/page")
        self.assertEqual(out, "404")  # the backend's own 404, through the tunnel

        upload = self.workdir / "upload.bin"
        body = pseudorandom(300 * 1024 + 7, seed=77)
        upload.write_bytes(body)
        echoed = self.workdir / "echo.out"
        out, _ = await self.curl("-o", str(echoed), "-w", "%{http_code}", "-H",
                                 "content-type: application/x-test", "--data-binary",
                                 f"@{upload}", "http://127.0.0.1:10000/echo")
        self.assertEqual(out, "200")
        self.assertEqual(echoed.read_bytes(), body)
        return len(HELLO_BODY) + len(BIG_BODY) + len(body)

    @e2e
    async def test_http_through_internal_listener_and_h2_connect(self) -> None:
        """
        HTTP on 127.0.0.1:10000 -> HCM -> internal listener encap -> HTTP/2 CONNECT
        host.com:443 -> 127.0.0.1:10001 -> 127.0.0.1:8080 (twisted.web): curl and a Python
        client get intact responses, 50 sequential and 30 concurrent requests work, and the
        tunnel server logs every tunnel.
        """
        copy_configs(self, self.workdir, "seed-encapsulate-http-in-h2-connect.yaml",
                     "seed-terminate-h2-connect.yaml")
        site = http_backend()
        listening = await listen_on(site, 8080)
        self.addCleanup(listening.stopListening)
        tunnel_server = await self.start(
            "hbone-server", "seed-terminate-h2-connect.yaml", (10001,), name="tunnel-server"
        )
        client = await self.start(
            "hbone-client", "seed-encapsulate-http-in-h2-connect.yaml", (10000,),
            name="http-client",
        )
        self.assertEqual(client.ports, {"http": 10000})

        total = await self.curl_requests()
        # The connection manager keeps its upstream connection (one tunnel) alive.
        self.assertEqual(site.connections, 1)

        # 50 sequential requests on one persistent downstream connection.
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        for i in range(50):
            if i % 10 == 3:
                response, data = await agent_request(agent, b"GET", "/big")
                self.check_big(response, data)
                total += len(data)
            elif i % 2:
                body = pseudorandom(10_000 + i, seed=i)
                response, data = await agent_request(agent, b"POST", "/echo", body)
                self.check_echo(response, data, body)
                total += len(data)
            else:
                response, data = await agent_request(agent, b"GET", "/hello")
                self.check_hello(response, data)
                total += len(data)

        self.assertEqual(site.connections, 1, "sequential requests reuse the tunnel")

        # 30 at once, each on its own connection.
        fresh = HTTPConnectionPool(reactor, persistent=False)
        concurrent_agent = Agent(reactor, pool=fresh)
        bodies = [pseudorandom(64 * 1024 + i, seed=300 + i) for i in range(30)]
        requests = []
        for i, body in enumerate(bodies):
            if i % 3 == 0:
                requests.append(agent_request(concurrent_agent, b"GET", "/big"))
            elif i % 3 == 1:
                requests.append(agent_request(concurrent_agent, b"POST", "/echo", body))
            else:
                requests.append(agent_request(concurrent_agent, b"GET", "/hello"))
        results = await gather([defer.ensureDeferred(r) for r in requests])
        for i, (response, data) in enumerate(results):
            if i % 3 == 0:
                self.check_big(response, data)
            elif i % 3 == 1:
                self.check_echo(response, data, bodies[i])
            else:
                self.check_hello(response, data)
            total += len(data)
        self.assertEqual(client.matches(r"upstream failed|failed: \d{3}"), [])

        # Every backend connection was a tunnel; stopping the client ends the kept-alive ones
        # and the tunnel server logs each (target from tunneling_config, no TLS identity).
        await pool.closeCachedConnections()
        await client.stop()
        tunnels = site.connections
        self.assertTrue(1 < tunnels <= 30, tunnels)  # concurrent requests need more tunnels
        lines = await tunnel_server.wait_for_count(TUNNEL_CLOSED_RE, tunnels)
        self.assertEqual({m["target"] for m in lines}, {"host.com:443"})
        self.assertEqual({m["identity"] for m in lines}, {"-"})
        # All tunnels rode one HTTP/2 connection from the client.
        self.assertEqual(len({m["peer"] for m in lines}), 1, [m["peer"] for m in lines])
        self.assertGreater(sum(int(m["down"]) for m in lines), total)
        self.assertEqual(tunnel_server.matches(TUNNEL_REFUSED_RE), [])


# --- 3. hbone-client.yaml + hbone-server.yaml ------------------------------------------------


class HboneConfigTests(FixedPortsTestCase):
    async def cli_pki(self) -> None:
        """pki/ with the CA, server and client identities, made by the real ``hbonex pki``."""
        out, err, code = await run_command(hbonex_cli("pki", "init", "pki"), self.workdir)
        self.assertEqual(code, 0, err)
        issued = await gather([
            defer.ensureDeferred(run_command(hbonex_cli(
                "pki", "issue", "pki", "server", "--spiffe", SERVER_ID, "--ip", "127.0.0.1",
            ), self.workdir)),
            defer.ensureDeferred(run_command(hbonex_cli(
                "pki", "issue", "pki", "client", "--spiffe", CLIENT_ID,
            ), self.workdir)),
        ])
        for _out, err, code in issued:
            self.assertEqual(code, 0, err)
        for name in ("ca.pem", "server/cert.pem", "server/key.pem", "client/cert.pem",
                     "client/key.pem"):
            self.assertTrue((self.workdir / "pki" / name).is_file(), name)

    def library_pki(self) -> None:
        """The same layout made with hbonex.tls.pki directly (faster than three CLI runs)."""
        root = self.workdir / "pki"
        pki.init_ca(root, "cluster.local")
        pki.issue(root, "server", spiffe=SERVER_ID, ip=["127.0.0.1"])
        pki.issue(root, "client", spiffe=CLIENT_ID)

    async def start_pair(self) -> tuple[TwistdProcess, TwistdProcess]:
        copy_configs(self, self.workdir, "hbone-client.yaml", "hbone-server.yaml")
        hbone_server = await self.start("hbone-server", "hbone-server.yaml", (15008,))
        hbone_client = await self.start("hbone-client", "hbone-client.yaml", (9000,))
        return hbone_server, hbone_client

    def client_creator(self, cert_root: Path | None = None) -> RawTLSClient:
        root = cert_root or self.workdir / "pki"
        return RawTLSClient(
            self.workdir / "pki" / "ca.pem", root / "client" / "cert.pem",
            root / "client" / "key.pem", alpn=(b"h2",),
        )

    @e2e
    async def test_mtls_port_forward(self) -> None:
        """
        9000 -> HTTP/2 CONNECT 127.0.0.1:8080 over mutual TLS -> 15008 -> 127.0.0.1:8080 with
        certificates from `hbonex pki`: 8 MiB echoed and verified, half-close kept; the server
        logs the client's SPIFFE identity.
        """
        await self.cli_pki()
        backend = await start_target(self, 8080)
        hbone_server, hbone_client = await self.start_pair()

        await self.echo_8mib(9000, 31, hbone_server, hbone_client)
        backend.kind = "sink"  # type: ignore[attr-defined]
        await self.sink_after_half_close(9000, backend, 32)
        lines = await hbone_server.wait_for_count(TUNNEL_CLOSED_RE, 2)
        self.assertEqual({m["target"] for m in lines}, {"127.0.0.1:8080"})
        self.assertEqual({m["identity"] for m in lines}, {CLIENT_ID})
        self.assertEqual(
            sorted((int(m["up"]), int(m["down"])) for m in lines),
            [(8 * MiB, 8 * MiB), (8 * MiB + 11, 64)],
        )
        self.assertEqual({m["reason"] for m in lines}, {"closed cleanly"})
        self.assertEqual(len({m["peer"] for m in lines}), 1, "tunnels share one connection")
        self.assertEqual(hbone_client.matches(r"failed"), [])

    @e2e
    async def test_target_not_in_domains_is_404(self) -> None:
        """
        A CONNECT (h2 over mutual TLS with the client certificate) to 127.0.0.1:8082, not in
        the route's domains, is answered 404 and never connected; 127.0.0.1:8081 (listed) is
        tunnelled.
        """
        self.library_pki()
        listed, unlisted = await gather([
            defer.ensureDeferred(start_target(self, 8081)),
            defer.ensureDeferred(start_target(self, 8082)),
        ])
        copy_configs(self, self.workdir, "hbone-server.yaml")
        hbone_server = await self.start("hbone-server", "hbone-server.yaml", (15008,))
        h2c = RawH2Client()
        await connect_tls(15008, self.client_creator(), h2c)
        self.addCleanup(h2c.close)
        await h2c.ready

        refused = h2c.request([(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:8082")])
        self.assertEqual(response_status(await h2c.wait_answer(refused)), 404)
        m = await hbone_server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual((m["target"], m["status"], m["identity"]),
                         ("127.0.0.1:8082", "404", CLIENT_ID))

        allowed = h2c.request([(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:8081")])
        self.assertEqual(response_status(await h2c.wait_answer(allowed)), 200)
        payload = pseudorandom(256 * 1024, seed=81)
        h2c.send(allowed, payload, end_stream=True)
        await h2c.wait_event(
            lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == allowed,
            "the echo's END_STREAM",
        )
        self.assertEqual(sha256(h2c.body(allowed)), sha256(payload))
        self.assertEqual((listed.connections_made, unlisted.connections_made), (1, 0))

    @e2e
    async def test_refused_upstream_closes_the_downstream(self) -> None:
        """
        With the 8080 backend stopped, the server answers 503 and the client closes the
        downstream connection without data.
        """
        self.library_pki()
        backend = await start_target(self, 8080)
        hbone_server, hbone_client = await self.start_pair()
        hello = b"hello before the backend goes away\n"
        c = await exchange(9000, hello)
        self.assertEqual(c.data, hello)

        await backend.shutdown()
        c = StreamClient()
        await connect_tcp(9000, c)
        # Nothing written: with unread bytes the client's close would be a reset.
        await with_timeout(c.done, WAIT_TIMEOUT, "the client closing the downstream")
        self.assertEqual(c.nbytes, 0, c.data)
        self.assertTrue(c.closed_cleanly, str(c.reason))
        m = await hbone_server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual((m["target"], m["status"]), ("127.0.0.1:8080", "503"))
        self.assertIn("connection refused", m["reason"])
        await hbone_client.wait_for(
            r"tunnel for \S+ to 127\.0\.0\.1:8080 via cluster hbone failed: 503 .*; closing "
            r"the downstream connection"
        )
        self.assertEqual(backend.connections_made, 1)

    @e2e
    async def test_client_certificate_from_another_ca(self) -> None:
        """A TLS client whose certificate another CA issued fails the handshake."""
        self.library_pki()
        other = self.workdir / "other-ca"
        pki.init_ca(other, "cluster.local")
        pki.issue(other, "client", spiffe=CLIENT_ID)
        copy_configs(self, self.workdir, "hbone-server.yaml")
        hbone_server = await self.start("hbone-server", "hbone-server.yaml", (15008,))

        c = StreamClient()
        await connect_tls(15008, self.client_creator(other), c)
        local_port = c.transport.getHost().port
        c.transport.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        await c.done
        self.assertEqual(c.nbytes, 0, c.data)
        m = await hbone_server.wait_for(
            rf"hbone: TLS handshake from 127\.0\.0\.1:{local_port} failed: (?P<why>.*)"
        )
        self.assertRegex(m["why"], "certificate verify failed|unknown ca|issuer")
        self.assertEqual(hbone_server.matches(r"tunnel from"), [])

        # The right certificate on the same server gets its CONNECT answered (404: no
        # route for that target).
        h2c = RawH2Client()
        await connect_tls(15008, self.client_creator(), h2c)
        self.addCleanup(h2c.close)
        await h2c.ready
        sid = h2c.request([(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:8082")])
        self.assertEqual(response_status(await h2c.wait_answer(sid)), 404)
        m = await hbone_server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual(m["identity"], CLIENT_ID)


# --- 4. a third-party network filter as a dropin ---------------------------------------------

THIRDPARTY_MODULE = '''\
"""A third-party network filter: upper-cases what downstream sends, logs a byte count."""

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex.interfaces import INetworkFilter, INetworkFilterExtension

log = Logger(namespace="example.uppercase")


@implementer(INetworkFilter)
class UppercaseFilter:
    def __init__(self, prefix):
        self.prefix = prefix
        self.count = 0
        self.callbacks = None

    def onNewConnection(self, callbacks):
        self.callbacks = callbacks
        return True

    def onData(self, data, endStream):
        self.count += len(data)
        self.callbacks.injectReadData(self, data.upper(), endStream)
        return False

    def onClose(self, reason):
        log.info("{prefix}: {peer} sent {n} bytes, upper-cased",
                 prefix=self.prefix, peer=self.callbacks.info.remoteAddress, n=self.count)


@implementer(IPlugin, INetworkFilterExtension)
class UppercaseExtension:
    name = "example.filters.network.uppercase"
    typeUrls = ("type.googleapis.com/example.Uppercase",)
    terminal = False

    def parseConfig(self, config, path, context):
        node = context.node(config, path)
        prefix = node.str_field("stat_prefix", required=True)
        node.finish()
        return prefix

    def filterFactory(self, parsed, context):
        return lambda: UppercaseFilter(parsed)

    def describe(self, parsed):
        return [f"upper-cases downstream bytes ({parsed})"]
'''

THIRDPARTY_DROPIN = """\
from thirdparty_uppercase import UppercaseExtension

uppercase = UppercaseExtension()
"""


def uppercase_config(backend_port: int) -> str:
    return textwrap.dedent(f"""\
        static_resources:
          listeners:
          - name: shouting
            address:
              socket_address: {{address: 127.0.0.1, port_value: 0}}
            filter_chains:
            - filters:
              - name: example.filters.network.uppercase
                typed_config:
                  "@type": type.googleapis.com/xds.type.v3.TypedStruct
                  type_url: type.googleapis.com/example.Uppercase
                  value:
                    stat_prefix: shout
              - name: envoy.filters.network.tcp_proxy
                typed_config:
                  "@type": {TCP_PROXY_TYPE}
                  stat_prefix: out
                  cluster: backend
          clusters:
          - name: backend
            load_assignment:
              cluster_name: backend
              endpoints:
              - lb_endpoints:
                - endpoint:
                    address:
                      socket_address: {{address: 127.0.0.1, port_value: {backend_port}}}
        """)


class ThirdPartyFilterTests(E2EConfigTestCase):
    def write_plugin_package(self) -> Path:
        """A dir with thirdparty_uppercase.py and the dropin twisted/plugins/ (no __init__)."""
        package = make_workdir(self)
        (package / "thirdparty_uppercase.py").write_text(THIRDPARTY_MODULE)
        plugins = package / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "thirdparty_filter.py").write_text(THIRDPARTY_DROPIN)
        return package

    @e2e
    async def test_dropin_filter_transforms_bytes_before_tcp_proxy(self) -> None:
        package = self.write_plugin_package()
        echo = await start_echo(self)
        workdir = self.workdir
        (workdir / "shout.yaml").write_text(uppercase_config(echo.port))

        # config check resolves the filter with the dropin on PYTHONPATH...
        out, err, code = await run_command(
            hbonex_cli("config", "check", "shout.yaml"), workdir, child_env(package)
        )
        self.assertEqual(code, 0, err)
        self.assertIn("shout.yaml: OK (1 listener(s), 1 cluster(s))", out)
        self.assertIn("example.filters.network.uppercase upper-cases downstream bytes (shout)",
                      out)
        # ... and without it reports the unknown @type, listing the known ones.
        out, err, code = await run_command(
            hbonex_cli("config", "check", "shout.yaml"), workdir, child_env()
        )
        self.assertEqual(code, 2, out + err)
        self.assertIn(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.type_url: "
            "unknown network filter type 'type.googleapis.com/example.Uppercase'; known: ",
            err,
        )
        known = err.split("; known: ", 1)[1]
        self.assertIn(TCP_PROXY_TYPE, known)
        self.assertIn(HCM_TYPE, known)

        proc = await start_config_twistd(
            self, "hbone-client", "shout.yaml", workdir, listeners=1, name="shouting",
            env=child_env(package),
        )
        port = proc.ports["shouting"]
        payload = b"".join(
            f"line {i}: the quick brown fox jumps over the lazy dog\n".encode()
            for i in range(20_000)
        )
        c = StreamClient()
        await connect_tcp(port, c)
        local = c.transport.getHost().port
        self.assertTrue(await c.send(payload))
        c.close_write()
        await c.done
        self.assertEqual(c.nbytes, len(payload))
        self.assertEqual(c.data, payload.upper())
        self.assertNotEqual(payload, payload.upper())
        self.assertTrue(c.closed_cleanly, str(c.reason))
        m = await proc.wait_for(
            rf"shout: 127\.0\.0\.1:{local} sent (?P<n>\d+) bytes, upper-cased"
        )
        self.assertEqual(int(m["n"]), len(payload))


# --- 5. internal listeners chained -----------------------------------------------------------

HOP_LOG = re.compile(
    r"hop (?P<prefix>\S+) cluster=(?P<cluster>\S+) up=(?P<up>\d+) down=(?P<down>\d+) "
    r"local=(?P<local>\S+)"
)


def tcp_proxy_filter(prefix: str, cluster: str) -> str:
    return textwrap.indent(textwrap.dedent(f"""\
        - filters:
          - name: envoy.filters.network.tcp_proxy
            typed_config:
              "@type": {TCP_PROXY_TYPE}
              stat_prefix: {prefix}
              cluster: {cluster}
              access_log:
              - name: envoy.access_loggers.stdout
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                  log_format:
                    text_format_source:
                      inline_string: "hop {prefix} cluster=%UPSTREAM_CLUSTER% up=%BYTES_RECEIVED% down=%BYTES_SENT% local=%DOWNSTREAM_LOCAL_ADDRESS%\\n"
        """), "    ")  # noqa: E501


def chained_internal_config(backend_port: int) -> str:
    def internal_cluster(name: str, listener: str) -> str:
        return textwrap.indent(textwrap.dedent(f"""\
            - name: {name}
              load_assignment:
                cluster_name: {name}
                endpoints:
                - lb_endpoints:
                  - endpoint:
                      address:
                        envoy_internal_address: {{server_listener_name: {listener}}}
            """), "  ")

    return (
        INTERNAL_LISTENER_EXTENSION
        + "static_resources:\n  listeners:\n"
        + "  - name: ingress\n    address:\n      socket_address: "
          "{address: 127.0.0.1, port_value: 0}\n    filter_chains:\n"
        + tcp_proxy_filter("ingress", "to_a")
        + "  - name: internal_a\n    internal_listener: {}\n    filter_chains:\n"
        + tcp_proxy_filter("a", "to_b")
        + "  - name: internal_b\n    internal_listener: {}\n    filter_chains:\n"
        + tcp_proxy_filter("b", "backend")
        + "  clusters:\n"
        + internal_cluster("to_a", "internal_a")
        + internal_cluster("to_b", "internal_b")
        + textwrap.indent(textwrap.dedent(f"""\
            - name: backend
              connect_timeout: 2s
              load_assignment:
                cluster_name: backend
                endpoints:
                - lb_endpoints:
                  - endpoint:
                      address:
                        socket_address: {{address: 127.0.0.1, port_value: {backend_port}}}
            """), "  ")
    )


class ChainedInternalListenerTests(E2EConfigTestCase):
    @e2e
    async def test_two_internal_listeners_in_a_row(self) -> None:
        """
        TCP listener -> internal_a (tcp_proxy) -> internal_b (tcp_proxy) -> backend: 8 MiB
        echoed and verified, half-close kept; each hop's access log shows the bytes.
        """
        backend = await start_target(self)
        (self.workdir / "chain.yaml").write_text(chained_internal_config(backend.port))
        out, err, code = await run_command(
            hbonex_cli("config", "check", "chain.yaml"), self.workdir
        )
        self.assertEqual(code, 0, out + err)
        proc = await start_config_twistd(
            self, "hbone-client", "chain.yaml", self.workdir, listeners=1, name="chain",
        )
        port = proc.ports["ingress"]

        await self.echo_8mib(port, 51, proc)
        hops = await proc.wait_for_count(HOP_LOG, 3)
        # The stdout logger writes the record itself, as Envoy does (no log prefix).
        for m in hops:
            self.assertEqual(m.start(), 0, m.string)
        self.assertEqual(
            {m["prefix"]: (m["cluster"], m["local"], int(m["up"]), int(m["down"]))
             for m in hops},
            {"ingress": ("to_a", f"127.0.0.1:{port}", 8 * MiB, 8 * MiB),
             "a": ("to_b", "envoy://internal_a/", 8 * MiB, 8 * MiB),
             "b": ("backend", "envoy://internal_b/", 8 * MiB, 8 * MiB)},
        )

        backend.kind = "sink"  # type: ignore[attr-defined]
        mark = proc.mark()
        await self.sink_after_half_close(port, backend, 52)
        hops = await proc.wait_for_count(HOP_LOG, 3, start=mark)
        self.assertEqual(
            sorted((m["prefix"], int(m["up"]), int(m["down"])) for m in hops),
            [("a", 8 * MiB + 11, 64), ("b", 8 * MiB + 11, 64), ("ingress", 8 * MiB + 11, 64)],
        )
        self.assertEqual(backend.connections_made, 2)


# --- 6. startup errors -----------------------------------------------------------------------


class StartupErrorTests(E2EConfigTestCase):
    @e2e
    async def test_listener_port_in_use(self) -> None:
        """
        A listener whose port is taken: twistd exits non-zero naming the listener's YAML path
        and the address, without a traceback.
        """
        busy = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(protocol.Protocol)
        )
        self.addCleanup(busy.stopListening)
        port = busy.getHost().port
        workdir = self.workdir
        config = textwrap.dedent(f"""\
            static_resources:
              listeners:
              - name: free
                address:
                  socket_address: {{address: 127.0.0.1, port_value: 0}}
                filter_chains:
                - filters:
                  - name: envoy.filters.network.tcp_proxy
                    typed_config:
                      "@type": {TCP_PROXY_TYPE}
                      stat_prefix: free
                      cluster: backend
              - name: taken
                address:
                  socket_address: {{address: 127.0.0.1, port_value: {port}}}
                filter_chains:
                - filters:
                  - name: envoy.filters.network.tcp_proxy
                    typed_config:
                      "@type": {TCP_PROXY_TYPE}
                      stat_prefix: taken
                      cluster: backend
              clusters:
              - name: backend
                load_assignment:
                  cluster_name: backend
                  endpoints:
                  - lb_endpoints:
                    - endpoint:
                        address:
                          socket_address: {{address: 127.0.0.1, port_value: 9}}
            """)
        (workdir / "busy.yaml").write_text(config)
        argv = twistd_argv("hbone-client", ["--config", "busy.yaml"])
        proc, code = await run_until_exit(self, argv, workdir, child_env(), "busy")
        output = proc.output()
        self.assertNotIn(code, (0, None), output)
        self.assertEqual(proc.crashes(), [], output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(len(proc.matches(r"twistd: error: ")), 1, output)
        self.assertRegex(
            output,
            r"twistd: error: --config busy\.yaml: static_resources\.listeners\[1\]: cannot "
            rf"listen on tcp:{port}:interface=127\.0\.0\.1: .*127\.0\.0\.1:{port}.*"
            r"[Aa]ddress already in use",
        )

    async def missing_file(self, workdir: Path, field: str, filename: str) -> None:
        argv = twistd_argv("hbone-server", ["--config", "hbone-server.yaml"])
        proc, code = await run_until_exit(self, argv, workdir, child_env(), "hbone-server")
        output = proc.output()
        self.assertEqual(code, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertIn(
            "twistd: error: --config hbone-server.yaml: static_resources.listeners[0]."
            "filter_chains[0].transport_socket.typed_config.common_tls_context."
            f"tls_certificates[0].{field}.filename: {filename}: no such file", output,
        )

    @e2e
    async def test_missing_certificate_files(self) -> None:
        """
        hbone-server.yaml (unmodified) without its PKI: the error names the YAML path and
        the file, first the certificate, then (certificate present) the key.
        """
        workdir = self.workdir
        copy_configs(self, workdir, "hbone-server.yaml")
        await self.missing_file(workdir, "certificate_chain", "pki/server/cert.pem")
        root = workdir / "pki"
        pki.init_ca(root, "cluster.local")
        pki.issue(root, "server", spiffe=SERVER_ID, ip=["127.0.0.1"])
        (root / "server" / "key.pem").unlink()
        await self.missing_file(workdir, "private_key", "pki/server/key.pem")

