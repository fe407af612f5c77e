"""
Faults with real processes, every byte hashed: the server SIGKILLed and restarted under steady
tunnel load, a server frozen with SIGSTOP (PING keepalive), a slow reader against a pushing
target (bounded memory in both processes).

These are the trial-suite sizes (64 MiB pushed to a reader at 1 MiB/s for 6 s; 64 MiB each way
and 200 concurrent tunnels are in tests/test_e2e_tunnel.py).  The full-size runs (1 GiB each
way, 1000 concurrent tunnels, 500 MB to a 1 MiB/s reader) are benchmarks/faults.py, not the
suite (their figures are in docs/benchmarks.md, "Faults, full size").
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import defer, reactor, task

from tests.faults_support import rss_kib, start_recording_echo
from tests.support import (
    TUNNEL_CLOSED_RE,
    StreamClient,
    TwistdProcess,
    connect_tcp,
    e2e,
    exchange,
    port_of,
    pseudorandom,
    sha256,
    start_echo,
    start_source,
    start_twistd,
    wait_until,
)
from tests.test_e2e_lifetime import is_reset, pid_of
from tests.test_e2e_tunnel import E2ETestCase

MiB = 1024 * 1024


class SlowReader(StreamClient):
    """Reads at most ``rate`` bytes a second (pausing its socket in between)."""

    def __init__(self, rate: int, limit: int) -> None:
        super().__init__(keep=False)
        self.rate = rate
        self.limit = limit  # stop reading after this many bytes
        self.tick = 0.1
        self._budget = 0
        self._loop: task.LoopingCall | None = None

    def connectionMade(self) -> None:
        self._loop = task.LoopingCall(self._refill)
        self._loop.start(self.tick)

    def _refill(self) -> None:
        self._budget = int(self.rate * self.tick)
        if self.limit and self.nbytes < self.limit:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._budget -= len(data)
        if self.limit and (self._budget <= 0 or self.nbytes >= self.limit):
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def stop(self) -> None:
        """Read at full speed from now on."""
        self.limit = 0
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.transport.resumeProducing()  # type: ignore[union-attr]


class KillRestartTests(E2ETestCase):
    timeout = 90

    @e2e
    async def test_server_sigkill_and_restart_under_load(self) -> None:
        """
        Four workers run echo tunnels back to back and five tunnels stay open; the server is
        SIGKILLed and restarted on the same port.  The open tunnels end with a reset (never a
        clean EOF), every tunnel opened after the restart succeeds with every byte, and the
        client (not restarted) recovers by itself.
        """
        echo = await start_echo(self)
        server = await self.start_server()
        port = server.port
        client = await self.start_client(server, [echo.port], "--max-streams", "1000")
        fwd = self.forward_port(client)

        held = [StreamClient() for _ in range(5)]
        for i, c in enumerate(held):
            await connect_tcp(fwd, c)
            c.transport.write(b"held %d" % i)
            await c.wait_received(len(b"held %d" % i))

        phase = {"now": "before", "stop": False}
        results: list[tuple[str, bool, str]] = []

        async def worker(n: int) -> None:
            i = 0
            while not phase["stop"]:
                opened_in = phase["now"]
                payload = pseudorandom(32 * 1024 + n, seed=n * 10_000 + i)
                c = await exchange(fwd, payload)
                ok = c.nbytes == len(payload) and c.hexdigest == sha256(payload) and c.eof
                results.append((opened_in, ok, str(c.reason and c.reason.value)))
                i += 1

        workers = [defer.ensureDeferred(worker(n)) for n in range(4)]
        await wait_until(lambda: sum(1 for p, ok, _ in results if p == "before" and ok) >= 8,
                         "tunnels working before the kill")

        phase["now"] = "down"
        server.signal("KILL")
        await server.wait_exit()
        await gather_all([c.done for c in held])
        for c in held:
            self.assertFalse(c.eof, "an open tunnel ended with a clean EOF after SIGKILL")
            self.assertTrue(is_reset(c), c.reason)

        restarted = await start_twistd(
            self, "hbone-server",
            ["--listen", f"127.0.0.1:{port}", *self.pki.args("server"), "--drain-timeout", "2"],
            name="hbone-server-2",
        )
        phase["now"] = "after"
        await wait_until(lambda: sum(1 for p, _, _ in results if p == "after") >= 20,
                         "20 tunnels after the restart", timeout=30)
        phase["stop"] = True
        await gather_all(workers)
        after = [(ok, why) for p, ok, why in results if p == "after"]
        self.assertTrue(all(ok for ok, _ in after),
                        f"tunnels failed after the restart: {[w for ok, w in after if not ok]}")
        # The client's pool reconnected: the restarted server saw tunnels, over one connection.
        lines = restarted.matches(TUNNEL_CLOSED_RE)
        self.assertGreaterEqual(len(lines), 20)
        self.assertEqual(len({port_of(m["peer"]) for m in lines}), 1)
        self.assertEqual(client.crashes(), [])


async def gather_all(ds: list[defer.Deferred[Any]]) -> None:
    await defer.gatherResults(ds, consumeErrors=True)


def cont(proc: TwistdProcess) -> None:
    if proc.running:
        proc.transport.signalProcess(signal.SIGCONT)  # type: ignore[union-attr]


class KeepaliveTests(E2ETestCase):
    timeout = 60

    @e2e
    async def test_frozen_server_fails_the_connection_by_ping(self) -> None:
        """
        SIGSTOP the server under an open tunnel: the client's PING keepalive (interval 1 s,
        timeout 1 s) fails that connection within its bound, the tunnel is reset, and after
        SIGCONT a new tunnel goes over a fresh connection.
        """
        echo = await start_recording_echo(self)
        server = await self.start_server()
        client = await self.start_client(server, [echo.port], "--keepalive-interval", "1",
                                         "--keepalive-timeout", "1")
        fwd = self.forward_port(client)
        c = StreamClient()
        await connect_tcp(fwd, c)
        c.transport.write(b"before")
        await c.wait_received(6)
        server.transport.signalProcess(signal.SIGSTOP)  # type: ignore[union-attr]
        self.addCleanup(cont, server)
        started = reactor.seconds()
        await client.wait_for(r"no PING ack within 1s", timeout=10)
        elapsed = reactor.seconds() - started
        # Interval + timeout, and a reactor turn or two: the PING's own bound.
        self.assertLess(elapsed, 1 + 1 + 1.5)
        await c.done
        self.assertTrue(is_reset(c), c.reason)
        cont(server)
        payload = pseudorandom(100_000, seed=77)
        c2 = await exchange(fwd, payload)
        self.assert_echoed(c2, payload, server, client)
        lines = await server.wait_for_count(TUNNEL_CLOSED_RE, 2)
        self.assertNotEqual(port_of(lines[0]["peer"]), port_of(lines[1]["peer"]),
                            "the new tunnel reused the dead connection")


class SlowReaderTests(E2ETestCase):
    timeout = 60

    @e2e
    async def test_slow_reader_bounds_memory(self) -> None:
        """
        A target pushes 64 MiB; the app reads 1 MiB/s for 6 s.  Backpressure holds the rest
        in flow-control windows and socket buffers: neither process grows by more than 48 MiB
        (the HTTP/2 windows are 4 MiB per stream, 16 MiB per connection, and each socket
        buffers a few MiB).  Then the app reads the rest at full speed, every byte hashed.
        """
        source = await start_source(self, 64 * MiB, seed=9)
        server = await self.start_server()
        client = await self.start_client(server, [source.port])
        procs: list[TwistdProcess] = [server, client]
        base = {p.name: rss_kib(pid_of(p)) for p in procs}
        reader = SlowReader(rate=1 * MiB, limit=6 * MiB)
        await connect_tcp(self.forward_port(client), reader)
        peak = dict(base)

        def sample() -> bool:
            for p in procs:
                peak[p.name] = max(peak[p.name], rss_kib(pid_of(p)))
            return reader.nbytes >= reader.limit

        await wait_until(sample, lambda: f"6 MiB read at 1 MiB/s (read {reader.nbytes})",
                         timeout=20, interval=0.2)
        growth = {name: (peak[name] - base[name]) // 1024 for name in base}
        for name, mib in growth.items():
            self.assertLess(mib, 48, f"{name} grew by {mib} MiB under a slow reader: {growth}")
        reader.stop()
        await reader.done
        self.assertEqual((reader.nbytes, reader.hexdigest),
                         (len(source.payload), sha256(source.payload)))
