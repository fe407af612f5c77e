"""
One worker process of ``--workers N``: the supervisor's own twistd command, run again with
the environment variable ``HBONEX_WORKER`` naming the inherited listening sockets.  The worker
accepts on those (it never binds: the supervisor did, so a listener on port 0 is one port for
every worker), takes the supervisor's commands on fd 0 and answers on fd 3, and stops, with the
usual drain, when fd 0 ends: its supervisor is gone, and a worker never outlives it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
from twisted.internet import defer, stdio
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from hbonex.bootstrap import Bootstrap, ProxyService
from hbonex.network.listener import Listener

#: The environment variable that makes a twistd process a worker (JSON: WorkerSpec).
WORKER_ENV = "HBONEX_WORKER"
#: The worker's command pipe from the supervisor, and its answer pipe.
CONTROL_IN = 0
CONTROL_OUT = 3


@attrs.frozen
class WorkerSpec:
    index: int
    #: Listener name -> (inherited fd, address family).
    listeners: dict[str, tuple[int, int]]

    def to_env(self) -> str:
        return json.dumps({"index": self.index, "listeners": self.listeners})

    @classmethod
    def from_env(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(int(data["index"]),
                   {name: (int(fd), int(family)) for name, (fd, family)
                    in data["listeners"].items()})


def worker_spec(environ: Any = os.environ) -> WorkerSpec | None:
    """This process's WorkerSpec when a supervisor started it, else None."""
    text = environ.get(WORKER_ENV)
    return WorkerSpec.from_env(text) if text else None


class Control(LineOnlyReceiver):
    """
    The supervisor's commands, one per line: ``stats`` (answered with one JSON line),
    ``drain`` / ``drain graceful``, ``log LEVEL [NAMESPACE]``.
    """

    delimiter = b"\n"
    log = Logger()

    def __init__(self, service: WorkerService) -> None:
        self.service = service

    def lineReceived(self, line: bytes) -> None:
        command, *args = line.decode("utf-8", "replace").split()
        if command == "stats":
            from hbonex.workers.stats_merge import snapshot

            self.sendLine(json.dumps(snapshot(self.service.bootstrap)).encode())
        elif command == "drain":
            self.service.drain(graceful=args == ["graceful"])
        elif command == "log" and args:
            level = LogLevel.levelWithName(args[0])
            self.service.set_log_level(level, args[1] if len(args) > 1 else "")

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.service.running and not self.service.stopping:
            self.log.info("worker {worker}: the supervisor is gone, stopping",
                          worker=self.service.worker)
            reactor = self.service.bootstrap.reactor
            reactor.callLater(0, reactor.stop)


class WorkerService(ProxyService):
    def __init__(self, bootstrap: Bootstrap, spec: WorkerSpec, **kwargs: Any) -> None:
        super().__init__(bootstrap, **kwargs)
        self.spec = spec
        self.worker = spec.index
        self.admin_endpoint = ""  # the supervisor's admin answers for every worker
        self.stopping = False
        self.control: Any = None

    def _open_port(self, listener: Listener) -> defer.Deferred[Any]:
        inherited = self.spec.listeners.get(listener.name)
        if inherited is None:
            return defer.fail(RuntimeError("the supervisor passed no socket for it"))
        fd, family = inherited
        try:
            port = self.bootstrap.reactor.adoptStreamPort(fd, family, listener.factory)
        except Exception:
            return defer.fail()
        finally:
            os.close(fd)  # adoptStreamPort works on a copy
        return defer.succeed(port)

    def _announce(self, listener: Listener) -> None:
        # Not the "listening on" line: the supervisor logs that once per listener.
        address = self.ports[listener.name].getHost()
        self.log.info("worker {worker} accepting on listener {name} ({host}:{port})",
                      worker=self.worker, name=listener.name,
                      host=getattr(address, "host", "?"), port=getattr(address, "port", "?"))

    def startService(self) -> None:
        super().startService()
        # (mypy reads the Windows StandardIO, which has no stdin/stdout fds.)
        self.control = stdio.StandardIO(  # type: ignore[call-arg]
            Control(self), stdin=CONTROL_IN, stdout=CONTROL_OUT, reactor=self.bootstrap.reactor)

    def stopService(self) -> defer.Deferred[Any]:
        self.stopping = True
        return super().stopService()


__all__ = ["WORKER_ENV", "WorkerService", "WorkerSpec", "worker_spec"]
