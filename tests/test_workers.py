"""
``--workers``: the supervisor's logic (spawning, restarts with backoff, signals, stopping, log
relay, stats) on a fake reactor, the workers' stats merge, a worker's command channel, the
worker tag in the process log, and the option and YAML key.  The real processes are
tests/test_e2e_workers.py.
"""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from hbonex.bootstrap import Bootstrap
from hbonex.cli import client_tap, server_tap
from hbonex.config import load_bootstrap
from hbonex.errors import ConfigError
from hbonex.observability import process_log
from hbonex.observability.admin import Admin
from hbonex.observability.stats import Family
from hbonex.workers import resolve_workers
from hbonex.workers.stats_merge import StatsMerge
from hbonex.workers.supervisor import KILL_GRACE, STATS_TIMEOUT, Backoff, SupervisorService
from hbonex.workers.worker import WORKER_ENV, Control, WorkerSpec, worker_spec
from tests.test_e2e_workers import YAML


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.written: list[tuple[int, bytes]] = []

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append((fd, data))


class FakeReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self._exitSignal: int | None = None

    def spawnProcess(self, proto: Any, executable: str, args: Any, env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False,
                     childFDs: Any = None) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        proto.makeConnection(process)
        self.spawned.append({"proto": proto, "process": process, "executable": executable,
                             "args": args, "env": env, "childFDs": childFDs})
        return process

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.callLater(0, f, *args)


def ended(proto: Any, status: int | None = None, sig: int | None = None) -> None:
    if status == 0:
        proto.processEnded(Failure(ierror.ProcessDone(0)))
    else:
        proto.processEnded(Failure(ierror.ProcessTerminated(status, sig)))


def snap(values: dict[str, int], gauges: tuple[str, ...] = (),
         families: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"values": values, "gauges": list(gauges), "families": families or []}


class SupervisorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.service = SupervisorService(
            Bootstrap(self.reactor), 2, ["-c", "run twistd", "hbone-server", "--workers", "2"],
            executable="/usr/bin/python3", environ={"PATH": "/bin"}, drain_timeout=3.0)
        self.out = io.StringIO()
        self.service.log_out = self.out
        self.events: list[dict[str, Any]] = []
        self.service.log = Logger(observer=self.events.append)
        self.service.startService()
        self.addCleanup(self.stop_if_running)

    def stop_if_running(self) -> None:
        if self.service.running:
            self.service.stopService()
            for proc in list(self.service.procs.values()):
                ended(proc, 0)

    def proto(self, index: int) -> Any:
        return self.service.procs[index]

    def test_starts_n_workers_running_the_same_command(self) -> None:
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, spawned in enumerate(self.reactor.spawned):
            self.assertEqual(spawned["args"], ["/usr/bin/python3", "-c", "run twistd",
                                               "hbone-server", "--workers", "2"])
            self.assertEqual(spawned["env"]["PATH"], "/bin")
            spec = WorkerSpec.from_env(spawned["env"][WORKER_ENV])
            self.assertEqual(spec, WorkerSpec(index, {}))
            self.assertEqual(spawned["childFDs"], {0: "w", 1: "r", 2: "r", 3: "r"})
        self.assertIn("worker 1 started (pid 1001)", [formatEvent(e) for e in self.events])

    def test_listening_sockets_are_passed_after_the_control_fds(self) -> None:
        self.service.sockets = {"b": (9, 10), "a": (7, 2)}
        self.service._spawn(0)
        spawned = self.reactor.spawned[-1]
        self.assertEqual(spawned["childFDs"], {0: "w", 1: "r", 2: "r", 3: "r", 4: 7, 5: 9})
        self.assertEqual(WorkerSpec.from_env(spawned["env"][WORKER_ENV]),
                         WorkerSpec(0, {"a": (4, 2), "b": (5, 10)}))

    def test_a_dead_worker_is_restarted_after_a_growing_delay(self) -> None:
        self.service.sockets = {"hbone": (7, 2)}  # still listening
        ended(self.proto(0), sig=9)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.05)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.06)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertIs(self.service.procs[0], self.reactor.spawned[2]["proto"])
        # Dies young again: twice the delay.
        ended(self.proto(0), status=1)
        self.reactor.advance(0.15)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.reactor.advance(0.06)
        self.assertEqual(len(self.reactor.spawned), 4)
        # One that lived past the stable time starts the count again.
        self.reactor.advance(60)
        ended(self.proto(0), status=1)
        self.reactor.advance(0.11)
        self.assertEqual(len(self.reactor.spawned), 5)
        self.assertEqual(self.reactor.spawned[4]["proto"].index, 0)

    def test_backoff_is_bounded(self) -> None:
        backoff = Backoff(first=0.1, cap=30.0, stable=10.0)
        delays = [backoff.next_delay(lived=0.5) for _ in range(12)]
        self.assertEqual(delays[:4], [0.1, 0.2, 0.4, 0.8])
        self.assertEqual(delays[-1], 30.0)
        self.assertEqual(backoff.next_delay(lived=11.0), 0.1)

    def test_stop_forwards_sigterm_and_waits_for_every_worker(self) -> None:
        self.reactor._exitSignal = signal.SIGTERM
        d = self.service.stopService()
        self.assertEqual([s["process"].signals for s in self.reactor.spawned],
                         [["TERM"], ["TERM"]])
        ended(self.proto(0), 0)
        self.assertNoResult(d)
        self.reactor.advance(60)  # no restart while stopping (and no kill: it exited)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.spawned[0]["process"].signals, ["TERM"])
        ended(self.proto(1), 0)
        self.successResultOf(d)
        self.assertIsNone(self.reactor._exitSignal)  # a drained SIGTERM exits 0

    def test_sigint_is_forwarded_as_sigint(self) -> None:
        self.reactor._exitSignal = signal.SIGINT
        self.service.stopService()
        self.assertEqual(self.reactor.spawned[0]["process"].signals, ["INT"])

    def test_a_pending_restart_is_cancelled_by_stop(self) -> None:
        self.service.sockets = {"hbone": (7, 2)}
        ended(self.proto(0), sig=9)
        d = self.service.stopService()
        ended(self.proto(1), 0)
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_workers_that_do_not_stop_are_killed(self) -> None:
        d = self.service.stopService()
        self.reactor.advance(3.0 + KILL_GRACE - 0.01)
        self.assertEqual(self.reactor.spawned[1]["process"].signals, ["TERM"])
        self.reactor.advance(0.01)
        self.assertEqual(self.reactor.spawned[1]["process"].signals, ["TERM", "KILL"])
        ended(self.proto(0), sig=9)
        ended(self.proto(1), sig=9)
        self.successResultOf(d)

    def test_sighup_is_forwarded(self) -> None:
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler)
        handler(signal.SIGHUP, None)
        self.reactor.advance(0)
        self.assertEqual([s["process"].signals for s in self.reactor.spawned],
                         [["HUP"], ["HUP"]])

    def test_sighup_handler_is_restored_on_stop(self) -> None:
        ours = signal.getsignal(signal.SIGHUP)
        self.stop_if_running()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), ours)

    def test_worker_lines_are_relayed_whole_and_stderr_is_tagged(self) -> None:
        proto = self.proto(1)
        proto.childDataReceived(1, b"2026 [worker-1 x#info] one\n2026 [worker-1 x#info] tw")
        self.assertNotIn("tw", self.out.getvalue())
        proto.childDataReceived(1, b"o\n")
        proto.childDataReceived(2, b"Traceback (most recent call last):\n")
        self.assertIn("2026 [worker-1 x#info] one\n2026 [worker-1 x#info] two\n"
                      "[worker-1 stderr] Traceback (most recent call last):\n",
                      self.out.getvalue())

    def test_drain_is_forwarded_and_stops_restarts(self) -> None:
        self.service.sockets = {"hbone": (7, 2)}
        self.service.drain(graceful=True)
        self.assertEqual(self.reactor.spawned[0]["process"].written,
                         [(0, b"drain graceful\n")])
        ended(self.proto(0), sig=9)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_log_levels_are_forwarded(self) -> None:
        self.service.set_log_level(LogLevel.warn, "hbonex.tunnel")
        self.assertEqual(self.reactor.spawned[1]["process"].written,
                         [(0, b"log warn hbonex.tunnel\n")])

    def test_stats_are_gathered_and_summed(self) -> None:
        d = self.service.gather_stats()
        self.assertEqual(self.reactor.spawned[0]["process"].written, [(0, b"stats\n")])
        self.proto(0).childDataReceived(3, json.dumps(snap(
            {"listener.a.downstream_cx_total": 3, "listener.a.downstream_cx_active": 1},
            gauges=("listener.a.downstream_cx_active",))).encode() + b"\n")
        self.assertNoResult(d)
        self.proto(1).childDataReceived(3, json.dumps(snap(
            {"listener.a.downstream_cx_total": 4, "listener.a.downstream_cx_active": 2},
            gauges=("listener.a.downstream_cx_active",))).encode() + b"\n")
        merged = self.successResultOf(d)
        self.assertEqual(merged.values, {"listener.a.downstream_cx_active": 3,
                                         "listener.a.downstream_cx_total": 7})
        self.assertTrue(merged.is_gauge("listener.a.downstream_cx_active"))
        # A worker that exits leaves its counters, not its gauges.
        ended(self.proto(0), sig=9)
        d = self.service.gather_stats()
        self.reactor.advance(STATS_TIMEOUT)  # worker 1 does not answer: its last answer
        self.assertEqual(self.successResultOf(d).values,
                         {"listener.a.downstream_cx_active": 2,
                          "listener.a.downstream_cx_total": 7})
        # Its late answer is taken as its latest, not given to a finished request.
        self.proto(1).childDataReceived(3, json.dumps(snap(
            {"listener.a.downstream_cx_total": 5})).encode() + b"\n")
        self.assertEqual(self.service.procs[1].last_stats["values"],
                         {"listener.a.downstream_cx_total": 5})
        # One that exits while asked counts once (in the retired counts).
        d = self.service.gather_stats()
        ended(self.proto(1), sig=9)
        self.assertEqual(self.successResultOf(d).values,
                         {"listener.a.downstream_cx_total": 8})

    def test_admin_stats_are_the_workers_sums(self) -> None:
        admin = Admin(self.service)
        request = DummyRequest([b"stats"])
        request.method = b"GET"
        request.args = {b"filter": [b"cx_total"]}
        resource = admin.site.resource.getChildWithDefault(b"stats", request)
        self.assertEqual(resource.render(request), server.NOT_DONE_YET)
        for index, total in enumerate((2, 5)):
            self.proto(index).childDataReceived(3, json.dumps(snap(
                {"listener.a.downstream_cx_total": total})).encode() + b"\n")
        self.assertEqual(b"".join(request.written), b"listener.a.downstream_cx_total: 7\n")
        self.assertEqual(request.finished, 1)


class StatsMergeTests(unittest.TestCase):
    def test_families_and_expiry_gauges(self) -> None:
        counter = {"name": "istio_requests_total", "kind": "counter", "labels": ["code"],
                   "buckets": [], "doc": "requests", "values": [[["200"], 2]]}
        histogram = {"name": "istio_request_duration_milliseconds", "kind": "histogram",
                     "labels": ["code"], "buckets": [1.0, 5.0], "doc": "duration",
                     "values": [[["200"], [1, 0, 1, 7.5]]]}
        expiry = "listener.a.ssl.certificate.x.expiration_unix_time_seconds"
        merge = StatsMerge()
        merged = merge.merge([
            snap({expiry: 2000}, (expiry,), [counter, histogram]),
            snap({expiry: 1000}, (expiry,), [counter, histogram]),
        ])
        self.assertEqual(merged.values, {expiry: 1000})
        self.assertEqual(merged.families["istio_requests_total"].values, {("200",): 4})
        family: Family = merged.families["istio_request_duration_milliseconds"]
        self.assertEqual(family.histogram(("200",)), ([2, 2], 4, 15.0))
        merge.retire(snap({"a_total": 1}, (), [counter]))
        merged = merge.merge([snap({"a_total": 2}, (), [counter])])
        self.assertEqual(merged.values, {"a_total": 3})
        self.assertEqual(merged.families["istio_requests_total"].values, {("200",): 4})


class WorkerSideTests(unittest.TestCase):
    def test_spec_from_the_environment(self) -> None:
        spec = WorkerSpec(3, {"hbone": (4, 2)})
        self.assertEqual(worker_spec({WORKER_ENV: spec.to_env()}), spec)
        self.assertIsNone(worker_spec({}))

    def test_commands_and_the_supervisor_going_away(self) -> None:
        class Service:
            bootstrap = Bootstrap(Clock())
            running = True
            stopping = False
            worker = 1
            drained: list[bool] = []
            levels: list[Any] = []

            def drain(self, graceful: bool) -> None:
                self.drained.append(graceful)

            def set_log_level(self, level: Any, namespace: str = "") -> None:
                self.levels.append((level, namespace))

        service = Service()
        stopped: list[bool] = []
        service.bootstrap.reactor.stop = lambda: stopped.append(True)  # type: ignore[attr-defined]
        control = Control(service)  # type: ignore[arg-type]
        transport = StringTransport()
        control.makeConnection(transport)
        control.dataReceived(b"stats\ndrain graceful\ndrain\nlog warn hbonex.h2\n")
        answer = json.loads(transport.value().decode())
        self.assertIn("values", answer)
        self.assertIn("server.downstream_cx_active", answer["values"])
        self.assertEqual(service.drained, [True, False])
        self.assertEqual(service.levels, [(LogLevel.warn, "hbonex.h2")])
        control.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(stopped, [])
        service.bootstrap.reactor.advance(0)  # type: ignore[attr-defined]
        self.assertEqual(stopped, [True])


class WorkerTagTests(unittest.TestCase):
    def test_text_and_json_lines_name_the_worker(self) -> None:
        for fmt in ("text", "json"):
            out = io.StringIO()
            publisher = LogPublisher(process_log.make_observer(
                fmt, out, process_log.LogControl(), worker=2))
            log = Logger(namespace="hbonex.x", observer=publisher)
            log.info("{line}", line="one tunnel")
            log.info("two {n}", n=2)
            lines = out.getvalue().splitlines()
            if fmt == "json":
                self.assertEqual([json.loads(x)["worker"] for x in lines], [2, 2])
            else:
                self.assertRegex(lines[0], r"^\S+ \[worker-2 hbonex\.x#info\] one tunnel$")
                self.assertRegex(lines[1], r"^\S+ \[worker-2 hbonex\.x#info\] two 2$")


class WorkersOptionTests(unittest.TestCase):
    def test_counts(self) -> None:
        self.assertEqual(resolve_workers("3"), 3)
        self.assertEqual(resolve_workers(0, cpu_count=lambda: 6), 6)
        self.assertEqual(resolve_workers("0", cpu_count=lambda: None), 1)
        for bad in ("-1", "x", "", True, 1.5, -2):
            with self.assertRaises(ValueError) as e:
                resolve_workers(bad)
            self.assertIn(f"got {bad!r}", str(e.exception))

    def test_flag(self) -> None:
        options = server_tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions,
                                  ["--workers", "-1"])
        self.assertEqual(str(error), "--workers: expected a non-negative integer (0: one per "
                                     "core), got '-1'")
        options = server_tap.Options()
        options.parseOptions(["--workers", "0", "--state-dir", self.mktemp()])
        self.assertEqual(options.workers(None), resolve_workers(0))
        self.assertEqual(options.argv, ["--workers", "0", "--state-dir", options["state-dir"]])

    def config(self, workers: str) -> Path:
        path = Path(self.mktemp())
        path.write_text(YAML.replace("ECHO_PORT", "9").replace(
            "hbonex.workers: 2", f"hbonex.workers: {workers}"))
        return path

    def test_yaml_key_and_the_flag_over_it(self) -> None:
        path = self.config("2")
        options = client_tap.Options()
        options.parseOptions(["--config", str(path)])
        self.assertEqual(options.workers(options.bootstrap), 2)
        options = client_tap.Options()
        options.parseOptions(["--config", str(path), "--workers", "1"])
        self.assertEqual(options.workers(options.bootstrap), 1)

    def test_bad_yaml_value(self) -> None:
        path = self.config('"x"')
        error = self.assertRaises(ConfigError, load_bootstrap, str(path), Clock())
        self.assertIn("hbonex.workers: expected a non-negative integer, got 'x'", str(error))
        self.assertIn("layered_runtime.layers[0].static_layer", str(error))


class TwistedInternalsTests(unittest.TestCase):
    def test_reactor_records_the_exit_signal(self) -> None:
        """
        Pin: the supervisor forwards the signal the reactor stopped for, read from Twisted's
        private ``_exitSignal`` (set by sigTerm/sigInt, and what twistd re-raises on exit).
        """
        from twisted.internet.selectreactor import SelectReactor

        for handler, number in (("sigTerm", signal.SIGTERM), ("sigInt", signal.SIGINT)):
            reactor = SelectReactor()
            self.addCleanup(reactor.waker.connectionLost, None)
            self.assertIsNone(reactor._exitSignal)
            getattr(reactor, handler)(number)
            self.assertEqual(reactor._exitSignal, number)
