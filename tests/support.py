"""
End-to-end test harness: real ``twistd`` processes, real certificates, real loopback sockets.

Everything here runs on the trial reactor and synchronises on process output lines and socket
events only (no sleeps, no fixed delays).

Processes
    ``start_twistd(test, plugin, args)`` spawns ``twistd -n <plugin> ...`` and fires with a
    :class:`TwistdProcess` once its listeners logged their ``listener ... listening on`` lines
    (ports in ``.ports`` / ``.port``).  ``wait_for(regex)`` / ``wait_for_count(regex, n)`` wait
    for output lines; the process is stopped (SIGTERM, then SIGKILL) by a test cleanup that
    waits for it to exit.

Targets (in-process, 127.0.0.1:0)
    ``start_echo``, ``start_sink`` (reads to EOF, answers the SHA-256 hex of what it got),
    ``start_source`` (sends N deterministic bytes, then closes).

Clients
    :class:`StreamClient` (half-closeable, sends with a pull producer, counts and hashes what
    it receives), ``connect_tcp`` / ``connect_tls`` and ``exchange`` (send, half-close, wait
    for the end), :class:`RawTLSClient` (a pyOpenSSL client with or without a certificate) and
    :class:`RawH2Client` (the ``h2`` library over such a TLS connection).

PKI
    ``make_pki(test)``: a CA with server/client/impostor identities and another CA with a
    client identity.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence

import attrs
import h2.config
import h2.connection
import h2.events
from OpenSSL import SSL
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet import error as ierror
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPullProducer,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from hbonex.tls import pki

REPO_ROOT = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "cluster.local"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
IMPOSTOR_ID = "spiffe://cluster.local/ns/default/sa/impostor"

#: How long a wait for a log line (or a socket event) may take before the test fails.
WAIT_TIMEOUT = 20.0
#: How long a stopping process gets after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0

LISTENER_RE = re.compile(
    r"listener (?P<name>\S+) listening on (?P<host>\S+):(?P<port>\d+) \((?P<endpoint>[^)]*)\)"
)
#: The tunnel server's line for a tunnel that ended.
TUNNEL_CLOSED_RE = re.compile(
    r"tunnel from (?P<peer>\S+) \((?P<identity>[^)]*)\) to (?P<target>\S+) closed after "
    r"(?P<duration>[\d.]+)s: (?P<up>\d+) bytes up, (?P<down>\d+) bytes down, (?P<reason>.*)$"
)
#: The tunnel server's line for a refused CONNECT.
TUNNEL_REFUSED_RE = re.compile(
    r"tunnel from (?P<peer>\S+) \((?P<identity>[^)]*)\) to (?P<target>\S+) refused: "
    r"(?P<status>\d+) (?P<reason>.*)$"
)
#: Lines that mean something crashed inside a process.
CRASH_RE = re.compile(r"Traceback \(most recent call last\)|Unhandled [Ee]rror")


def port_of(peer: str) -> int:
    """``127.0.0.1:1234`` / ``[::1]:1234`` -> 1234."""
    return int(peer.rpartition(":")[2])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pseudorandom(size: int, seed: int) -> bytes:
    """``size`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


class WaitTimeout(AssertionError):
    """A wait for a log line or a socket event took too long."""


def _timeout_deferred(
    d: defer.Deferred[Any], timeout: float, describe: Callable[[], str]
) -> defer.Deferred[Any]:
    """Fail ``d`` with a WaitTimeout carrying ``describe()`` if it has not fired in time."""

    def on_timeout(result: Any, t: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise WaitTimeout(f"timed out after {t:g}s: {describe()}")
        return result

    d.addTimeout(timeout, reactor, onTimeoutCancel=on_timeout)
    return d


def e2e(
    f: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[Any], defer.Deferred[None]]:
    """Run an ``async def`` test as a Deferred-returning trial test."""

    @functools.wraps(f)
    def run(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(f(self))

    return run


async def gather(ds: list[Any]) -> list[Any]:
    """Wait for all Deferreds (or coroutines); fail with the first failure."""
    ds = [defer.ensureDeferred(d) for d in ds]
    return await defer.gatherResults(ds, consumeErrors=True).addErrback(
        lambda f: f.value.subFailure  # the first failure itself, not FirstError
    )


# --- twistd processes ------------------------------------------------------------------------


class _LineWaiter:
    def __init__(self, pattern: re.Pattern[str], count: int, start: int) -> None:
        self.pattern = pattern
        self.count = count
        self.scanned = start
        self.matches: list[re.Match[str]] = []
        self.deferred: defer.Deferred[list[re.Match[str]]] = defer.Deferred()


class TwistdProcess(protocol.ProcessProtocol):
    """
    A running ``twistd`` child: its output lines, the ports its listeners bound, and waits for
    output lines.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self._partial = b""
        self._waiters: list[_LineWaiter] = []
        self._exit_waiters: list[defer.Deferred[BaseException]] = []
        self.exit_reason: Failure | None = None
        #: Listener name -> port, in the order the listeners were bound.
        self.ports: dict[str, int] = {}
        self.pid: int | None = None
        #: Whether stop() had to send SIGKILL.
        self.killed = False

    # -- output -------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            self._line(raw.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        index = len(self.lines)
        self.lines.append(line)
        m = LISTENER_RE.search(line)
        if m:
            self.ports[m["name"]] = int(m["port"])
        for waiter in list(self._waiters):
            self._scan(waiter, upto=index + 1)

    def _scan(self, waiter: _LineWaiter, upto: int) -> None:
        while waiter.scanned < upto and len(waiter.matches) < waiter.count:
            m = waiter.pattern.search(self.lines[waiter.scanned])
            waiter.scanned += 1
            if m:
                waiter.matches.append(m)
        if len(waiter.matches) >= waiter.count and not waiter.deferred.called:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            waiter.deferred.callback(waiter.matches)

    def output(self, last: int | None = None) -> str:
        lines = self.lines if last is None else self.lines[-last:]
        tail = [self._partial.decode("utf-8", "replace")] if self._partial else []
        return "\n".join(lines + tail)

    def mark(self) -> int:
        """The index of the next output line (pass as ``start`` to wait only for new lines)."""
        return len(self.lines)

    def matches(self, pattern: str | re.Pattern[str], start: int = 0) -> list[re.Match[str]]:
        """Every match of ``pattern`` in the output lines so far (from line ``start``)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        found = []
        for line in self.lines[start:]:
            m = rx.search(line)
            if m:
                found.append(m)
        return found

    def wait_for_count(
        self,
        pattern: str | re.Pattern[str],
        count: int,
        start: int = 0,
        timeout: float = WAIT_TIMEOUT,
    ) -> defer.Deferred[list[re.Match[str]]]:
        """
        Fire with the first ``count`` matches of ``pattern`` in the output lines (from line
        ``start``), once there are that many; fail with the output if the process exits or
        ``timeout`` passes first.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        waiter = _LineWaiter(rx, count, start)
        self._scan(waiter, upto=len(self.lines))
        if waiter.deferred.called:
            return waiter.deferred
        if self.exit_reason is not None:
            return defer.fail(AssertionError(self._describe_wait(waiter, "the process exited")))
        self._waiters.append(waiter)

        def forget(result: Any) -> Any:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return result

        d = waiter.deferred
        d.addBoth(forget)
        return _timeout_deferred(d, timeout, lambda: self._describe_wait(waiter, "timed out"))

    def wait_for(
        self, pattern: str | re.Pattern[str], start: int = 0, timeout: float = WAIT_TIMEOUT
    ) -> defer.Deferred[re.Match[str]]:
        """Fire with the first match of ``pattern`` in an output line (from line ``start``)."""
        d = self.wait_for_count(pattern, 1, start, timeout)
        return d.addCallback(lambda ms: ms[0])

    def _describe_wait(self, waiter: _LineWaiter, why: str) -> str:
        return (
            f"{self.name}: {why} waiting for {waiter.count} line(s) matching "
            f"{waiter.pattern.pattern!r} (found {len(waiter.matches)}); output:\n"
            f"{self.output(last=200)}"
        )

    @property
    def port(self) -> int:
        """The port of the first listener."""
        return next(iter(self.ports.values()))

    def crashes(self) -> list[str]:
        return [line for line in self.lines if CRASH_RE.search(line)]

    # -- lifetime -----------------------------------------------------------------------------

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            partial, self._partial = self._partial, b""
            self._line(partial.decode("utf-8", "replace"))
        self.exit_reason = reason
        for waiter in list(self._waiters):
            self._waiters.remove(waiter)
            if not waiter.deferred.called:
                waiter.deferred.errback(
                    AssertionError(self._describe_wait(waiter, "the process exited"))
                )
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(reason.value)

    def wait_exit(self) -> defer.Deferred[BaseException]:
        """Fire with the exit status (ProcessDone or ProcessTerminated) once it exited."""
        if self.exit_reason is not None:
            return defer.succeed(self.exit_reason.value)
        d: defer.Deferred[BaseException] = defer.Deferred()
        self._exit_waiters.append(d)
        return d

    @property
    def running(self) -> bool:
        return self.exit_reason is None

    def signal(self, name: str) -> None:
        if self.running:
            try:
                self.transport.signalProcess(name)  # type: ignore[union-attr]
            except ierror.ProcessExitedAlready:
                pass

    def stop(self, timeout: float = STOP_TIMEOUT) -> defer.Deferred[BaseException]:
        """SIGTERM; SIGKILL if still running after ``timeout``; fire once it exited."""
        if not self.running:
            return self.wait_exit()
        self.signal("TERM")

        def kill() -> None:
            self.killed = True
            self.signal("KILL")

        killer = reactor.callLater(timeout, kill)

        def exited(reason: BaseException) -> BaseException:
            if killer.active():
                killer.cancel()
            return reason

        return self.wait_exit().addCallback(exited)


def twistd_argv(plugin: str, args: list[str], options: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "--logfile=-",
        *options,
        plugin,
        *args,
    ]


def start_twistd(
    test: Any,
    plugin: str,
    args: list[str],
    env: dict[str, str] | None = None,
    listeners: int = 1,
    name: str | None = None,
    check_crashes: bool = True,
    twistd_options: Sequence[str] = (),
) -> defer.Deferred[TwistdProcess]:
    """
    Spawn ``twistd -n <plugin> <args>`` (repo root on PYTHONPATH, HBONEX_STATE_DIR a temp dir)
    and fire with its :class:`TwistdProcess` once ``listeners`` listener lines appeared.

    A cleanup stops the process and waits for it to exit; it fails the test if the process
    needed SIGKILL and, with ``check_crashes``, if the output shows a traceback or an
    unhandled error. ``twistd_options`` go before the plugin (e.g. ``--reactor=epoll``).
    """
    proc = TwistdProcess(name or plugin)
    workdir = Path(test.mktemp()).resolve()
    workdir.mkdir(parents=True)
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    child_env["HBONEX_STATE_DIR"] = str(workdir / "state")
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    reactor.spawnProcess(
        proc, sys.executable, twistd_argv(plugin, args, twistd_options), env=child_env,
        path=str(workdir),
    )

    def cleanup() -> defer.Deferred[None]:
        def check(_: Any) -> None:
            if proc.killed:
                raise AssertionError(
                    f"{proc.name} did not stop within {STOP_TIMEOUT:g}s of SIGTERM; output:\n"
                    f"{proc.output(last=200)}"
                )
            crashes = proc.crashes()
            if check_crashes and crashes:
                raise AssertionError(
                    f"{proc.name} logged a crash:\n{crashes[0]}\noutput:\n{proc.output(last=200)}"
                )

        return proc.stop().addCallback(check)

    test.addCleanup(cleanup)
    d = proc.wait_for_count(LISTENER_RE, listeners)
    return d.addCallback(lambda _: proc)


# --- sockets of a process --------------------------------------------------------------------

#: /proc/net/tcp state codes.
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
              "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


@attrs.frozen
class SocketInfo:
    state: str
    local_port: int
    remote_port: int


def sockets_of(pid: int) -> list[SocketInfo]:
    """
    The TCP sockets process ``pid`` holds open (its fds matched to /proc/net/tcp{,6} by
    inode: /proc/<pid>/net/tcp alone lists the whole network namespace).
    """
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    result = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                result.append(SocketInfo(
                    TCP_STATES.get(fields[3], fields[3]),
                    int(fields[1].rsplit(":", 1)[1], 16),
                    int(fields[2].rsplit(":", 1)[1], 16),
                ))
    return result


def connections_to(pid: int, port: int, states: tuple[str, ...] = ("ESTABLISHED",)) -> int:
    """How many of ``pid``'s sockets connect to 127.0.0.1:``port`` in one of ``states``."""
    return sum(1 for s in sockets_of(pid) if s.remote_port == port and s.state in states)


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_until(
    predicate: Callable[[], bool], what: Callable[[], str] | str,
    timeout: float = WAIT_TIMEOUT, interval: float = 0.05,
) -> None:
    """
    Poll ``predicate`` (something outside this process: another process's sockets) until it
    holds; fail with WaitTimeout after ``timeout`` seconds.
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            text = what() if callable(what) else what
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {text}")
        await task.deferLater(reactor, interval, lambda: None)


# --- PKI -------------------------------------------------------------------------------------


@attrs.frozen
class TestPKI:
    """
    ``root``: the CA (``ca.pem``) with identities ``server``, ``client``, ``impostor``;
    ``other_root``: another CA with an identity ``client``.
    """

    root: Path
    other_root: Path

    @property
    def ca(self) -> Path:
        return self.root / pki.CA_CERT

    @property
    def other_ca(self) -> Path:
        return self.other_root / pki.CA_CERT

    @property
    def both_cas(self) -> Path:
        """A bundle of both CAs."""
        return self.other_root / "both-cas.pem"

    def args(self, name: str, other_ca: bool = False) -> list[str]:
        """
        ``--pki DIR/NAME --ca CA`` for identity ``name``, trusting our main CA; for the other
        CA's identity the bundle has both CAs (hbonex checks its own certificate against it).
        """
        if other_ca:
            return ["--pki", str(self.other_root / name), "--ca", str(self.both_cas)]
        return ["--pki", str(self.root / name), "--ca", str(self.ca)]

    def cert(self, name: str, other_ca: bool = False) -> Path:
        return (self.other_root if other_ca else self.root) / name / pki.LEAF_CERT

    def key(self, name: str, other_ca: bool = False) -> Path:
        return (self.other_root if other_ca else self.root) / name / pki.LEAF_KEY


def make_pki(test: Any) -> TestPKI:
    base = Path(test.mktemp()).resolve()
    root, other = base / "ca", base / "other-ca"
    pki.init_ca(root, TRUST_DOMAIN)
    pki.issue(root, "server", spiffe=SERVER_ID, ip=["127.0.0.1"])
    pki.issue(root, "client", spiffe=CLIENT_ID)
    pki.issue(root, "impostor", spiffe=IMPOSTOR_ID, ip=["127.0.0.1"])
    pki.init_ca(other, TRUST_DOMAIN)
    pki.issue(other, "client", spiffe=CLIENT_ID)
    result = TestPKI(root, other)
    result.both_cas.write_bytes(result.ca.read_bytes() + result.other_ca.read_bytes())
    return result


# --- in-process targets ----------------------------------------------------------------------


class Target(protocol.Factory):
    """
    A listening target server: counts connections and keeps per-connection records.
    """

    noisy = False

    def __init__(self, make: Callable[[Target], protocol.Protocol]) -> None:
        self.make = make
        self.port = 0
        self.listening: Any = None
        self.connections_made = 0
        self.open: set[protocol.Protocol] = set()
        self.records: list[Any] = []
        self._record_waiters: list[tuple[int, defer.Deferred[list[Any]]]] = []
        self._close_waiters: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.connections_made += 1
        proto = self.make(self)
        proto.factory = self
        return proto

    def opened(self, proto: protocol.Protocol) -> None:
        self.open.add(proto)

    def closed(self, proto: protocol.Protocol) -> None:
        self.open.discard(proto)
        if not self.open:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)

    def record(self, value: Any) -> None:
        self.records.append(value)
        for item in list(self._record_waiters):
            count, d = item
            if len(self.records) >= count:
                self._record_waiters.remove(item)
                d.callback(self.records)

    def wait_records(self, count: int, timeout: float = WAIT_TIMEOUT) -> defer.Deferred[list[Any]]:
        """Fire with ``records`` once there are ``count`` of them."""
        if len(self.records) >= count:
            return defer.succeed(self.records)
        d: defer.Deferred[list[Any]] = defer.Deferred()
        item = (count, d)
        self._record_waiters.append(item)

        def forget(result: Any) -> Any:
            if item in self._record_waiters:
                self._record_waiters.remove(item)
            return result

        d.addBoth(forget)
        return _timeout_deferred(
            d, timeout, lambda: f"{count} target records wanted, have {self.records!r}"
        )

    def shutdown(self) -> defer.Deferred[Any]:
        """Stop listening, abort connections still open, wait until they are gone."""
        waits = [defer.maybeDeferred(self.listening.stopListening)]
        if self.open:
            d: defer.Deferred[None] = defer.Deferred()
            self._close_waiters.append(d)
            waits.append(d)
            for proto in list(self.open):
                proto.transport.abortConnection()  # type: ignore[union-attr]
        return defer.gatherResults(waits)


class _TargetProtocol(protocol.Protocol):
    factory: Target

    def connectionMade(self) -> None:
        self.factory.opened(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.closed(self)


@implementer(IHalfCloseableProtocol)
class EchoProtocol(_TargetProtocol):
    """Echoes everything; after EOF, half-closes once the echo is flushed, then closes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        # Backpressure: stop reading while our writes are backed up.
        self.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol)
class SinkProtocol(_TargetProtocol):
    """Reads to EOF, answers the SHA-256 hex of what it got, closes.  Records (n, hex)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.hash = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        digest = self.hash.hexdigest()
        self.factory.record((self.count, digest))
        self.transport.write(digest.encode("ascii"))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(IPullProducer)
class _BytesProducer:
    """Writes ``data`` to ``consumer`` one chunk per resumeProducing (pull backpressure)."""

    def __init__(self, consumer: Any, data: bytes, chunk: int, done: Callable[[bool], None]):
        self.consumer = consumer
        self.view = memoryview(data)
        self.offset = 0
        self.chunk = chunk
        self.done = done
        self.finished = False

    def resumeProducing(self) -> None:
        if self.finished:
            return
        end = min(self.offset + self.chunk, len(self.view))
        if end > self.offset:
            self.consumer.write(bytes(self.view[self.offset : end]))
            self.offset = end
        if self.offset >= len(self.view):
            self.finished = True
            self.consumer.unregisterProducer()
            self.done(True)

    def stopProducing(self) -> None:
        if not self.finished:
            self.finished = True
            self.done(False)


@implementer(IHalfCloseableProtocol)
class SourceProtocol(_TargetProtocol):
    """
    Sends the factory's ``payload`` (with backpressure), then closes; or, with the factory's
    ``half_close``, shuts down its write side and reads (hashing) until EOF before closing.
    Records ``{"sent": n, "received": m, "sha256": hex of what it read}`` per connection.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.hash = hashlib.sha256()
        self.count = 0
        self.sent = 0
        self.eof = False
        payload = self.factory.payload  # type: ignore[attr-defined]
        producer = _BytesProducer(self.transport, payload, 256 * 1024, self._sent)
        self.transport.registerProducer(producer, False)  # type: ignore[union-attr]

    def _record(self) -> None:
        self.factory.record({"sent": self.sent, "received": self.count,
                             "sha256": self.hash.hexdigest()})

    def _sent(self, complete: bool) -> None:
        if not complete:
            return
        self.sent = len(self.factory.payload)  # type: ignore[attr-defined]
        if self.factory.half_close:  # type: ignore[attr-defined]
            self.transport.loseWriteConnection()  # type: ignore[union-attr]
            if self.eof:
                self._finish()
        else:
            self._record()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.factory.half_close and self.sent:  # type: ignore[attr-defined]
            self._finish()

    def _finish(self) -> None:
        self._record()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


#: Listen backlog of the in-process targets (Twisted's default of 50 overflows when a test
#: opens hundreds of tunnels at once, and an overflowed connection may be reset).
TARGET_BACKLOG = 1024


def _listen(test: Any, target: Target) -> defer.Deferred[Target]:
    endpoint = endpoints.TCP4ServerEndpoint(
        reactor, 0, backlog=TARGET_BACKLOG, interface="127.0.0.1"
    )
    d = endpoint.listen(target)

    def listening(port: Any) -> Target:
        target.listening = port
        target.port = port.getHost().port
        test.addCleanup(target.shutdown)
        return target

    return d.addCallback(listening)


def start_echo(test: Any) -> defer.Deferred[Target]:
    return _listen(test, Target(lambda t: EchoProtocol()))


def start_sink(test: Any) -> defer.Deferred[Target]:
    return _listen(test, Target(lambda t: SinkProtocol()))


def start_source(
    test: Any, size: int, seed: int = 1, half_close: bool = False
) -> defer.Deferred[Target]:
    """A source target; its ``payload`` attribute is what every connection receives."""
    target = Target(lambda t: SourceProtocol())
    target.payload = pseudorandom(size, seed)  # type: ignore[attr-defined]
    target.half_close = half_close  # type: ignore[attr-defined]
    return _listen(test, target)


def unused_port(test: Any) -> defer.Deferred[int]:
    """A loopback port that nothing listens on (bound, then released)."""
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    d = endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol))

    def release(port: Any) -> defer.Deferred[int]:
        number = port.getHost().port
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: number)

    return d.addCallback(release)


# --- clients ---------------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class StreamClient(protocol.Protocol):
    """
    A byte-stream client (over TCP or TLS): ``send`` (pull producer), ``close_write``
    (half-close), counts and hashes what it receives (keeping it too with ``keep``), records
    EOF, and fires ``done`` with itself when the connection is gone.

    At EOF it calls ``on_eof(self)`` if set; otherwise it closes the connection once its own
    sending is complete.

    (Not an IHandshakeListener: Twisted's endpoint wrapper would then hide that it is an
    IHalfCloseableProtocol, as ``_WrappingProtocol`` provides only the last interface of
    its list that the wrapped protocol provides.)
    """

    def __init__(self, keep: bool = True, chunk: int = 64 * 1024) -> None:
        self.keep = keep
        self.chunk = chunk
        self.chunks: list[bytes] = []
        self.hash = hashlib.sha256()
        self.nbytes = 0
        self.sent = 0
        self.eof = False
        self.eof_at: int | None = None
        self.write_closed = False
        self.reason: Failure | None = None
        self.on_eof: Callable[[StreamClient], None] | None = None
        self.done: defer.Deferred[StreamClient] = defer.Deferred()
        self._sending = False
        self._close_after_send = False
        self._waiters: list[tuple[Callable[[StreamClient], bool], str, defer.Deferred[Any]]] = []

    # -- receiving ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.hash.update(data)
        if self.keep:
            self.chunks.append(data)
        self._check_waiters()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def hexdigest(self) -> str:
        return self.hash.hexdigest()

    def readConnectionLost(self) -> None:
        self.eof = True
        self.eof_at = self.nbytes
        self._check_waiters()
        if self.on_eof is not None:
            self.on_eof(self)
        elif self._sending:
            self._close_after_send = True
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        # Both directions are shut down: Twisted leaves the final close to the protocol.
        if self.eof:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.reason = reason
        waiters, self._waiters = self._waiters, []
        for predicate, what, d in waiters:
            if predicate(self):
                d.callback(self)
            else:
                d.errback(AssertionError(
                    f"connection lost ({reason.getErrorMessage()}) before {what}; "
                    f"received {self.nbytes} bytes{' and EOF' if self.eof else ''}"
                ))
        self.done.callback(self)

    @property
    def closed_cleanly(self) -> bool:
        return self.reason is not None and self.reason.check(ierror.ConnectionDone) is not None

    # -- waiting ------------------------------------------------------------------------------

    def wait_until(
        self, predicate: Callable[[StreamClient], bool], what: str,
        timeout: float = WAIT_TIMEOUT,
    ) -> defer.Deferred[StreamClient]:
        if predicate(self):
            return defer.succeed(self)
        if self.reason is not None:
            return defer.fail(AssertionError(f"connection already lost before {what}"))
        d: defer.Deferred[StreamClient] = defer.Deferred()
        item = (predicate, what, d)
        self._waiters.append(item)

        def forget(result: Any) -> Any:
            if item in self._waiters:
                self._waiters.remove(item)
            return result

        d.addBoth(forget)
        return _timeout_deferred(
            d, timeout, lambda: f"waiting for {what}; received {self.nbytes} bytes"
        )

    def wait_received(self, n: int, timeout: float = WAIT_TIMEOUT) -> defer.Deferred[Any]:
        return self.wait_until(lambda c: c.nbytes >= n, f"{n} bytes", timeout)

    def wait_contains(self, needle: bytes, timeout: float = WAIT_TIMEOUT) -> defer.Deferred[Any]:
        return self.wait_until(lambda c: needle in c.data, f"{needle!r}", timeout)

    def _check_waiters(self) -> None:
        for item in list(self._waiters):
            predicate, _what, d = item
            if predicate(self) and item in self._waiters:
                self._waiters.remove(item)
                d.callback(self)

    # -- sending ------------------------------------------------------------------------------

    def send(self, data: bytes) -> defer.Deferred[bool]:
        """
        Write ``data`` through a pull producer (a chunk each time the transport's buffer
        drains); fire with True once all was handed to the transport, False if the connection
        went away first.
        """
        d: defer.Deferred[bool] = defer.Deferred()
        self._sending = True

        def finished(complete: bool) -> None:
            self._sending = False
            if complete:
                self.sent += len(data)
            d.callback(complete)
            if self._close_after_send and complete:
                self.transport.loseConnection()  # type: ignore[union-attr]

        if self.reason is not None:
            finished(False)
            return d
        producer = _BytesProducer(self.transport, data, self.chunk, finished)
        self.transport.registerProducer(producer, False)  # type: ignore[union-attr]
        return d

    def close_write(self) -> None:
        self.write_closed = True
        self.transport.loseWriteConnection()  # type: ignore[union-attr]


def connect_tcp(port: int, proto: protocol.Protocol | None = None) -> defer.Deferred[Any]:
    """Connect ``proto`` (default: a new StreamClient) to 127.0.0.1:``port``."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=WAIT_TIMEOUT)
    return endpoints.connectProtocol(endpoint, proto if proto is not None else StreamClient())


def exchange(
    port: int, payload: bytes, keep: bool = True, half_close: bool = True
) -> defer.Deferred[StreamClient]:
    """
    Connect to ``port``, send ``payload``, half-close (unless told not to), fire with the
    client once the connection is gone.
    """
    client = StreamClient(keep=keep)

    def connected(_: Any) -> defer.Deferred[StreamClient]:
        def sent(complete: bool) -> None:
            if complete and half_close and client.reason is None:
                client.close_write()

        client.send(payload).addCallback(sent)
        return client.done

    return connect_tcp(port, client).addCallback(connected)


@implementer(IOpenSSLClientConnectionCreator)
class RawTLSClient:
    """
    A pyOpenSSL client (independent of hbonex.tls.context): trusts ``ca``, presents ``cert``/``key``
    if given, offers ``alpn``.  It checks the server chain, not the server's identity.
    """

    def __init__(
        self,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        alpn: tuple[bytes, ...] = (b"h2",),
    ) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.load_verify_locations(str(ca))
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, x509, errno, depth, ok: bool(ok))
        if cert is not None and key is not None:
            ctx.use_certificate_chain_file(str(cert))
            ctx.use_privatekey_file(str(key))
        if alpn:
            ctx.set_alpn_protos(list(alpn))
        self.context = ctx

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        conn.set_connect_state()
        return conn


def connect_tls(port: int, creator: RawTLSClient, proto: protocol.Protocol) -> defer.Deferred[Any]:
    endpoint = endpoints.wrapClientTLS(
        creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=WAIT_TIMEOUT)
    )
    return endpoints.connectProtocol(endpoint, proto)


@implementer(IHandshakeListener)
class RawH2Client(protocol.Protocol):
    """
    The ``h2`` library over a TLS connection, with outbound header validation off so tests can
    send malformed requests.  Every event is kept in ``events``.
    """

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True, header_encoding=None, validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.events: list[h2.events.Event] = []
        self.data: Counter[int] = Counter()
        self.received: dict[int, list[bytes]] = {}
        self.ready: defer.Deferred[RawH2Client] = defer.Deferred()
        #: Fires with the exception the connection was lost with.
        self.done: defer.Deferred[BaseException] = defer.Deferred()
        self.lost = False
        self._waiters: list[tuple[Callable[[h2.events.Event], bool], defer.Deferred[Any]]] = []

    def handshakeCompleted(self) -> None:
        self.conn.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.lost:
            self.transport.write(data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
            # After our GOAWAY (close()) the server may still finish or reset streams; h2
            # refuses any input once closed.
            return
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.received.setdefault(event.stream_id, []).append(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, h2.events.RemoteSettingsChanged) and not self.ready.called:
                self.ready.callback(self)
            for item in list(self._waiters):
                predicate, d = item
                if predicate(event) and item in self._waiters:
                    self._waiters.remove(item)
                    d.callback(event)
        self._flush()

    def request(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self._flush()
        return sid

    def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.conn.send_data(stream_id, data, end_stream=end_stream)
        self._flush()

    def wait_event(
        self, predicate: Callable[[h2.events.Event], bool], what: str,
        timeout: float = WAIT_TIMEOUT,
    ) -> defer.Deferred[Any]:
        for event in self.events:
            if predicate(event):
                return defer.succeed(event)
        d: defer.Deferred[Any] = defer.Deferred()
        item = (predicate, d)
        self._waiters.append(item)

        def forget(result: Any) -> Any:
            if item in self._waiters:
                self._waiters.remove(item)
            return result

        d.addBoth(forget)
        return _timeout_deferred(d, timeout, lambda: f"waiting for {what}; events {self.events}")

    def wait_answer(self, stream_id: int) -> defer.Deferred[Any]:
        """The first response or reset on ``stream_id``."""
        return self.wait_event(
            lambda e: isinstance(e, (h2.events.ResponseReceived, h2.events.StreamReset))
            and e.stream_id == stream_id,
            f"a response or reset on stream {stream_id}",
        )

    def body(self, stream_id: int) -> bytes:
        return b"".join(self.received.get(stream_id, []))

    def close(self) -> defer.Deferred[BaseException]:
        if not self.lost:
            self.conn.close_connection()
            self._flush()
            self.transport.loseConnection()  # type: ignore[union-attr]
        return self.done

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        if not self.ready.called:
            self.ready.errback(AssertionError(f"connection lost before SETTINGS: {reason}"))
        waiters, self._waiters = self._waiters, []
        for _predicate, d in waiters:
            d.errback(AssertionError(f"connection lost: {reason.getErrorMessage()}"))
        self.done.callback(reason.value)


def response_status(event: Any) -> int | None:
    """``:status`` of a ResponseReceived event, or None."""
    if not isinstance(event, h2.events.ResponseReceived):
        return None
    for name, value in event.headers:
        if name == b":status":
            return int(value)
    return None


__all__ = [
    "CLIENT_ID",
    "IMPOSTOR_ID",
    "SERVER_ID",
    "TUNNEL_CLOSED_RE",
    "TUNNEL_REFUSED_RE",
    "RawH2Client",
    "RawTLSClient",
    "StreamClient",
    "Target",
    "TestPKI",
    "TwistdProcess",
    "connect_tcp",
    "connect_tls",
    "exchange",
    "make_pki",
    "port_of",
    "pseudorandom",
    "sha256",
    "start_echo",
    "start_sink",
    "start_source",
    "start_twistd",
    "unused_port",
]
