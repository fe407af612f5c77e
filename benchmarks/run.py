"""
hbonex benchmark: direct loopback TCP vs the hbonex tunnel vs an independent Node http2 tunnel.

    .venv/bin/python benchmarks/run.py [--quick] [--only NAME] [--markdown docs/benchmarks.md]

Every scenario runs over three paths side by side, each with fresh proxy processes:

* direct: loadgen -> target (loopback TCP, no tunnel, for reference);
* hbonex: loadgen -> twistd hbone-client -> HTTP/2 CONNECT over mTLS 1.3 -> twistd hbone-server
  -> target;
* node:   loadgen -> h2tunnel.mjs forward -> HTTP/2 CONNECT over mTLS 1.3 -> h2tunnel.mjs
  server -> target.

The target (target.py) and the load generator (loadgen.py) are separate processes too. This is
a script, not a test; it only talks to 127.0.0.1 and every step is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from hbonex.tls import pki  # noqa: E402

NODE_TUNNEL = REPO / "tests" / "node" / "h2tunnel.mjs"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
LISTEN_RE = re.compile(r"listener \S+ listening on [\d.]+:(\d+)")
READY_RE = re.compile(r'^\{"ready":\s*true.*$', re.M)
PATHS = ("direct", "hbonex", "node")
MiB = 1024 * 1024
LOADGEN_TIMEOUT = 300.0
SETTLE = 1.0  # seconds before reading RSS


@dataclass(frozen=True)
class Sizes:
    repeats: int
    bulk_1: int  # bytes through one tunnel
    bulk_8: int  # bytes through each of 8 concurrent tunnels
    rtt_warmup: int
    rtt_count: int
    connrate: int  # tunnels, 16 at a time
    idle: int  # idle tunnels held open


FULL = Sizes(5, 512 * MiB, 64 * MiB, 1000, 5000, 2000, 2000)
QUICK = Sizes(1, 32 * MiB, 4 * MiB, 200, 500, 300, 200)


# ---------------------------------------------------------------- processes and paths


class Child:
    """
    A process whose stdout and stderr go to a log file, polled for its ready line.
    """

    def __init__(self, name: str, argv: list[str], workdir: Path, env: Optional[dict] = None):
        self.name = name
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=workdir)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.log.read_text(errors="replace"))
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{self.name} not ready (exit code {self.proc.poll()}): {tail}")

    def pids(self) -> list[int]:
        """The process and its descendants (a --workers supervisor's workers)."""
        parents: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            parents.setdefault(ppid, []).append(int(stat.parent.name))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += parents.get(pid, [])
        return found

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        if not total:
            raise RuntimeError(f"{self.name}: no VmRSS")
        return total

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Bench:
    sizes: Sizes
    workdir: Path
    pki_dir: Path
    targets: dict[str, int]
    source: Path = REPO  # the hbonex tree the twistd processes import
    profile: bool = False
    #: Run hbonex from the Envoy YAML equivalent of its flags (``hbonex config render``).
    yaml: bool = False
    workers: int = 1  # --workers of each hbonex proxy
    reactor: Optional[str] = None  # twistd --reactor for the hbonex proxies (None: its default)
    paths: tuple[str, ...] = PATHS  # which paths the scenarios measure
    seq: int = 0

    def unique(self, label: str) -> str:
        self.seq += 1
        return f"{self.seq:03d}-{label}"


class PathBase:
    """
    One way from the load generator to a target: ``port`` to connect to, or ``error``.
    """

    name = ""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.port: Optional[int] = None
        self.error: Optional[str] = None

    def start(self, bench: Bench, target: int, label: str, streams: Optional[int]) -> None:
        try:
            self.port = self._start(bench, target, f"{label}-{self.name}", streams)
        except Exception as e:
            self.error = f"{self.name} did not start: {e}"

    def _start(self, bench: Bench, target: int, label: str, streams: Optional[int]) -> int:
        raise NotImplementedError

    def rss_kib(self) -> int:
        return sum(c.rss_kib() for c in self.children)

    def cpu_seconds(self) -> float:
        """
        User + system CPU time of the proxy processes (all their threads) so far.
        """
        return sum(c.cpu_seconds() for c in self.children)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


class Direct(PathBase):
    name = "direct"

    def _start(self, bench: Bench, target: int, label: str, streams: Optional[int]) -> int:
        return target


class Hbonex(PathBase):
    """
    twistd hbone-client -> twistd hbone-server, both on hbonex defaults but for the PKI.
    """

    name = "hbonex"

    def _twistd(self, bench: Bench, label: str, plugin: str, role: str, args: list[str]) -> int:
        name = bench.unique(label)
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile=-"]
        if bench.profile:
            argv += [f"--profile={bench.workdir / (name + '.prof')}", "--profiler=cprofile",
                     "--savestats"]
        if bench.reactor:
            argv += ["--reactor", bench.reactor]
        env = dict(os.environ, PYTHONPATH=str(bench.source), HBONEX_STATE_DIR=str(bench.workdir))
        workers = ["--workers", str(bench.workers)] if bench.workers != 1 else []
        flags = ["--pki", str(bench.pki_dir / role), "--ca", str(bench.pki_dir / "ca.pem"),
                 *workers, *args]
        if bench.yaml:
            # The same flags as an Envoy v3 bootstrap, rendered by the tree under test.
            config = bench.workdir / f"{name}.yaml"
            rendered = subprocess.run(
                [sys.executable, "-m", "hbonex", "config", "render", role, *flags],
                capture_output=True, text=True, env=env, check=True, timeout=60)
            config.write_text(rendered.stdout)
            flags = ["--config", str(config)]
        child = Child(name, [*argv, plugin, *flags], bench.workdir, env)
        self.children.append(child)
        port = int(child.wait_for(LISTEN_RE).group(1))
        if bench.workers != 1:  # every worker accepting, not only the supervisor bound
            count = bench.workers or os.cpu_count() or 1
            child.wait_for(re.compile(rf"(?s)(worker \d+ accepting on listener.*){{{count}}}"))
        return port

    def _start(self, bench: Bench, target: int, label: str, streams: Optional[int]) -> int:
        limit = ["--max-concurrent-streams", str(streams)] if streams else []
        server = self._twistd(bench, f"{label}-server", "hbone-server", "server",
                              ["--listen", "127.0.0.1:0", *limit])
        limit = ["--max-streams", str(streams)] if streams else []
        return self._twistd(bench, f"{label}-client", "hbone-client", "client",
                            ["--server", f"127.0.0.1:{server}", "--server-identity", SERVER_ID,
                             "--forward", f"127.0.0.1:0=127.0.0.1:{target}", *limit])


class Node(PathBase):
    """
    h2tunnel.mjs forward -> h2tunnel.mjs server, in its default (decoupled, bidirectional-safe)
    mode.
    """

    name = "node"

    def _node(self, bench: Bench, label: str, mode: str, role: str, args: list[str]) -> int:
        ident = bench.pki_dir / role
        child = Child(bench.unique(label), [
            "node", str(NODE_TUNNEL), mode, "--listen", "127.0.0.1:0", *args,
            "--ca", str(bench.pki_dir / "ca.pem"), "--cert", str(ident / "cert.pem"),
            "--key", str(ident / "key.pem")], bench.workdir)
        self.children.append(child)
        return int(json.loads(child.wait_for(READY_RE).group(0))["port"])

    def _start(self, bench: Bench, target: int, label: str, streams: Optional[int]) -> int:
        limit = ["--max-streams", str(streams)] if streams else []
        server = self._node(bench, f"{label}-server", "server", "server",
                            ["--require-spiffe-prefix", "spiffe://cluster.local/", *limit])
        return self._node(bench, f"{label}-client", "forward", "client",
                          ["--server", f"127.0.0.1:{server}", "--target", f"127.0.0.1:{target}",
                           "--server-spiffe", SERVER_ID, *limit])


PATH_TYPES: dict[str, type[PathBase]] = {"direct": Direct, "hbonex": Hbonex, "node": Node}


@contextlib.contextmanager
def running(bench: Bench, target: str, label: str, paths: Optional[tuple[str, ...]] = None,
            streams: Optional[int] = None) -> Iterator[list[PathBase]]:
    started = [PATH_TYPES[name]() for name in paths or bench.paths]
    try:
        for path in started:
            path.start(bench, bench.targets[target], label, streams)
        yield started
    finally:
        for path in started:
            path.stop()


# ---------------------------------------------------------------- load generator and rows


def loadgen(path: PathBase, mode: str, *args: int) -> dict[str, Any]:
    """
    The load generator's result, with ``cpu_s``: CPU seconds the proxies spent meanwhile.
    """
    if path.error:
        return {"ok": False, "error": path.error}
    argv = [sys.executable, str(HERE / "loadgen.py"), mode, str(path.port), *map(str, args)]
    cpu = path.cpu_seconds()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=LOADGEN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"load generator timed out after {LOADGEN_TIMEOUT:.0f} s"}
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": f"load generator exited {done.returncode}: "
                                      f"{done.stderr.strip()[-300:]}"}
    return {**result, "cpu_s": path.cpu_seconds() - cpu}


@dataclass
class Row:
    metric: str
    unit: str
    better: str  # "higher" or "lower"
    target: bool = True  # hbonex must be at least as good as Node
    digits: int = 0
    cpu: bool = False  # proxy CPU time: informational, no target, no direct column
    key: str = ""  # a stable name for the JSON results and the charts (benchmarks/plots.py)
    samples: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    failures: dict[str, str] = field(default_factory=dict)
    # Per path, one list of round-trip quantiles (µs) per repeat: the CDF chart's data.
    distributions: dict[str, list[list[float]]] = field(default_factory=dict)

    def add(self, path: str, result: dict[str, Any], key: str, scale: float = 1) -> None:
        """
        Record ``result[key] * scale``, or the failure; CPU rows skip the direct path.
        """
        if self.cpu and path == "direct":
            return
        if result.get("ok"):
            result = {**result, key: result[key] * scale}
            self.samples[path].append(result[key])
            shown = f"{result[key]:,.{self.digits}f} {self.unit}"
        else:
            self.failures.setdefault(path, result.get("error", "failed"))
            shown = "FAILED: " + result.get("error", "failed")
        print(f"  {self.metric:<44} {path:<7} {shown}", file=sys.stderr, flush=True)

    def value(self, path: str) -> Optional[float]:
        if path in self.failures or not self.samples[path]:
            return None
        return statistics.median(self.samples[path])

    def cell(self, path: str) -> str:
        if path in self.failures:
            return "FAILED"
        v = self.value(path)
        return "—" if v is None else f"{v:,.{self.digits}f}"

    def verdict(self) -> tuple[str, str, str]:
        """
        (hbonex/Node ratio, target, met / not met).
        """
        goal = ("≥" if self.better == "higher" else "≤") + " 1.0× Node" if self.target else "—"
        h, n = self.value("hbonex"), self.value("node")
        if h is None or n is None or n == 0:
            return "—", goal, "not met (failed)" if self.target else "—"
        ratio = h / n
        if not self.target:
            return f"{ratio:.2f}×", goal, "—"
        met = ratio >= 1.0 if self.better == "higher" else ratio <= 1.0
        return f"{ratio:.2f}×", goal, "met" if met else "not met"


# ---------------------------------------------------------------- scenarios


def warm_up(paths: list[PathBase], mode: str, *args: int) -> None:
    """
    One unrecorded run per path, so that connections exist and Node's JIT has compiled.
    """
    for path in paths:
        loadgen(path, mode, *args)


def bench_bulk(bench: Bench, mode: str, target: str) -> list[Row]:
    s = bench.sizes
    cases = [(1, s.bulk_1), (8, s.bulk_8)]
    rows = [Row(f"{mode}, {n} tunnel{'s' if n > 1 else ''} × {size // MiB} MiB", "MB/s", "higher",
                key=f"{mode}-{n}") for n, size in cases]
    cpu = [Row(f"proxy CPU, {mode}, {n} tunnel{'s' if n > 1 else ''}", "ms/MB", "lower",
               target=False, digits=2, cpu=True, key=f"cpu-{mode}-{n}") for n, _ in cases]
    with running(bench, target, mode) as paths:
        warm_up(paths, mode, 8, 8 * MiB)
        for _ in range(s.repeats):
            for path in paths:
                for row, cpu_row, (conns, size) in zip(rows, cpu, cases, strict=True):
                    result = loadgen(path, mode, conns, size)
                    row.add(path.name, result, "mb_s")
                    cpu_row.add(path.name, result, "cpu_s", 1e3 / (conns * size / 1e6))
    return rows + cpu


def bench_upload(bench: Bench) -> list[Row]:
    return bench_bulk(bench, "upload", "sink")


def bench_download(bench: Bench) -> list[Row]:
    return bench_bulk(bench, "download", "source")


def bench_rtt(bench: Bench) -> list[Row]:
    s = bench.sizes
    p50 = Row(f"round trip p50 (64 B × {s.rtt_count})", "µs", "lower", key="rtt-p50")
    p99 = Row(f"round trip p99 (64 B × {s.rtt_count})", "µs", "lower", target=False,
              key="rtt-p99")
    cpu = Row("proxy CPU per round trip", "µs", "lower", target=False, cpu=True, key="cpu-rtt")
    with running(bench, "echo", "rtt") as paths:
        for _ in range(s.repeats):
            for path in paths:
                result = loadgen(path, "rtt", s.rtt_warmup, s.rtt_count)
                p50.add(path.name, result, "p50_us")
                p99.add(path.name, result, "p99_us")
                if result.get("ok") and "quantiles_us" in result:
                    p50.distributions.setdefault(path.name, []).append(result["quantiles_us"])
                cpu.add(path.name, result, "cpu_s", 1e6 / (s.rtt_warmup + s.rtt_count))
    return [p50, p99, cpu]


def bench_connrate(bench: Bench) -> list[Row]:
    s = bench.sizes
    row = Row(f"new tunnels/s (16 at a time, {s.connrate})", "tunnels/s", "higher",
              key="connrate")
    cpu = Row("proxy CPU per new tunnel", "ms", "lower", target=False, digits=2, cpu=True,
              key="cpu-connrate")
    with running(bench, "echo", "connrate") as paths:
        warm_up(paths, "connrate", 16, 500)
        for _ in range(s.repeats):
            for path in paths:
                result = loadgen(path, "connrate", 16, s.connrate)
                row.add(path.name, result, "per_s")
                cpu.add(path.name, result, "cpu_s", 1e3 / s.connrate)
    return [row, cpu]


def idle_count(wanted: int) -> tuple[int, str]:
    """
    How many idle tunnels the fd limit allows (each process holds about one fd per tunnel).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fits = hard - 256 if hard != resource.RLIM_INFINITY else wanted
    if fits >= wanted:
        return wanted, ""
    return max(fits, 1), f"fd hard limit {hard} allows only {fits} of {wanted} tunnels"


class Lines:
    """
    JSON lines from a pipe, with a timeout per line.
    """

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, b""

    def next(self, timeout: float = LOADGEN_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return {"ok": False, "error": f"load generator silent for {timeout:.0f} s"}
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return {"ok": False, "error": "load generator exited early"}
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def idle_rss(path: PathBase, count: int) -> dict[str, Any]:
    """
    RSS of the path's processes after a warm-up, then with ``count`` idle tunnels open.
    """
    if path.error:
        return {"ok": False, "error": path.error}
    proc = subprocess.Popen([sys.executable, str(HERE / "loadgen.py"), "idle", str(path.port),
                             str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lines = Lines(proc.stdout.fileno())  # type: ignore[union-attr]
    rss = []
    try:
        for phase in ("warm", "open"):
            message = lines.next()
            if message.get("phase") != phase:
                return message
            time.sleep(SETTLE)
            rss.append(path.rss_kib())
            proc.stdin.write(b"\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        result = lines.next()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if result.get("ok"):
        result.update(kib=(rss[1] - rss[0]) / count, rss_before=rss[0], rss_after=rss[1])
    return result


def bench_idle(bench: Bench) -> list[Row]:
    count, note = idle_count(bench.sizes.idle)
    row = Row(f"RSS per idle tunnel ({count} tunnels)", "KiB", "lower", digits=1, key="idle")
    if note:
        row.metric += f" ({note})"
    for _ in range(bench.sizes.repeats):
        for name in (p for p in ("hbonex", "node") if p in bench.paths):
            # One HTTP/2 connection for all tunnels on both sides (Node's forward never opens
            # a second one), so the stream limits are raised above the tunnel count.
            with running(bench, "echo", "idle", paths=(name,), streams=count + 100) as (path,):
                row.add(name, idle_rss(path, count), "kib")
    return [row]


SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "upload": bench_upload,
    "download": bench_download,
    "rtt": bench_rtt,
    "connrate": bench_connrate,
    "idle": bench_idle,
}


# ---------------------------------------------------------------- report


SECTIONS = ("## Machine and versions", "## Method", "## Results", "## All samples", "## Charts")
CHART_TEXT = {
    "bench-ratios.svg": (
        "hbonex / Node and hbonex / direct TCP per metric",
        "Each metric's hbonex median divided by Node's (green) and by direct TCP's (blue), on a "
        "log scale with 1.0 dashed: above the line hbonex's figure is the higher one, which is "
        "good for throughput and new tunnels/s (↑ better) and bad for round trips, memory and "
        "CPU (↓ better). Direct TCP has no proxy, so no CPU or memory bar."),
    "bench-rtt-cdf.svg": (
        "round-trip time distribution per path",
        "The 64-byte round trips of every repeat, per path (loadgen.py reports 500 evenly "
        "spaced quantiles per repeat; the repeats pooled): the fraction of round trips at or "
        "below each time, on a log time axis, grey lines at p50 and p99."),
}
HEADER = ["metric", "unit", "direct TCP", "hbonex", "Node", "hbonex/Node", "target", "result"]


def table(rows: list[Row]) -> list[list[str]]:
    return [[r.metric, r.unit, *(r.cell(p) for p in PATHS), *r.verdict()] for r in rows]


def text_table(rows: list[Row]) -> str:
    cells = [HEADER, *table(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths, strict=True))) for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def failures(rows: list[Row]) -> list[str]:
    return [f"{r.metric}, {p}: {msg}" for r in rows for p, msg in r.failures.items()]


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
    return {
        "CPUs (nproc)": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "CPU model": model.group(1) if model else "?",
        "memory": f"{int(mem.group(1)) / MiB:.1f} GiB" if mem else "?",
        "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def source_info(source: Path) -> str:
    """
    Which hbonex was measured: the tree, its commit, and whether hbonex/ had local changes.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True,
                              text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return str(source)
    changed = git("status", "--porcelain", "--", "hbonex", "twisted").splitlines()
    state = f"uncommitted changes in {len(changed)} file(s)" if changed else "clean"
    return f"commit {commit} of {source} ({state})"


def versions(source: Path) -> dict[str, str]:
    from importlib.metadata import version

    from OpenSSL import SSL

    node = subprocess.run(
        ["node", "-p", "process.version + ' (OpenSSL ' + process.versions.openssl + ')'"],
        capture_output=True, text=True).stdout.strip()
    return {
        "hbonex": source_info(source),
        "Python": platform.python_version(),
        "Twisted": version("twisted"),
        "h2": version("h2"),
        "pyOpenSSL": version("pyopenssl"),
        "cryptography": version("cryptography"),
        "OpenSSL (pyOpenSSL)": SSL.SSLeay_version(SSL.OPENSSL_VERSION).decode(),
        "Node": node,
    }


METHOD = """\
* One run of `benchmarks/run.py{args}` ({seconds:.0f} s). Every number is the median of {repeats}
  run(s); each path (direct, hbonex, Node) is measured in turn within each repeat, so drift hits
  all three alike. All traffic is on 127.0.0.1. The benchmark alone keeps about 2 processes
  busy, so a load average well above 2 (see above) means other work shared the CPUs.
* Processes: the target (`benchmarks/target.py`, asyncio: sink, source, echo), the load
  generator (`benchmarks/loadgen.py`, blocking sockets, one thread per connection) and each proxy
  are separate processes. Proxies are started fresh for every scenario (for the memory scenario,
  for every repeat).
* hbonex: `twistd -n hbone-client --forward 127.0.0.1:0=TARGET` → `twistd -n hbone-server`, on
  their defaults (HTTP/2; 4 MiB stream window, 16 MiB connection window, 1 MiB frames).
  Node: `tests/node/h2tunnel.mjs forward` → `server`, same HTTP/2 settings, in its default mode
  (with the "decoupler" that keeps two Node peers from deadlocking; `--no-decouple` exists and
  is faster one way but unsafe both ways). Both: mutual TLS 1.3 with the same fresh PKI (a CA, a
  server `{server_id}` with IP SAN 127.0.0.1, a client `{client_id}`); the client checks the
  server's SPIFFE ID, the server accepts the trust domain. Logs go to files: hbonex's server
  writes one line per tunnel (its client none), each Node process one JSON line per tunnel.
* With `--yaml` both hbonex processes run `--config FILE` instead, FILE being what
  `hbonex config render client|server` makes of the same flags (Envoy v3 YAML).
* Every scenario starts with an unrecorded warm-up per path (8 tunnels × 8 MiB for bulk,
  {rtt_warmup} round trips for latency, 500 tunnels for new tunnels/s, 64 tunnels for memory):
  Node's JIT needs it, and it keeps connection setup out of the numbers.
* Upload: each tunnel sends its bytes to the sink, half-closes, and the sink's byte count must
  match. Download: the source sends the bytes asked for; the count must match. MB/s = 10^6 bytes
  per second, all tunnels together, from the first connect to the last byte.
* Round trip: one tunnel, {rtt_warmup} warm-up then {rtt_count} timed round trips of 64 bytes,
  each echo compared with what was sent.
* New tunnels/s: 16 workers, each repeatedly connects, sends 64 bytes, checks the echo, closes;
  {connrate} tunnels in all.
* Memory: after a warm-up of 64 tunnels (opened and closed), the proxy processes' VmRSS (client +
  server, from /proc/PID/status) is read; then {idle} tunnels are opened, each with one checked
  echo, and left idle; RSS is read again after {settle:.0f} s; (after − before) / tunnels. Every
  tunnel must still echo afterwards. For this scenario both sides raise their stream limit above
  the tunnel count so that all tunnels share one HTTP/2 connection (Node's forward never opens a
  second one).
* Proxy CPU: user + system CPU time of the two proxy processes (all threads, from
  /proc/PID/stat) while each load-generator run lasted, divided by the work done. It is less
  sensitive than the rates to whatever else runs on the machine; informational, no target.
* A check that fails shows FAILED instead of a number. Targets: throughput (upload and download)
  and new tunnels/s ≥ 1.0× Node, round-trip p50 ≤ 1.0× Node, memory per idle tunnel ≤ 1.0×
  Node; p99 has no target.
"""


def chart_section(charts: list[Path], markdown_file: Path, json_file: Optional[str]) -> list[str]:
    """
    The "Charts" section: each chart written by --plot, linked from the markdown file's folder.
    """
    if not charts:
        return []
    where = markdown_file.resolve().parent
    saved = (f" (the raw results: `{json_file}`; `benchmarks/run.py --plot-from {json_file}` "
             "redraws them without running)") if json_file else ""
    out = ["", SECTIONS[4], "", f"Drawn by `benchmarks/run.py --plot` from this run{saved}."]
    for chart in charts:
        alt, text = CHART_TEXT.get(chart.name, (chart.stem, ""))
        link = os.path.relpath(chart.resolve(), where)
        out += ["", f"![{alt}]({link})", "", text] if text else ["", f"![{alt}]({link})"]
    return out


def markdown(rows: list[Row], info: dict[str, Any], charts: Optional[list[str]] = None) -> str:
    out = ["# hbonex benchmarks", "",
           "hbonex against direct loopback TCP and an independent Node http2 tunnel "
           f"(`tests/node/h2tunnel.mjs`). The sections from here to \"All samples\" (and "
           f"\"Charts\") were written by `benchmarks/run.py` on {info['date']}; regenerate "
           "them with `.venv/bin/python benchmarks/run.py --markdown docs/benchmarks.md "
           "--plot` (about 6 min; the charts need `pip install -e '.[bench]'`; "
           "`--quick` for a smoke run, `--only NAME` for one of "
           f"{', '.join(SCENARIOS)}). Other sections belong to other scripts and are kept.",
           "", SECTIONS[0], ""]
    out += [f"* {k}: {v}" for k, v in {**info["machine"], **info["versions"]}.items()]
    out += ["", SECTIONS[1], "", info["method"], SECTIONS[2], ""]
    out += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(line) + " |" for line in table(rows)]
    if failures(rows):
        out += ["", "Failures:", ""] + [f"* {f}" for f in failures(rows)]
    out += ["", SECTIONS[3], ""]
    for r in rows:
        samples = "; ".join(f"{p}: " + ", ".join(f"{v:,.{r.digits}f}" for v in r.samples[p])
                            for p in PATHS if r.samples[p])
        out.append(f"* {r.metric} ({r.unit}): {samples or '—'}")
    return "\n".join(out + (charts or [])) + "\n"


def write_markdown(path: Path, text: str) -> None:
    """
    Write ``text`` to ``path``, keeping the sections other scripts own (e.g. "## Internal
    listener" from benchmarks/internal_listener.py) after it.
    """
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = [b for b in re.split(r"(?m)^(?=## )", old)[1:] if not b.startswith(SECTIONS)]
    path.write_text(text + "".join("\n" + b.rstrip("\n") + "\n" for b in kept), encoding="utf-8")


# ---------------------------------------------------------------- main


def make_pki(directory: Path) -> None:
    pki.init_ca(directory)
    pki.issue(directory, "server", spiffe=SERVER_ID, ip=["127.0.0.1"])
    pki.issue(directory, "client", spiffe=CLIENT_ID)


def run(args: argparse.Namespace, workdir: Path, loads: list[str],
        paths: tuple[str, ...] = PATHS, sizes: Optional[Sizes] = None) -> list[Row]:
    """
    The scenarios ``args`` ask for over ``paths``; benchmarks/profile.py calls this too.
    """
    sizes = sizes or (QUICK if args.quick else FULL)
    make_pki(workdir / "pki")
    target = Child("target", [sys.executable, str(HERE / "target.py")], workdir)
    try:
        ports = json.loads(target.wait_for(READY_RE).group(0))
        bench = Bench(sizes, workdir, workdir / "pki", ports, Path(args.hbonex).resolve(),
                      profile=args.profile, yaml=args.yaml, workers=args.workers,
                      reactor=args.reactor, paths=paths)
        rows = []
        for name in [args.only] if args.only else SCENARIOS:
            print(f"{name}:", file=sys.stderr, flush=True)
            loads.append(f"{name} {os.getloadavg()[0]:.2f}")
            rows += SCENARIOS[name](bench)
        return sorted(rows, key=lambda r: r.cpu)  # proxy CPU rows last
    finally:
        target.stop()


def results_json(rows: list[Row], info: dict[str, Any]) -> dict[str, Any]:
    """
    Everything a run measured, for ``--json`` and for ``--plot-from`` later.
    """
    return {"format": 1, "info": info, "rows": [dataclasses.asdict(r) for r in rows]}


def dump_json(results: dict[str, Any]) -> str:
    """
    ``results`` as JSON with one row per line (a diff shows which rows changed).
    """
    rows = ",\n".join(json.dumps(r, ensure_ascii=False) for r in results["rows"])
    head = {k: v for k, v in results.items() if k != "rows"}
    return json.dumps(head, ensure_ascii=False)[:-1] + ', "rows": [\n' + rows + "\n]}\n"


def plot(results: dict[str, Any], directory: Path) -> list[Path]:
    import plots  # benchmarks/plots.py, next to this script

    written = plots.draw(results, directory)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (< 1 min)")
    parser.add_argument("--only", choices=list(SCENARIOS), help="run one scenario")
    parser.add_argument("--markdown", metavar="FILE", help="also write the report to FILE")
    parser.add_argument("--workdir", metavar="DIR",
                        help="keep PKI, process logs (and profiles) in DIR (default: temporary)")
    parser.add_argument("--hbonex", metavar="DIR", default=str(REPO),
                        help="hbonex source tree for the twistd processes, e.g. a clean clone "
                             "(default: this checkout)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="run each hbonex proxy with --workers N (default 1; 0: one per "
                             "core); the CPU and memory rows count the workers too")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the twistd processes into the work directory")
    parser.add_argument("--reactor", metavar="NAME",
                        help="twistd --reactor for the hbonex proxies: epoll, asyncio, "
                             "hbonex-epoll, uvloop (hbonex's plugins; uvloop needs uvloop)... "
                             "(default: "
                             "the plugins' own, hbonex-epoll on Linux)")
    parser.add_argument("--json", metavar="FILE",
                        help="save the raw results (every sample, the round-trip "
                             "distributions) as JSON; with --markdown X.md, X.json by default")
    parser.add_argument("--plot", action="store_true",
                        help="draw the charts (docs/bench-*.svg) from this run; needs "
                             "matplotlib: pip install -e '.[bench]'")
    parser.add_argument("--plot-from", metavar="FILE",
                        help="draw the charts from a JSON saved by an earlier run, run nothing")
    parser.add_argument("--plot-dir", metavar="DIR", default=str(REPO / "docs"),
                        help="where the charts go (default: docs/)")
    parser.add_argument("--yaml", action="store_true",
                        help="run hbonex from the Envoy YAML equivalent of its flags "
                             "(`hbonex config render client|server FLAGS`, `--config FILE`)")
    args = parser.parse_args()
    if args.plot or args.plot_from:
        import plots

        if (missing := plots.missing_matplotlib()) is not None:
            print(missing, file=sys.stderr)  # before a run of minutes, not after it
            return 2
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text(encoding="utf-8")), Path(args.plot_dir))
        return 0

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child
    info = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine(), "versions": versions(Path(args.hbonex).resolve())}
    info["versions"]["hbonex reactor"] = args.reactor or "the plugins' default"
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hbonex-b-")))
        loads: list[str] = []
        rows = run(args, workdir, loads)
    seconds = time.monotonic() - started
    info["machine"]["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["machine"]["1-min load average as each scenario started"] = ", ".join(loads)

    print(text_table(rows))
    for line in failures(rows):
        print("FAILED " + line)
    flags = "".join(f" --{k} {v}" if v is not True else f" --{k}"
                    for k, v in (("quick", args.quick), ("only", args.only),
                                 ("reactor", args.reactor),
                                 ("workers", str(args.workers) if args.workers != 1 else None),
                                 ("yaml", args.yaml))
                    if v)
    info["command"] = f"benchmarks/run.py{flags}"
    info["seconds"] = round(seconds, 1)
    json_path = args.json or (str(Path(args.markdown).with_suffix(".json")) if args.markdown
                              else None)
    if json_path:
        Path(json_path).write_text(dump_json(results_json(rows, info)), encoding="utf-8")
        print(f"wrote {json_path}", file=sys.stderr)
    charts = plot(results_json(rows, info), Path(args.plot_dir)) if args.plot else []
    if args.markdown:
        sizes = QUICK if args.quick else FULL
        info["method"] = METHOD.format(
            args=flags, seconds=seconds, repeats=sizes.repeats, server_id=SERVER_ID,
            client_id=CLIENT_ID, rtt_warmup=sizes.rtt_warmup, rtt_count=sizes.rtt_count,
            connrate=sizes.connrate, idle=sizes.idle, settle=SETTLE)
        section = chart_section(charts, Path(args.markdown), json_path)
        write_markdown(Path(args.markdown), markdown(rows, info, section))
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 1 if failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
