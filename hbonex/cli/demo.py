"""
``hbonex demo``: the whole thing on one machine with nothing prepared.

Starts ``twistd hbone-server`` and ``twistd hbone-client`` as real processes (on the dev PKI),
an echo target in this process, pushes traffic through the tunnel, checks every byte with
SHA-256 and prints what happened.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from hbonex.tls import pki

LISTEN_RE = re.compile(r"listener (\S+) listening on (\S+):(\d+)")
TUNNEL_RE = re.compile(r"tunnel from (\S+) \((\S+)\) to (\S+) closed after .*?: (\d+) bytes up")


class TwistdProcess(protocol.ProcessProtocol):
    """
    A twistd child whose log lines we read (to learn its ports and what it did).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self._partial = b""
        self._waiters: list[tuple[re.Pattern[str], defer.Deferred[re.Match[str]]]] = []
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for pattern, d in list(self._waiters):
                m = pattern.search(line)
                if m:
                    self._waiters.remove((pattern, d))
                    d.callback(m)

    errReceived = outReceived

    def wait_for(self, pattern: str, reactor: Any, timeout: float = 30) -> defer.Deferred[Any]:
        regex = re.compile(pattern)
        for line in self.lines:
            m = regex.search(line)
            if m:
                return defer.succeed(m)
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        self._waiters.append((regex, d))
        return d.addTimeout(timeout, reactor)

    def processEnded(self, reason: Any) -> None:
        for _, d in self._waiters:
            d.errback(RuntimeError(f"{self.name} exited:\n" + "\n".join(self.lines[-20:])))
        self._waiters = []
        self.ended.callback(None)

    def stop(self) -> defer.Deferred[None]:
        if not self.ended.called:
            try:
                self.transport.signalProcess("TERM")  # type: ignore[union-attr]
            except Exception:
                pass
        return self.ended


def spawn_twistd(reactor: Any, plugin: str, args: list[str], env: dict[str, str]) -> TwistdProcess:
    proc = TwistdProcess(plugin)
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "--logfile=-", plugin, *args]
    reactor.spawnProcess(proc, sys.executable, argv, env=env)
    return proc


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Pusher(protocol.Protocol):
    """
    Sends ``size`` pseudo-random bytes (hashing them), half-closes, hashes what comes back.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.remaining = size
        self.block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB pattern
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.received_bytes = 0
        self.done: defer.Deferred[Pusher] = defer.Deferred()
        self._paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._pump()

    def _pump(self) -> None:
        while self.remaining > 0 and not self._paused:
            chunk = self.block[: min(len(self.block), self.remaining)]
            self.remaining -= len(chunk)
            self.sent.update(chunk)
            self.transport.write(chunk)  # type: ignore[union-attr]
        if self.remaining == 0 and not self._paused:
            self.remaining = -1
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._paused = True

    def dataReceived(self, data: bytes) -> None:
        self.received_bytes += len(data)
        self.received.update(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self)


def _pid(proc: TwistdProcess) -> object:
    return getattr(proc.transport, "pid", "?")


def _mib(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


@defer.inlineCallbacks
def _push(reactor: Any, port: int, tunnels: int, size: int) -> Any:
    results = []
    started = time.perf_counter()
    for i in range(tunnels):
        pusher = Pusher(size, i)
        creator = protocol.ClientCreator(reactor, lambda p=pusher: p)
        d = creator.connectTCP("127.0.0.1", port).addCallback(lambda p: p.done)
        results.append(d)
    done = yield defer.gatherResults(results, consumeErrors=True)
    return done, time.perf_counter() - started


@defer.inlineCallbacks
def run_demo(reactor: Any, tunnels: int, size: int, state_dir: Optional[str]) -> Any:
    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    if state_dir:
        env["HBONEX_STATE_DIR"] = state_dir
    dev = pki.ensure_dev_pki(state_dir)
    server_id = pki.load_pki_dir(dev / "server").spiffe_id
    client_id = pki.load_pki_dir(dev / "client").spiffe_id
    print("hbonex demo: HBONE (TCP in HTTP/2 CONNECT over mutual TLS) on this machine")
    print(f"  dev PKI        {dev}  (CA, {server_id}, {client_id})")

    target = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    target_port = target.getHost().port
    print(f"  target         echo server on 127.0.0.1:{target_port} (in this process)")
    server = spawn_twistd(reactor, "hbone-server", ["--listen", "127.0.0.1:0"], env)
    client = None
    try:
        m = yield server.wait_for(LISTEN_RE.pattern, reactor)
        server_port = int(m.group(3))
        print(f"  hbone-server   twistd pid {_pid(server)}, mTLS HTTP/2+HTTP/1.1 CONNECT"
              f" on 127.0.0.1:{server_port}")
        client = spawn_twistd(
            reactor, "hbone-client",
            ["--server", f"127.0.0.1:{server_port}",
             "--server-identity", str(server_id),
             "--forward", f"127.0.0.1:0=127.0.0.1:{target_port}"], env,
        )
        m = yield client.wait_for(LISTEN_RE.pattern, reactor)
        forward_port = int(m.group(3))
        print(f"  hbone-client   twistd pid {_pid(client)}, forwarding 127.0.0.1:"
              f"{forward_port} -> tunnel -> 127.0.0.1:{target_port}")

        direct, direct_time = yield _push(reactor, target_port, tunnels, size)
        results, elapsed = yield _push(reactor, forward_port, tunnels, size)
        ok = sum(
            1 for r in results
            if r.received_bytes == size and r.sent.digest() == r.received.digest()
        )
        total = 2 * size * tunnels
        print(f"  traffic        {tunnels} tunnels x {_mib(size)} echoed back: "
              f"{ok}/{tunnels} verified byte for byte (SHA-256 of every byte sent and received)")
        print(f"  throughput     {_mib(total / elapsed)}/s through the tunnel (both directions), "
              f"{_mib(total / direct_time)}/s direct loopback TCP to the same echo server")
        # Wait until the server has logged every tunnel's end.
        deadline = reactor.seconds() + 10
        while (sum(1 for line in server.lines if TUNNEL_RE.search(line)) < tunnels
               and reactor.seconds() < deadline):
            yield task.deferLater(reactor, 0.05, lambda: None)
        seen = [TUNNEL_RE.search(line) for line in server.lines]
        records = [s for s in seen if s]
        identities = sorted({r.group(2) for r in records})
        connections = {r.group(1) for r in records}
        print(f"  server saw     {len(records)} tunnels from {', '.join(identities) or '-'} "
              f"over {len(connections)} HTTP/2 connection(s)")
        print("  result         " + ("OK" if ok == tunnels else "FAILED"))
        return 0 if ok == tunnels else 1
    finally:
        for proc in (client, server):
            if proc is not None:
                yield proc.stop()
        yield target.stopListening()


def add_subcommand(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a server, a client and a target here and push traffic through the tunnel",
    )
    parser.add_argument("--tunnels", type=int, default=8, help="concurrent tunnels (8)")
    parser.add_argument("--mib", type=int, default=16, help="MiB echoed per tunnel (16)")
    parser.add_argument("--state-dir", default=None, metavar="STATE",
                        help=f"where the dev PKI is kept: {pki.DEV_PKI_LOCATION}")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    codes: list[int] = []

    def go(reactor: Any) -> defer.Deferred[Any]:
        d = run_demo(reactor, args.tunnels, args.mib * 1024 * 1024, args.state_dir)
        return d.addCallback(codes.append)

    try:
        task.react(go)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return codes[0] if codes else 1
