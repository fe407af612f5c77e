"""
The supervisor of ``--workers N``: it binds every kernel listener once (so a port 0 listener
is one port, logged once with its real port), stops accepting on it itself, and runs N workers
(``worker.py``) that inherit the listening sockets and accept on them: the kernel hands each
new connection to one of them.  It restarts a worker that dies (after a delay that doubles
while the worker keeps dying young), forwards SIGTERM/SIGINT (the drain) and SIGHUP
(certificate reload), relays the workers' log lines into its own log, serves the admin
endpoint with the workers' stats summed, and exits once every worker has exited.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet import error as ierror
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from hbonex.bootstrap import Bootstrap, ProxyService
from hbonex.network.listener import Listener
from hbonex.sighup import SighupHook
from hbonex.workers.stats_merge import MergedStats, StatsMerge
from hbonex.workers.worker import CONTROL_IN, CONTROL_OUT, WORKER_ENV, WorkerSpec

#: Endpoint kinds whose sockets workers can adopt (TLS is the filter chain's, not the port's).
ADOPTABLE = ("tcp", "tcp6", "unix")
#: How long the admin waits for a worker's stats before using its last answer.
STATS_TIMEOUT = 2.0
#: After the drain timeout, how long stopping workers get before SIGKILL.
KILL_GRACE = 5.0


class Backoff:
    """
    One worker slot's restart delays: ``first``, doubling up to ``cap`` while the worker
    keeps dying within ``stable`` seconds of its start, so a crash loop does not spin; a
    worker that lived longer starts the count again.
    """

    def __init__(self, first: float = 0.1, cap: float = 30.0, stable: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self.stable = stable
        self.failures = 0

    def next_delay(self, lived: float) -> float:
        if lived >= self.stable:
            self.failures = 0
        delay = min(self.cap, self.first * 2 ** self.failures)
        self.failures += 1
        return delay


class WorkerProcess(protocol.ProcessProtocol):
    """One running worker: its output relayed line by line, its stats answers, its end."""

    def __init__(self, supervisor: SupervisorService, index: int, started: float) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.pid: int | None = None
        self._partial: dict[int, bytes] = {}
        self._pending: list[defer.Deferred[Any]] = []
        #: The worker's last stats answer (what it leaves behind when it exits).
        self.last_stats: dict[str, Any] | None = None
        self.exited = False

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, self._partial[childFD] = (self._partial.get(childFD, b"") + data).split(b"\n")
        for line in lines:
            self._line(childFD, line)

    def _line(self, fd: int, line: bytes) -> None:
        if fd == CONTROL_OUT:
            self._answer(line)
        else:
            self.supervisor.relay(self.index, fd, line)

    def _answer(self, line: bytes) -> None:
        try:
            self.last_stats = json.loads(line)
        except ValueError:
            return
        while self._pending:
            d = self._pending.pop(0)
            if not d.called:  # not timed out
                d.callback(self.last_stats)
                break

    def send(self, command: str) -> None:
        try:
            self.transport.writeToChild(CONTROL_IN, command.encode() + b"\n")  # type: ignore
        except (OSError, KeyError, AttributeError):
            pass  # exiting: its end is reported by processEnded

    def ask_stats(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self._pending.append(d)
        self.send("stats")
        return d

    def signal(self, sig: str) -> None:
        try:
            self.transport.signalProcess(sig)  # type: ignore[union-attr]
        except (ierror.ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        for fd, rest in sorted(self._partial.items()):
            if rest:
                self._line(fd, rest)
        self._partial.clear()
        pending, self._pending = self._pending, []
        self.supervisor.worker_exited(self, reason)  # its counts retired first
        for d in pending:
            if not d.called:
                d.callback(None)


def _why(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        return f"killed by signal {sig}"
    return f"exit status {getattr(value, 'exitCode', '?')}"


class SupervisorService(ProxyService):
    log = Logger()

    def __init__(
        self,
        bootstrap: Bootstrap,
        workers: int,
        command: list[str],
        *,
        executable: str = sys.executable,
        environ: dict[str, str] | None = None,
        backoff: Callable[[], Backoff] = Backoff,
        **kwargs: Any,
    ) -> None:
        super().__init__(bootstrap, **kwargs)
        # The workers watch the certificate files; the supervisor serves no TLS.
        self.removeService(self.certificates)
        self.count = workers
        #: The worker's argv after the executable: the supervisor's own twistd command.
        self.command = command
        self.executable = executable
        self.environ = dict(os.environ if environ is None else environ)
        self.procs: dict[int, WorkerProcess] = {}
        self.backoffs = {index: backoff() for index in range(workers)}
        self.restarts: dict[int, Any] = {}
        #: Listener name -> (listening fd, address family), while the workers may use them.
        self.sockets: dict[str, tuple[int, int]] = {}
        self.stats = StatsMerge()
        self.stopping = False
        self._exit_waiters: list[defer.Deferred[None]] = []
        self._sighup = SighupHook(lambda: self.signal_all("HUP"))

    @property
    def reactor(self) -> Any:
        return self.bootstrap.reactor

    # -- listening sockets --------------------------------------------------------------------

    def _open_port(self, listener: Listener) -> defer.Deferred[Any]:
        kind = (listener.endpoint or "").split(":", 1)[0]
        if kind not in ADOPTABLE:
            prefix = f"{self.source}: " if self.source else ""
            raise SystemExit(
                f"twistd: error: {prefix}{self.bootstrap.listener_paths[listener.name]}: "
                f"--workers needs a tcp, tcp6 or unix listener, not {listener.endpoint!r}")

        def hold(port: Any) -> Any:
            # The supervisor never accepts: the kernel queues connections for the workers.
            port.stopReading()
            self.sockets[listener.name] = (port.fileno(), port.addressFamily)
            return port

        return super()._open_port(listener).addCallback(hold)

    def startService(self) -> None:
        super().startService()
        self._sighup.start(self.reactor)
        for index in range(self.count):
            self._spawn(index)

    # -- workers ------------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        child_fds: dict[int, Any] = {CONTROL_IN: "w", 1: "r", 2: "r", CONTROL_OUT: "r"}
        listeners = {}
        for offset, (name, (fd, family)) in enumerate(sorted(self.sockets.items())):
            child_fds[CONTROL_OUT + 1 + offset] = fd
            listeners[name] = (CONTROL_OUT + 1 + offset, family)
        env = {**self.environ, WORKER_ENV: WorkerSpec(index, listeners).to_env()}
        proc = WorkerProcess(self, index, self.reactor.seconds())
        self.reactor.spawnProcess(proc, self.executable, [self.executable, *self.command],
                                  env=env, childFDs=child_fds)
        self.procs[index] = proc
        self.log.info("worker {index} started (pid {pid})", index=index, pid=proc.pid)

    def worker_exited(self, proc: WorkerProcess, reason: Failure) -> None:
        self.stats.retire(proc.last_stats)
        if self.procs.get(proc.index) is proc:
            del self.procs[proc.index]
        why = _why(reason)
        if self.stopping or not self.sockets:
            self.log.info("worker {index} (pid {pid}) exited: {why}",
                          index=proc.index, pid=proc.pid, why=why)
            if not self.procs:
                waiters, self._exit_waiters = self._exit_waiters, []
                for d in waiters:
                    d.callback(None)
            return
        delay = self.backoffs[proc.index].next_delay(self.reactor.seconds() - proc.started)
        self.log.warn("worker {index} (pid {pid}) exited: {why}; restarting it in {delay}s",
                      index=proc.index, pid=proc.pid, why=why, delay=round(delay, 2))
        self.restarts[proc.index] = self.reactor.callLater(delay, self._spawn, proc.index)

    def relay(self, index: int, fd: int, line: bytes) -> None:
        """A worker's log line, into the supervisor's log (its stderr tagged as such)."""
        text = line.decode("utf-8", "replace")
        if fd != 1:
            text = f"[worker-{index} stderr] {text}"
        out = self.log_out or sys.stdout
        try:
            out.write(text + "\n")
            out.flush()
        except (OSError, ValueError):
            pass

    def send_all(self, command: str) -> None:
        for proc in list(self.procs.values()):
            proc.send(command)

    def signal_all(self, sig: str) -> None:
        for proc in list(self.procs.values()):
            proc.signal(sig)

    # -- the admin's levers -------------------------------------------------------------------

    def drain(self, graceful: bool = True) -> None:
        super().drain(graceful)
        self.sockets = {}  # closed: a worker that dies now is not replaced
        self.send_all("drain graceful" if graceful else "drain")

    def set_log_level(self, level: LogLevel, namespace: str = "") -> None:
        super().set_log_level(level, namespace)
        self.send_all(f"log {level.name} {namespace}".rstrip())

    def gather_stats(self) -> defer.Deferred[MergedStats]:
        """Every live worker's stats (or its last answer, if it is slow), summed."""
        procs = list(self.procs.values())
        asks = [p.ask_stats().addTimeout(STATS_TIMEOUT, self.reactor,
                                         onTimeoutCancel=lambda *_: None)
                for p in procs]

        def merge(answers: list[Any]) -> MergedStats:
            # A worker that exited meanwhile is in the retired counts already.
            snaps = [a if a is not None else p.last_stats
                     for a, p in zip(answers, procs, strict=True) if not p.exited]
            return self.stats.merge([s for s in snaps if s is not None])

        return defer.gatherResults(asks).addCallback(merge)

    # -- stopping -----------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[Any]:
        self.stopping = True
        self._sighup.stop()
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        exit_signal = getattr(self.reactor, "_exitSignal", None)
        self.signal_all("INT" if exit_signal == signal.SIGINT else "TERM")
        self.sockets = {}
        stopped = super().stopService()
        exited: defer.Deferred[None] = defer.Deferred()
        if self.procs:
            self._exit_waiters.append(exited)
        else:
            exited.callback(None)
        killer = self.reactor.callLater(self.drain_timeout + KILL_GRACE, self._kill_all)
        exited.addBoth(lambda result: killer.cancel() if killer.active() else None)
        return defer.DeferredList([stopped, exited])

    def _kill_all(self) -> None:
        for proc in list(self.procs.values()):
            self.log.warn("worker {index} (pid {pid}) did not stop: killed",
                          index=proc.index, pid=proc.pid)
        self.signal_all("KILL")


__all__ = ["Backoff", "SupervisorService", "WorkerProcess"]
