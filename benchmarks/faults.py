"""
Full-size fault runs with real processes, every byte hashed at both ends (issue 11):

    .venv/bin/python benchmarks/faults.py [--only NAME] [--bulk-mib N] [--tunnels N]
                                          [--tunnel-kib N] [--push-mb N] [--slow-seconds S]

* bulk: 1 GiB each way through one tunnel at once (the client sends one stream and the target
  another; each side hashes what it sent and what it received, and the target's trailer lets
  the client compare all four);
* tunnels: 1000 concurrent tunnels, all open at the same time before any sends its data, each
  moving 1 MiB each way, hashed the same way;
* slow: a target pushes 500 MB into a tunnel whose reader takes 1 MiB/s for 30 s, then reads
  the rest at full speed; both hbonex processes' RSS is sampled every 0.1 s and the peak growth
  over their baseline is the bound (the run fails above --rss-bound-mib).

Each scenario gets fresh processes: the target (benchmarks/hashtarget.py), `twistd -n
hbone-server` and `twistd -n hbone-client --forward` (defaults, mutual TLS 1.3 with a fresh PKI),
all on 127.0.0.1. The driver is this process (asyncio). It prints a table (Markdown) and exits
non-zero if any check failed. Every wait is bounded; all children run in their own process
groups, which are killed on exit, failure, Ctrl-C or SIGTERM.

The trial suite runs the scaled-down versions (tests/test_e2e_faults.py, tests/test_e2e_tunnel.py).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from hashtarget import CHUNK, chunks  # noqa: E402

from hbonex.tls import pki  # noqa: E402

SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
LISTENER_RE = re.compile(r"listener (\S+) listening on [\d.]+:(\d+)")
READY_RE = re.compile(r'^\{"ready":\s*true.*$', re.M)
CRASH_RE = re.compile(r"Traceback \(most recent call last\)|Unhandled [Ee]rror")
MiB = 1024 * 1024


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------- processes


class Proc:
    """
    A child in its own process group, output to a log file; ``stop`` ends the whole group.
    """

    running: list[Proc] = []

    def __init__(self, name: str, argv: list[str], workdir: Path,
                 env: Optional[dict[str, str]] = None) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                         start_new_session=True)
        self.pid = self.proc.pid
        Proc.running.append(self)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern[str], count: int = 1,
                 timeout: float = 30) -> list[re.Match[str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(pattern.finditer(self.text()))
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise CheckFailed(f"{self.name} not ready (exit code {self.proc.poll()}): "
                          f"{self.text()[-1500:]}")

    def crashes(self) -> list[str]:
        text = self.text()
        return [text[max(0, m.start() - 200):m.start() + 1200] for m in CRASH_RE.finditer(text)]

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # and anything it left behind
        self.proc.wait()
        if self in Proc.running:
            Proc.running.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for p in reversed(list(cls.running)):
            p.stop()


def _terminated(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Children die with us: on normal exit, an exception, Ctrl-C, SIGTERM or SIGHUP."""
    atexit.register(Proc.stop_all)
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGHUP, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child


# ---------------------------------------------------------------- /proc


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise CheckFailed(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def established(pid: int) -> int:
    """The process's ESTABLISHED TCP sockets (its socket fds matched in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


class RssSampler:
    """Samples the processes' RSS every ``interval`` seconds in a thread: baseline and peak."""

    def __init__(self, procs: list[Proc], interval: float = 0.1) -> None:
        self.procs = procs
        self.base = {p.name: p.rss_kib() for p in procs}
        self.peak = dict(self.base)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for p in self.procs:
                with contextlib.suppress(OSError, CheckFailed):
                    self.peak[p.name] = max(self.peak[p.name], p.rss_kib())

    def stop(self) -> dict[str, int]:
        """Peak growth in KiB per process."""
        self._stop.set()
        self._thread.join()
        return {name: self.peak[name] - self.base[name] for name in self.base}


# ---------------------------------------------------------------- the processes under test


def make_pki(directory: Path) -> None:
    pki.init_ca(directory)
    pki.issue(directory, "server", spiffe=SERVER_ID, ip=["127.0.0.1"])
    pki.issue(directory, "client", spiffe=CLIENT_ID)


def child_env(workdir: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), HBONEX_STATE_DIR=str(workdir),
                PYTHONUNBUFFERED="1")


def twistd(workdir: Path, name: str, plugin: str, args: list[str],
           listeners: int = 1) -> tuple[Proc, dict[str, int]]:
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "--logfile=-", plugin, *args]
    proc = Proc(name, argv, workdir, child_env(workdir))
    found = proc.wait_for(LISTENER_RE, listeners)
    return proc, {m.group(1): int(m.group(2)) for m in found}


def start_target(workdir: Path, name: str = "target") -> tuple[Proc, dict[str, int]]:
    proc = Proc(name, [sys.executable, str(HERE / "hashtarget.py")], workdir)
    return proc, json.loads(proc.wait_for(READY_RE)[0].group(0))


def start_tunnel(workdir: Path, label: str, targets: list[int],
                 server_args: tuple[str, ...] = (), client_args: tuple[str, ...] = ()
                 ) -> tuple[Proc, Proc, list[int], int]:
    """hbone-server and hbone-client forwarding one port to each target: (…, ports, server)."""
    pki_dir = workdir / "pki"
    server, ports = twistd(workdir, f"{label}-server", "hbone-server", [
        "--pki", str(pki_dir / "server"), "--listen", "127.0.0.1:0", *server_args])
    server_port = ports["hbone"]
    forwards = [a for t in targets for a in ("--forward", f"127.0.0.1:0=127.0.0.1:{t}")]
    client, ports = twistd(workdir, f"{label}-client", "hbone-client", [
        "--pki", str(pki_dir / "client"), "--server", f"127.0.0.1:{server_port}",
        "--server-identity", SERVER_ID, *forwards, *client_args], listeners=len(targets))
    return server, client, [ports[f"forward_{i}"] for i in range(len(targets))], server_port


# ---------------------------------------------------------------- the hashed duplex client


@dataclass
class Duplex:
    """One tunnel to the duplex target: send ``up`` bytes of seed ``seed`` + 1, ask ``down``."""

    port: int
    up: int
    down: int
    seed: int
    read_rate: int = 0  # bytes/s while the slow phase lasts (0: full speed)
    slow_seconds: float = 0
    ready: Optional[Callable[[], None]] = None  # after the first byte arrived
    go: Optional[asyncio.Event] = None  # wait for this before sending
    sem: Optional[asyncio.Semaphore] = None  # bounds concurrent connection set-ups
    received: int = 0

    async def run(self) -> None:
        async with self.sem if self.sem is not None else contextlib.nullcontext():
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.port, limit=64 * 1024 if self.read_rate else CHUNK)
            writer.write(b"%d %d\n" % (self.down, self.seed))
            got = hashlib.sha256()
            if self.ready is not None:
                first = await reader.read(1)
                if not first:
                    raise CheckFailed("the tunnel closed before its first byte")
                got.update(first)
                self.received = 1
        try:
            if self.ready is not None:
                self.ready()
            if self.go is not None:
                await self.go.wait()
            sent = hashlib.sha256()
            sender = asyncio.ensure_future(self._send(writer, sent))
            await self._receive(reader, got)
            await sender
            trailer = b""
            while len(trailer) < 200 and (data := await reader.read(200)):
                trailer += data
        finally:
            writer.transport.abort()
        if self.received != self.down:
            raise CheckFailed(f"tunnel {self.seed}: {self.received} of {self.down} bytes came "
                              "down")
        fields = trailer.split()
        if len(fields) != 3:
            raise CheckFailed(f"tunnel {self.seed}: bad trailer {trailer[:100]!r} (truncated "
                              "or closed early)")
        if fields[0].decode() != got.hexdigest():
            raise CheckFailed(f"tunnel {self.seed}: the bytes received differ from those the "
                              "target sent (SHA-256)")
        if int(fields[2]) != self.up or fields[1].decode() != sent.hexdigest():
            raise CheckFailed(f"tunnel {self.seed}: the target received {int(fields[2])} bytes "
                              f"of {self.up}, or other bytes than were sent (SHA-256)")

    async def _send(self, writer: asyncio.StreamWriter, sent: Any) -> None:
        for c in chunks(self.seed + 1, self.up):
            sent.update(c)
            writer.write(c)
            await writer.drain()
        writer.write_eof()

    async def _receive(self, reader: asyncio.StreamReader, got: Any) -> None:
        started = time.monotonic()
        while self.received < self.down:
            slow = self.read_rate and time.monotonic() - started < self.slow_seconds
            want = min(self.down - self.received, 16 * 1024 if slow else CHUNK)
            data = await reader.read(want)
            if not data:
                return
            got.update(data)
            self.received += len(data)
            if slow:
                # Never ahead of read_rate since the start of the slow phase.
                ahead = self.received / self.read_rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)


# ---------------------------------------------------------------- scenarios


@dataclass
class Row:
    scenario: str
    figure: str
    value: str
    bound: str = "—"
    ok: bool = True


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, *args: Any, **kw: Any) -> None:
        self.rows.append(Row(*args, **kw))
        row = self.rows[-1]
        print(f"  {row.scenario:<8} {row.figure:<48} {row.value:>16}  "
              f"{'ok' if row.ok else 'FAILED'}", file=sys.stderr, flush=True)

    def fail(self, scenario: str, message: str) -> None:
        self.failures.append(f"{scenario}: {message}")
        print(f"  {scenario:<8} FAILED: {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    bulk: int
    tunnels: int
    tunnel_bytes: int
    push: int
    slow_seconds: float
    rate: int
    rss_bound_kib: int
    timeout: float


@contextlib.contextmanager
def tunnel_pair(workdir: Path, label: str, result: Result,
                **kw: Any) -> Iterator[tuple[Proc, Proc, dict[str, int], int]]:
    """A fresh target, hbone-server and hbone-client; checks their logs for crashes after."""
    target, ports = start_target(workdir, f"{label}-target")
    procs = [target]
    try:
        server, client, (forward,), _ = start_tunnel(workdir, label, [ports["duplex"]], **kw)
        procs += [server, client]
        yield server, client, ports, forward
        for p in (server, client):
            for crash in p.crashes()[:1]:
                result.fail(label, f"{p.name} logged a crash: {crash}")
    finally:
        for p in reversed(procs):
            p.stop()


def rss_rows(result: Result, label: str, growth: dict[str, int], bound_kib: int = 0) -> None:
    for name, kib in growth.items():
        ok = not bound_kib or kib <= bound_kib
        role = name.rsplit("-", 1)[1]
        result.add(label, f"peak RSS growth, hbone-{role}", f"{kib / 1024:.1f} MiB",
                   f"≤ {bound_kib / 1024:.0f} MiB" if bound_kib else "—", ok)
        if not ok:
            result.fail(label, f"{name} grew by {kib / 1024:.1f} MiB (bound "
                               f"{bound_kib / 1024:.0f} MiB)")


def run_bulk(workdir: Path, opt: Options, result: Result) -> None:
    label = "bulk"
    with tunnel_pair(workdir, label, result) as (server, client, _, forward):
        sampler = RssSampler([server, client])
        started = time.monotonic()
        try:
            asyncio.run(asyncio.wait_for(Duplex(forward, opt.bulk, opt.bulk, 1).run(),
                                         opt.timeout))
        except (CheckFailed, OSError, asyncio.TimeoutError) as e:
            result.fail(label, f"{type(e).__name__}: {e}")
            sampler.stop()
            return
        seconds = time.monotonic() - started
        growth = sampler.stop()
        size = f"{opt.bulk / MiB:,.0f} MiB"
        result.add(label, f"{size} each way, one tunnel: all hashes match", "yes")
        result.add(label, "duration", f"{seconds:.1f} s")
        result.add(label, "throughput each way (both at once)",
                   f"{opt.bulk / seconds / 1e6:,.0f} MB/s")
        rss_rows(result, label, growth)


def run_tunnels(workdir: Path, opt: Options, result: Result) -> None:
    label = "tunnels"
    n = opt.tunnels
    with tunnel_pair(workdir, label, result) as (server, client, _, forward):
        sampler = RssSampler([server, client])
        fds_before = {p.name: open_fds(p.pid) for p in (server, client)}
        counts: dict[str, int] = {}

        async def main() -> list[Any]:
            go = asyncio.Event()
            sem = asyncio.Semaphore(100)
            ready = 0

            def one_ready() -> None:
                nonlocal ready
                ready += 1
                if ready == n:
                    # Every tunnel is open end to end; count the server's sockets now.
                    counts["server"] = established(server.pid)
                    counts["client"] = established(client.pid)
                    go.set()

            tunnels = [Duplex(forward, opt.tunnel_bytes, opt.tunnel_bytes, 1000 + 2 * i,
                              ready=one_ready, go=go, sem=sem) for i in range(n)]
            return await asyncio.wait_for(
                asyncio.gather(*(t.run() for t in tunnels), return_exceptions=True),
                opt.timeout)

        started = time.monotonic()
        try:
            outcomes = asyncio.run(main())
        except asyncio.TimeoutError:
            result.fail(label, f"not done within {opt.timeout:.0f} s")
            sampler.stop()
            return
        seconds = time.monotonic() - started
        growth = sampler.stop()
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        result.add(label, f"tunnels open at once, {opt.tunnel_bytes // 1024} KiB each way",
                   f"{n - len(errors) if counts else 0} of {n}", f"{n}",
                   not errors and bool(counts))
        if errors:
            result.fail(label, f"{len(errors)} of {n} tunnels failed, e.g. "
                               f"{type(errors[0]).__name__}: {errors[0]}")
        if counts:
            result.add(label, "ESTABLISHED sockets with all open: server / client",
                       f"{counts['server']} / {counts['client']}")
        result.add(label, "duration (connect, verify, close)", f"{seconds:.1f} s")
        total = n * opt.tunnel_bytes
        result.add(label, "throughput each way (all tunnels)",
                   f"{total / seconds / 1e6:,.0f} MB/s")
        rss_rows(result, label, growth)
        # After the tunnels closed, the processes' fds return to their baseline, but for the
        # pooled HTTP/2 connections (one fd each side, ESTABLISHED, kept for reuse).
        procs = (server, client)

        def settled() -> bool:
            after.update({p.name: open_fds(p.pid) - established(p.pid) for p in procs})
            return all(after[k] <= fds_before[k] + 4 for k in after)

        after: dict[str, int] = {}
        deadline = time.monotonic() + 15
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.2)
        ok = settled()
        pooled = {p.name: established(p.pid) for p in procs}
        result.add(label, "fds before → after, less pooled HTTP/2 connections: server, client",
                   ", ".join(f"{fds_before[k]} → {after[k]}" for k in after), "+4", ok)
        result.add(label, "pooled HTTP/2 connections left: server / client",
                   " / ".join(str(v) for v in pooled.values()))
        if not ok:
            result.fail(label, f"fds did not return to baseline: {fds_before} -> {after} "
                               f"(+ pooled {pooled})")


def run_slow(workdir: Path, opt: Options, result: Result) -> None:
    label = "slow"
    with tunnel_pair(workdir, label, result) as (server, client, _, forward):
        sampler = RssSampler([server, client])
        tunnel = Duplex(forward, 0, opt.push, 7, read_rate=opt.rate,
                        slow_seconds=opt.slow_seconds)
        started = time.monotonic()
        try:
            asyncio.run(asyncio.wait_for(tunnel.run(), opt.timeout + opt.slow_seconds))
        except (CheckFailed, OSError, asyncio.TimeoutError) as e:
            result.fail(label, f"{type(e).__name__}: {e} ({tunnel.received} bytes read)")
            sampler.stop()
            return
        seconds = time.monotonic() - started
        growth = sampler.stop()
        result.add(label, f"{opt.push / 1e6:,.0f} MB pushed, read at "
                          f"{opt.rate / MiB:g} MiB/s for {opt.slow_seconds:g} s, then at "
                          "full speed: hash matches", "yes")
        result.add(label, "duration", f"{seconds:.1f} s")
        rss_rows(result, label, growth, opt.rss_bound_kib)


SCENARIOS = {"bulk": run_bulk, "tunnels": run_tunnels, "slow": run_slow}


def source_info() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True).stdout.strip()

    changed = git("status", "--porcelain", "--", "hbonex").splitlines()
    return (f"commit {git('rev-parse', '--short', 'HEAD')} "
            f"({f'{len(changed)} changed file(s) in hbonex/' if changed else 'clean'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=list(SCENARIOS), action="append",
                        help="run this scenario (repeatable; default: all)")
    parser.add_argument("--bulk-mib", type=int, default=1024,
                        help="MiB each way through one tunnel (1024)")
    parser.add_argument("--tunnels", type=int, default=1000, help="concurrent tunnels (1000)")
    parser.add_argument("--tunnel-kib", type=int, default=1024,
                        help="KiB each way per concurrent tunnel (1024)")
    parser.add_argument("--push-mb", type=int, default=500,
                        help="MB (10^6) the target pushes at the slow reader (500)")
    parser.add_argument("--slow-seconds", type=float, default=30,
                        help="how long the reader takes 1 MiB/s before reading at full speed")
    parser.add_argument("--rss-bound-mib", type=int, default=64,
                        help="fail if a process grows more than this under the slow reader")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds each scenario may take (plus the slow phase)")
    parser.add_argument("--quick", action="store_true",
                        help="scaled down: 64 MiB, 100 tunnels × 256 KiB, 64 MB, 5 s slow")
    parser.add_argument("--workdir", help="keep PKI and process logs in DIR")
    args = parser.parse_args()
    if args.quick:
        args.bulk_mib, args.tunnels, args.tunnel_kib = 64, 100, 256
        args.push_mb, args.slow_seconds = 64, 5
    opt = Options(args.bulk_mib * MiB, args.tunnels, args.tunnel_kib * 1024,
                  args.push_mb * 10**6, args.slow_seconds, MiB, args.rss_bound_mib * 1024,
                  args.timeout)
    install_cleanup()
    raise_fd_limit()
    result = Result()
    started = time.monotonic()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    source = source_info()  # what the processes import, before HEAD moves on
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hbonex-f-")))
        make_pki(workdir / "pki")
        for name in args.only or SCENARIOS:
            print(f"{name}:", file=sys.stderr, flush=True)
            try:
                SCENARIOS[name](workdir, opt, result)
            except CheckFailed as e:
                result.fail(name, str(e))
        Proc.stop_all()
    print(f"\nbenchmarks/faults.py, {date}, hbonex {source}, {os.cpu_count()} CPUs, "
          f"load average {load} at start, "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end, "
          f"{time.monotonic() - started:.0f} s\n")
    print("| scenario | figure | value | bound | result |")
    print("|---|---|---|---|---|")
    for r in result.rows:
        print(f"| {r.scenario} | {r.figure} | {r.value} | {r.bound} | "
              f"{'ok' if r.ok else 'FAILED'} |")
    for f in result.failures:
        print(f"FAILED {f}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
