"""
``--workers N`` end to end: a real supervisor and its real worker processes sharing one
listening socket.  Which worker served a tunnel is read from its log line's ``worker-N`` tag.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import error as ierror
from twisted.internet import reactor
from twisted.web.client import Agent, readBody

from tests.support import (
    TUNNEL_CLOSED_RE,
    StreamClient,
    TwistdProcess,
    connect_tcp,
    e2e,
    exchange,
    pseudorandom,
    sha256,
    start_echo,
    start_twistd,
    twistd_argv,
    wait_until,
)
from tests.test_e2e_tunnel import E2ETestCase

WORKER_STARTED = r"worker (?P<index>\d+) started \(pid (?P<pid>\d+)\)"
ACCEPTING = r"worker (?P<index>\d+) accepting on listener"
ADMIN_LINE = r"admin listening on 127\.0\.0\.1:(?P<port>\d+)"
#: The worker a line came from: ``TIME [worker-N SYSTEM] ...``.
WORKER_TAG = re.compile(r"\[worker-(?P<index>\d+) ")
#: Connections tried before giving up on seeing a second worker serve one.
SPREAD_BOUND = 60


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def worker_pids(proc: TwistdProcess, start: int = 0) -> dict[int, int]:
    """Worker index -> the pid of its latest start (from line ``start``)."""
    return {int(m["index"]): int(m["pid"]) for m in proc.matches(WORKER_STARTED, start)}


class WorkersTests(E2ETestCase):
    timeout = 90

    async def start_workers(self, *args: str, count: int = 2) -> Any:
        server = await self.start_server("--workers", str(count), *args)
        await server.wait_for_count(ACCEPTING, count)
        return server

    async def one_tunnel(self, client: TwistdProcess, server: TwistdProcess, seed: int) -> str:
        """One tunnel, hashed both ends; the tag of the server worker that carried it."""
        payload = pseudorandom(20000, seed)
        mark = server.mark()
        c = await exchange(self.forward_port(client), payload)
        self.assert_echoed(c, payload, server, client)
        line = (await server.wait_for(TUNNEL_CLOSED_RE, start=mark)).string
        tag = WORKER_TAG.search(line)
        self.assertIsNotNone(tag, line)
        assert tag is not None
        return tag["index"]

    async def admin_get(self, server: TwistdProcess, path: str) -> str:
        port = (await server.wait_for(ADMIN_LINE))["port"]
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        self.assertEqual(response.code, 200)
        return (await readBody(response)).decode()

    @e2e
    async def test_connections_spread_across_workers_and_stats_are_summed(self) -> None:
        echo = await start_echo(self)
        server = await self.start_workers("--admin", "127.0.0.1:0")
        # HTTP/1.1: one TLS connection per tunnel, so each tunnel is a new accept.
        client = await self.start_client(server, [echo.port], "--http1")
        self.assertEqual(len(server.matches(r"listener hbone listening on")), 1)
        served: dict[str, int] = {}
        tunnels = 0
        while len(served) < 2 and tunnels < SPREAD_BOUND:
            tag = await self.one_tunnel(client, server, seed=tunnels)
            served[tag] = served.get(tag, 0) + 1
            tunnels += 1
        self.assertEqual(set(served), {"0", "1"},
                         f"{tunnels} tunnels all served by one worker: {served}")
        text = await self.admin_get(
            server, "/stats?filter=^listener\\.hbone\\.downstream_cx_total$")
        self.assertEqual(text, f"listener.hbone.downstream_cx_total: {tunnels}\n")
        prometheus = await self.admin_get(server, "/stats/prometheus")
        self.assertIn(f'envoy_listener_downstream_cx_total{{envoy_listener_address="hbone"}} '
                      f"{float(tunnels)}", prometheus)

    @e2e
    async def test_killed_worker_is_replaced(self) -> None:
        echo = await start_echo(self)
        server = await self.start_workers()
        client = await self.start_client(server, [echo.port], "--http1")
        old = worker_pids(server)[0]
        mark = server.mark()
        os.kill(old, signal.SIGKILL)
        await server.wait_for(rf"worker 0 \(pid {old}\) exited: killed by signal 9; "
                              r"restarting it in", start=mark)
        new = int((await server.wait_for(WORKER_STARTED.replace(r"(?P<index>\d+)", "0"),
                                         start=mark))["pid"])
        self.assertNotEqual(new, old)
        await server.wait_for(r"worker 0 accepting on listener", start=mark)
        await wait_until(lambda: not alive(old), f"the killed worker {old} gone")
        served = set()
        for seed in range(SPREAD_BOUND):
            served.add(await self.one_tunnel(client, server, seed))
            if "0" in served:
                break
        self.assertIn("0", served, "the new worker 0 never served a tunnel")
        self.assertTrue(alive(new))

    @e2e
    async def test_sigterm_drains_every_worker_then_the_supervisor_exits(self) -> None:
        echo = await start_echo(self)
        server = await self.start_workers("--drain-timeout", "30")
        pids = list(worker_pids(server).values())
        client = await self.start_client(server, [echo.port])
        payload = pseudorandom(32 * 1024 * 1024, seed=32)
        c = StreamClient(keep=False)
        await connect_tcp(self.forward_port(client), c)
        c.send(payload).addCallback(lambda ok: c.close_write() if ok else None)
        await c.wait_received(1024 * 1024)  # the tunnel is up and carrying bytes
        server.signal("TERM")
        await server.wait_for_count(r"\[worker-\d+ .*Received SIGTERM", 2)
        await c.done
        self.assert_echoed(c, payload, server, client)
        reason = await server.wait_exit()
        self.assertIsInstance(reason, ierror.ProcessDone, server.output(last=30))
        self.assertEqual(len(server.matches(r"worker \d+ \(pid \d+\) exited: exit status 0")),
                         2, server.output(last=30))
        for pid in pids:
            self.assertFalse(alive(pid), f"worker {pid} outlived its supervisor")

    @e2e
    async def test_workers_exit_when_their_supervisor_dies(self) -> None:
        server = await self.start_workers()
        pids = list(worker_pids(server).values())
        self.assertEqual(len(pids), 2)
        server.signal("KILL")
        await server.wait_exit()
        await wait_until(lambda: not any(alive(p) for p in pids),
                         lambda: f"workers {pids} to exit after their supervisor died")

    @e2e
    async def test_zero_is_one_worker_per_core(self) -> None:
        cores = os.cpu_count() or 1
        server = await self.start_server("--workers", "0")
        if cores == 1:  # one worker: no supervisor at all
            self.assertEqual(server.matches(r"worker \d+"), [])
            return
        await server.wait_for_count(ACCEPTING, cores)
        self.assertEqual(sorted(worker_pids(server)), list(range(cores)))

    @e2e
    async def test_yaml_runtime_key(self) -> None:
        echo = await start_echo(self)
        config = Path(self.mktemp())
        config.write_text(YAML.replace("ECHO_PORT", str(echo.port)))
        proxy = await start_twistd(self, "hbone-client", ["--config", str(config.resolve())],
                                   name="proxy")
        await proxy.wait_for_count(ACCEPTING, 2)
        self.assertEqual(sorted(worker_pids(proxy)), [0, 1])
        payload = pseudorandom(100000, seed=7)
        c = await exchange(proxy.port, payload)
        self.assertEqual(c.hexdigest, sha256(payload))

    @e2e
    async def test_bad_value_is_one_error_line(self) -> None:
        proc = TwistdProcess("bad")
        reactor.spawnProcess(proc, sys.executable,
                             twistd_argv("hbone-server", ["--workers", "-1"]),
                             env=dict(os.environ), path=self.mktemp_dir())
        reason = await proc.wait_exit()
        self.assertIsInstance(reason, ierror.ProcessTerminated)
        self.assertIn("twistd: error: hbone-server: --workers: expected a non-negative integer "
                      "(0: one per core), got '-1'", proc.output())

    def mktemp_dir(self) -> str:
        path = Path(self.mktemp()).resolve()
        path.mkdir(parents=True)
        return str(path)


YAML = """\
layered_runtime:
  layers:
  - name: static
    static_layer:
      hbonex.workers: 2
static_resources:
  listeners:
  - name: plain
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: plain
          cluster: echo
  clusters:
  - name: echo
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ECHO_PORT}}}
"""
