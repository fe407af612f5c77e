"""
Interoperability with an independent HBONE peer: ``tests/node/h2tunnel.mjs`` (Node's built-in
``node:http2`` over ``node:tls``; nghttp2 underneath), against real ``twistd`` processes with
real certificates from hbonex.tls.pki, on 127.0.0.1 only.

    Node client  -> twistd hbone-server -> target (this process)
    downstream (this process) -> twistd hbone-client -> Node server -> target (this process)

Node (>= 18) is required: the tests fail, not skip, when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet import error as ierror
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.support import (
    CLIENT_ID,
    IMPOSTOR_ID,
    SERVER_ID,
    TUNNEL_CLOSED_RE,
    TUNNEL_REFUSED_RE,
    EchoProtocol,
    StreamClient,
    Target,
    TwistdProcess,
    connect_tcp,
    e2e,
    gather,
    make_pki,
    port_of,
    pseudorandom,
    sha256,
    start_sink,
    start_twistd,
    unused_port,
)

MiB = 1024 * 1024
SCRIPT = Path(__file__).resolve().parent / "node" / "h2tunnel.mjs"
#: How long a wait for a Node output line (or its exit) may take.
NODE_WAIT = 30.0
#: How long Node gets to exit after its stdin closed, before SIGKILL.
NODE_STOP_TIMEOUT = 10.0

_node_checked: str | None = None


def node_binary() -> str:
    """The ``node`` executable (>= 18); an AssertionError saying why if there is none."""
    global _node_checked
    if _node_checked is not None:
        return _node_checked
    node = shutil.which("node")
    if node is None:
        raise AssertionError(
            "Node.js >= 18 is required for the interop tests (tests/node/h2tunnel.mjs) but "
            "`node` is not on PATH; install Node 20 (e.g. apt-get install nodejs)"
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    m = re.match(r"v(\d+)\.", version)
    if not m or int(m[1]) < 18:
        raise AssertionError(f"Node.js >= 18 is required, {node} is {version or 'unknown'}")
    _node_checked = node
    return node




def with_timeout(d: defer.Deferred[Any], timeout: float, what: Callable[[], str]) -> Any:
    def on_timeout(result: Any, t: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise AssertionError(f"timed out after {t:g}s: {what()}")
        return result

    d.addTimeout(timeout, reactor, onTimeoutCancel=on_timeout)
    return d


# --- the Node process ------------------------------------------------------------------------


class _Waiter:
    def __init__(
        self, source: str, predicate: Callable[[dict[str, Any]], bool], count: int, what: str
    ) -> None:
        self.source = source
        self.predicate = predicate
        self.count = count
        self.what = what
        self.deferred: defer.Deferred[list[dict[str, Any]]] = defer.Deferred()


class NodeProcess(protocol.ProcessProtocol):
    """
    A running ``node h2tunnel.mjs``: its stdout JSON records (``out``), its stderr JSON log
    records (``logs``), every raw line, and waits for records or for its exit.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.out: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.lines: list[str] = []
        #: stdout lines that are not JSON objects (the README promises there are none).
        self.bad_stdout: list[str] = []
        self._partial: dict[int, bytes] = {}
        self._waiters: list[_Waiter] = []
        self._exit_waiters: list[defer.Deferred[BaseException]] = []
        self.exit_reason: Failure | None = None
        self.killed = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        data = self._partial.get(childFD, b"") + data
        *complete, self._partial[childFD] = data.split(b"\n")
        for raw in complete:
            self._line(childFD, raw.decode("utf-8", "replace"))

    def _line(self, fd: int, line: str) -> None:
        self.lines.append(f"{'out' if fd == 1 else 'err'}: {line}")
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if fd == 1 and line:
                self.bad_stdout.append(line)
            return
        (self.out if fd == 1 else self.logs).append(record)
        for waiter in list(self._waiters):
            self._check(waiter)

    def _records(self, source: str) -> list[dict[str, Any]]:
        return self.out if source == "out" else self.logs

    def _check(self, waiter: _Waiter) -> None:
        found = [r for r in self._records(waiter.source) if waiter.predicate(r)]
        if len(found) >= waiter.count and not waiter.deferred.called:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            waiter.deferred.callback(found[: waiter.count])

    def output(self, last: int = 150) -> str:
        return "\n".join(self.lines[-last:])

    def _describe(self, waiter: _Waiter, why: str) -> str:
        have = len([r for r in self._records(waiter.source) if waiter.predicate(r)])
        return (
            f"{self.name}: {why} waiting for {waiter.count} {waiter.what} (have {have}); "
            f"output:\n{self.output()}"
        )

    def wait(
        self,
        source: str,
        predicate: Callable[[dict[str, Any]], bool],
        count: int = 1,
        what: str = "records",
        timeout: float = NODE_WAIT,
    ) -> defer.Deferred[list[dict[str, Any]]]:
        """
        Fire with the first ``count`` records of ``source`` ("out": stdout, "log": stderr)
        matching ``predicate``; fail if Node exits or ``timeout`` passes first.
        """
        waiter = _Waiter(source, predicate, count, what)
        self._check(waiter)
        if waiter.deferred.called:
            return waiter.deferred
        if self.exit_reason is not None:
            return defer.fail(AssertionError(self._describe(waiter, "Node exited")))
        self._waiters.append(waiter)

        def forget(result: Any) -> Any:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return result

        d = waiter.deferred.addBoth(forget)
        return with_timeout(d, timeout, lambda: self._describe(waiter, "timed out"))

    def wait_events(
        self, event: str, count: int = 1, timeout: float = NODE_WAIT
    ) -> defer.Deferred[list[dict[str, Any]]]:
        """The first ``count`` stderr log records with ``"event": event``."""
        return self.wait(
            "log", lambda r: r.get("event") == event, count, f"{event!r} log records", timeout
        )

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.logs if r.get("event") == event]

    # -- lifetime -----------------------------------------------------------------------------

    def processEnded(self, reason: Failure) -> None:
        for fd, partial in list(self._partial.items()):
            if partial:
                self._partial[fd] = b""
                self._line(fd, partial.decode("utf-8", "replace"))
        self.exit_reason = reason
        for waiter in list(self._waiters):
            self._waiters.remove(waiter)
            if not waiter.deferred.called:
                waiter.deferred.errback(AssertionError(self._describe(waiter, "Node exited")))
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(reason.value)

    @property
    def exit_code(self) -> int | None:
        if self.exit_reason is None:
            return None
        return getattr(self.exit_reason.value, "exitCode", None)

    def wait_exit(self, timeout: float = NODE_WAIT) -> defer.Deferred[BaseException]:
        if self.exit_reason is not None:
            return defer.succeed(self.exit_reason.value)
        d: defer.Deferred[BaseException] = defer.Deferred()
        self._exit_waiters.append(d)
        return with_timeout(d, timeout, lambda: f"{self.name} to exit; output:\n{self.output()}")

    def stop(self) -> defer.Deferred[BaseException]:
        """Close Node's stdin (it exits at EOF); SIGKILL if it is still there after a while."""
        if self.exit_reason is not None:
            return defer.succeed(self.exit_reason.value)
        d: defer.Deferred[BaseException] = defer.Deferred()
        self._exit_waiters.append(d)
        self.transport.closeStdin()  # type: ignore[union-attr]

        def kill() -> None:
            self.killed = True
            try:
                self.transport.signalProcess("KILL")  # type: ignore[union-attr]
            except ierror.ProcessExitedAlready:
                pass

        killer = reactor.callLater(NODE_STOP_TIMEOUT, kill)

        def exited(reason: BaseException) -> BaseException:
            if killer.active():
                killer.cancel()
            return reason

        return d.addCallback(exited)


def spawn_node(test: Any, mode: str, args: list[str], name: str | None = None) -> NodeProcess:
    """
    Spawn ``node h2tunnel.mjs <mode> <args>`` with stdin a pipe; a cleanup closes stdin, waits
    for the exit (SIGKILL as a last resort, which fails the test).
    """
    node = node_binary()
    proc = NodeProcess(name or f"node {mode}")
    reactor.spawnProcess(
        proc, node, [node, str(SCRIPT), mode, *args], env=dict(os.environ),
        path=str(SCRIPT.parent), childFDs={0: "w", 1: "r", 2: "r"},
    )

    def cleanup() -> defer.Deferred[None]:
        def check(_: Any) -> None:
            if proc.killed:
                raise AssertionError(
                    f"{proc.name} did not exit within {NODE_STOP_TIMEOUT:g}s of its stdin "
                    f"closing; output:\n{proc.output()}"
                )

        return proc.stop().addCallback(check)

    test.addCleanup(cleanup)
    return proc


# --- targets ---------------------------------------------------------------------------------


class HashingEchoProtocol(EchoProtocol):
    """The harness's echo, also recording (bytes, SHA-256) of what it received at EOF."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.hash = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)
        super().dataReceived(data)

    def readConnectionLost(self) -> None:
        self.factory.record((self.count, self.hash.hexdigest()))
        super().readConnectionLost()


def start_hashing_echo(test: Any) -> defer.Deferred[Target]:
    """An echo target (IHalfCloseableProtocol, as EchoProtocol) that hashes what it gets."""
    target = Target(lambda t: HashingEchoProtocol())
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, backlog=1024, interface="127.0.0.1")

    def listening(port: Any) -> Target:
        target.listening = port
        target.port = port.getHost().port
        test.addCleanup(target.shutdown)
        return target

    return endpoint.listen(target).addCallback(listening)


# --- downstream clients ----------------------------------------------------------------------


async def exchange(port: int, payload: bytes, keep: bool = True) -> tuple[StreamClient, int]:
    """
    Connect to ``port``, send ``payload``, half-close; fire once the connection is gone with
    the client and its local port (what the tunnel's ``forwarded: for=`` should carry).
    """
    c = StreamClient(keep=keep, chunk=256 * 1024)
    await connect_tcp(port, c)
    local = c.transport.getHost().port  # type: ignore[union-attr]
    if await c.send(payload) and c.reason is None:
        c.close_write()
    await closed(c)
    return c, local


def closed(c: StreamClient, timeout: float = NODE_WAIT) -> defer.Deferred[StreamClient]:
    """Fire once ``c``'s connection is gone; fail if that takes longer than ``timeout``."""
    return c.wait_until(lambda c: c.reason is not None, "the connection to close", timeout)


class InteropTestCase(unittest.TestCase):
    timeout = 45

    def setUp(self) -> None:
        node_binary()
        self.pki = make_pki(self)

    def node_tls(self, identity: str) -> list[str]:
        return [
            "--ca", str(self.pki.ca),
            "--cert", str(self.pki.cert(identity)),
            "--key", str(self.pki.key(identity)),
        ]

    def assert_echoed(self, c: StreamClient, payload: bytes, *procs: Any) -> None:
        if c.nbytes != len(payload):
            self.fail(
                f"{c.nbytes} bytes echoed of {len(payload)} ({c.reason}); "
                + "\n".join(f"{p.name}:\n{p.output(last=40)}" for p in procs)
            )
        self.assertEqual(c.hexdigest, sha256(payload))
        self.assertTrue(c.eof, "no EOF after the echo")
        self.assertTrue(c.closed_cleanly, f"connection ended with {c.reason}")


# --- Node as the CONNECT client, hbone-server as the server -----------------------------------


class NodeClientTests(InteropTestCase):
    """``node h2tunnel.mjs client`` against ``twistd hbone-server``."""

    def start_server(self, *args: str) -> defer.Deferred[TwistdProcess]:
        return start_twistd(
            self,
            "hbone-server",
            ["--listen", "127.0.0.1:0", *self.pki.args("server"), "--drain-timeout", "2",
             *args],
            name="hbone-server",
        )

    async def run_client(
        self, server: TwistdProcess, target: int, streams: int, size: int,
        server_spiffe: str = SERVER_ID,
    ) -> tuple[NodeProcess, list[dict[str, Any]], dict[str, Any]]:
        """
        Run the Node client to completion: (process, per-stream records by stream index,
        the final ``done`` record).
        """
        node = spawn_node(self, "client", [
            "--server", f"127.0.0.1:{server.port}", "--target", f"127.0.0.1:{target}",
            "--streams", str(streams), "--bytes", str(size), "--server-spiffe", server_spiffe,
            "--timeout", str(int(NODE_WAIT - 5)), *self.node_tls("client"),
        ])
        await node.wait_exit()
        self.assertEqual(node.bad_stdout, [], "non-JSON lines on the Node client's stdout")
        done = [r for r in node.out if r.get("done")]
        self.assertEqual(len(done), 1, f"no final summary; output:\n{node.output()}")
        records = sorted((r for r in node.out if "stream" in r), key=lambda r: r["stream"])
        self.assertEqual(
            [r["stream"] for r in records], list(range(streams)),
            f"one record per stream wanted; output:\n{node.output()}",
        )
        return node, records, done[0]

    @e2e
    async def test_20_streams_of_2mib_echoed(self) -> None:
        """
        20 concurrent CONNECT streams on one Node session, 2 MiB each through the server to an
        echo: every stream gets 200 and exactly what it sent back (by SHA-256).
        """
        echo, server = await gather([start_hashing_echo(self), self.start_server()])
        size = 2 * MiB
        node, records, done = await self.run_client(server, echo.port, 20, size)
        for r in records:
            self.assertEqual(r["status"], 200, r)
            self.assertNotIn("error", r)
            self.assertEqual((r["sent"], r["received"]), (size, size), r)
            self.assertEqual(r["received_sha256"], r["sent_sha256"], r)
        self.assertEqual(len({r["sent_sha256"] for r in records}), 20, "payloads not distinct")
        self.assertEqual(
            (done["ok"], done["failed"], done["bytes_sent"], done["bytes_received"]),
            (20, 0, 20 * size, 20 * size),
        )
        self.assertEqual(node.exit_code, 0)
        [ready] = [r for r in node.out if r.get("ready")]
        self.assertEqual(ready["uris"], [SERVER_ID])
        # The target got exactly what Node sent, stream by stream.
        self.assertEqual(
            sorted(echo.records), sorted((size, r["sent_sha256"]) for r in records)
        )
        lines = await server.wait_for_count(TUNNEL_CLOSED_RE, 20)
        for m in lines:
            self.assertEqual(m["identity"], CLIENT_ID)
            self.assertEqual(m["target"], f"127.0.0.1:{echo.port}")
            self.assertEqual((int(m["up"]), int(m["down"])), (size, size))
            self.assertEqual(m["reason"], "closed cleanly")
        self.assertEqual(len({port_of(m["peer"]) for m in lines}), 1, "not one session")
        self.assertEqual(echo.connections_made, 20)

    @e2e
    async def test_target_outside_policy_is_403(self) -> None:
        echo = await start_hashing_echo(self)
        server = await self.start_server("--allow-target", "127.0.0.2/32")
        node, [r], done = await self.run_client(server, echo.port, 1, 1000)
        self.assertEqual(r["status"], 403, r)
        self.assertEqual((r["sent"], r["received"]), (0, 0), r)
        self.assertEqual((done["ok"], done["failed"]), (0, 1))
        self.assertEqual(node.exit_code, 1)
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual(
            (m["target"], m["status"], m["identity"]),
            (f"127.0.0.1:{echo.port}", "403", CLIENT_ID),
        )
        self.assertEqual(echo.connections_made, 0)

    @e2e
    async def test_refused_target_port_is_503(self) -> None:
        dead, server = await gather([unused_port(self), self.start_server()])
        node, [r], done = await self.run_client(server, dead, 1, 1000)
        self.assertEqual(r["status"], 503, r)
        self.assertEqual((r["sent"], r["received"]), (0, 0), r)
        self.assertEqual((done["ok"], done["failed"]), (0, 1))
        self.assertEqual(node.exit_code, 1)
        m = await server.wait_for(TUNNEL_REFUSED_RE)
        self.assertEqual((m["target"], m["status"]), (f"127.0.0.1:{dead}", "503"))
        self.assertEqual(server.matches(TUNNEL_CLOSED_RE), [])

    @e2e
    async def test_node_checks_the_server_identity(self) -> None:
        """
        The positive tests' --server-spiffe check is real: expecting another identity, Node
        refuses the hbonex server and no tunnel is attempted.
        """
        echo, server = await gather([start_hashing_echo(self), self.start_server()])
        node, [r], done = await self.run_client(
            server, echo.port, 1, 1000, server_spiffe=IMPOSTOR_ID
        )
        self.assertIsNone(r["status"], r)
        self.assertEqual(r.get("error"), "ERR_SPIFFE_MISMATCH", r)
        self.assertEqual((done["ok"], done["failed"]), (0, 1))
        self.assertEqual(node.exit_code, 1)
        self.assertEqual(echo.connections_made, 0)
        self.assertEqual(server.matches(r"tunnel from"), [])


# --- hbone-client in front of Node as the CONNECT server --------------------------------------


def client_failed_re(target: str) -> str:
    """The hbone-client's warning for a failed tunnel to ``target``."""
    return (
        rf"tunnel for \S+ to {re.escape(target)} via cluster hbone failed: (?P<status>\d+) "
        r"(?P<why>.*); closing the downstream connection"
    )


class NodeServerTests(InteropTestCase):
    """``twistd hbone-client`` forwarding through ``node h2tunnel.mjs server``."""

    async def start_pair(
        self, target: int, *node_args: str
    ) -> tuple[NodeProcess, TwistdProcess]:
        node = spawn_node(self, "server", [
            "--listen", "127.0.0.1:0", *node_args, *self.node_tls("server"),
        ])
        [ready] = await node.wait("out", lambda r: r.get("ready") is True, what="ready line")
        self.assertEqual(ready["mode"], "server")
        client = await start_twistd(
            self,
            "hbone-client",
            ["--server", f"127.0.0.1:{ready['port']}", "--server-identity", SERVER_ID,
             f"--forward=tcp:0:interface=127.0.0.1:backlog=1024=127.0.0.1:{target}",
             *self.pki.args("client")],
            name="hbone-client",
        )
        return node, client

    def assert_no_session_errors(self, node: NodeProcess) -> None:
        for event in ("tls_error", "session_error", "reject"):
            self.assertEqual(node.events(event), [], f"Node logged {event}")

    def assert_tunnel_logs(
        self, tunnels: list[dict[str, Any]], target: int, expected: dict[int, tuple[int, int]]
    ) -> None:
        """
        Node's tunnel log records: one per downstream port in ``expected`` (found by its
        ``forwarded: for="127.0.0.1:PORT"``), each 200, clean, with (bytes up, bytes down).
        """
        by_port: dict[int, dict[str, Any]] = {}
        for t in tunnels:
            self.assertEqual(t["authority"], f"127.0.0.1:{target}", t)
            self.assertEqual(t["status"], 200, t)
            self.assertIsNone(t["upstream_error"], t)
            self.assertIn(t["rst"], (None, "NO_ERROR"), t)
            forwarded = t.get("forwarded")
            self.assertIsNotNone(forwarded, f"no forwarded header reached Node: {t}")
            m = re.fullmatch(r'for="127\.0\.0\.1:(\d+)"', forwarded)
            self.assertIsNotNone(m, f"unexpected forwarded header {forwarded!r}")
            by_port[int(m[1])] = t  # type: ignore[index]
        self.assertEqual(set(by_port), set(expected), "forwarded ports != downstream ports")
        for port, (up, down) in expected.items():
            t = by_port[port]
            self.assertEqual((t["bytes_up"], t["bytes_down"]), (up, down), t)

    @e2e
    async def test_32mib_echoed(self) -> None:
        echo = await start_hashing_echo(self)
        node, client = await self.start_pair(echo.port)
        payload = pseudorandom(32 * MiB, seed=32)
        c, local = await exchange(client.ports["forward_0"], payload, keep=False)
        self.assertEqual(c.sent, len(payload))
        self.assert_echoed(c, payload, node, client)
        self.assertEqual(echo.records, [(len(payload), sha256(payload))])
        tunnels = await node.wait_events("tunnel")
        self.assert_tunnel_logs(tunnels, echo.port, {local: (len(payload), len(payload))})
        [session] = node.events("session")
        self.assertEqual(session["uris"], [CLIENT_ID])
        self.assert_no_session_errors(node)

    @e2e
    async def test_50_concurrent_tunnels(self) -> None:
        echo = await start_hashing_echo(self)
        node, client = await self.start_pair(echo.port)
        payloads = [pseudorandom(64 * 1024 + 7 * i, seed=5000 + i) for i in range(50)]
        results = await gather([exchange(client.ports["forward_0"], p) for p in payloads])
        for (c, _local), payload in zip(results, payloads, strict=True):
            self.assert_echoed(c, payload, node, client)
        self.assertEqual(
            sorted(echo.records), sorted((len(p), sha256(p)) for p in payloads)
        )
        tunnels = await node.wait_events("tunnel", 50)
        self.assert_tunnel_logs(tunnels, echo.port, {
            local: (len(p), len(p)) for (_c, local), p in zip(results, payloads, strict=True)
        })
        self.assertEqual(client.matches(r"tunnel for .* failed"), [])
        self.assert_no_session_errors(node)

    @e2e
    async def test_half_close(self) -> None:
        """
        The downstream sends, shuts down writing, and still gets the sink's reply (the SHA-256
        of what it got) through Node.
        """
        sink = await start_sink(self)
        node, client = await self.start_pair(sink.port)
        payload = pseudorandom(3 * MiB + 17, seed=3)
        c, local = await exchange(client.ports["forward_0"], payload)
        self.assertTrue(c.write_closed)
        self.assertEqual(c.data, sha256(payload).encode("ascii"))
        self.assertTrue(c.eof)
        self.assertTrue(c.closed_cleanly, str(c.reason))
        self.assertEqual(sink.records, [(len(payload), sha256(payload))])
        tunnels = await node.wait_events("tunnel")
        self.assert_tunnel_logs(tunnels, sink.port, {local: (len(payload), 64)})
        self.assert_no_session_errors(node)

    @e2e
    async def test_30_tunnels_over_max_streams_6(self) -> None:
        """
        Node allows 6 concurrent streams per session; 30 downstream connections are made
        before any sends, so 30 tunnels are asked for at once.  Every one succeeds (the
        client waits for a stream slot or opens another connection, it never fails one).
        """
        echo = await start_hashing_echo(self)
        node, client = await self.start_pair(echo.port, "--max-streams", "6")
        port = client.ports["forward_0"]
        clients = [StreamClient(chunk=256 * 1024) for _ in range(30)]
        await gather([connect_tcp(port, c) for c in clients])
        locals_ = [c.transport.getHost().port for c in clients]  # type: ignore[union-attr]
        payloads = [pseudorandom(256 * 1024 + i, seed=600 + i) for i in range(30)]
        for c, payload in zip(clients, payloads, strict=True):
            c.send(payload).addCallback(lambda ok, c=c: c.close_write() if ok else None)
        await gather([closed(c) for c in clients])
        for c, payload in zip(clients, payloads, strict=True):
            self.assert_echoed(c, payload, node, client)
        self.assertEqual(
            sorted(echo.records), sorted((len(p), sha256(p)) for p in payloads)
        )
        tunnels = await node.wait_events("tunnel", 30)
        self.assert_tunnel_logs(tunnels, echo.port, {
            local: (len(p), len(p)) for local, p in zip(locals_, payloads, strict=True)
        })
        self.assertEqual(client.matches(r"tunnel for .* failed"), [])
        sessions = node.events("session")
        self.assertGreaterEqual(len(sessions), 1)
        self.assertEqual({tuple(s["uris"]) for s in sessions}, {(CLIENT_ID,)})
        self.assert_no_session_errors(node)

    @e2e
    async def test_client_identity_rejected_by_node(self) -> None:
        """
        Node drops sessions whose client SPIFFE ID lacks its required prefix: the tunnel
        fails, hbone-client closes the downstream connection, nothing reaches the target.
        """
        echo = await start_hashing_echo(self)
        prefix = "spiffe://cluster.local/ns/trusted/"
        node, client = await self.start_pair(echo.port, "--require-spiffe-prefix", prefix)
        c, _local = await exchange(client.ports["forward_0"], b"let me through\n")
        self.assertEqual(c.nbytes, 0, f"got data through a rejected session: {c.data!r}")
        self.assertIsNotNone(c.reason)
        m = await client.wait_for(client_failed_re(f"127.0.0.1:{echo.port}"))
        self.assertEqual(m["status"], "503", m.string)
        [reject] = await node.wait_events("reject")
        self.assertEqual((reject["uris"], reject["prefix"]), ([CLIENT_ID], prefix))
        self.assertEqual(node.events("tunnel"), [])
        self.assertEqual(echo.connections_made, 0)
