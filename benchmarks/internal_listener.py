"""
What an internal listener costs: throughput and 64-byte round-trip latency of

* direct:   client -> backend (loopback TCP, for reference);
* TCP hop:  client -> twistd hbone-client (TCP listener, tcp_proxy) -> backend;
* internal: client -> twistd hbone-client (TCP listener, tcp_proxy -> internal listener,
  tcp_proxy) -> backend.

    .venv/bin/python benchmarks/internal_listener.py [--mib 128] [--round-trips 2000]
        [--repeats 3] [--markdown docs/benchmarks.md]

Both proxies run ``twistd -n hbone-client --config FILE`` with a configuration written to a
temporary directory; the backend (an asyncio echo server) is a separate process too, started by
this script (``--backend``).  Everything is on 127.0.0.1 and every loop is bounded.  With
``--markdown FILE`` the table replaces (or is appended as) the "Internal listener" section of
FILE; the rest of the file is left as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
CHUNK = 256 * 1024
START_TIMEOUT = 30.0
IO_TIMEOUT = 120.0
LISTEN_RE = re.compile(r"listener (\S+) listening on 127\.0\.0\.1:(\d+)")
SECTION = "## Internal listener"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

INTERNAL_EXTENSION = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
"""


def _tcp_listener(name: str, cluster: str) -> str:
    return f"""\
  - name: {name}
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP_PROXY_TYPE}
          stat_prefix: {name}
          cluster: {cluster}
"""


def _backend_cluster(port: int) -> str:
    return f"""\
  - name: backend
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {port}}}
"""


def direct_hop_config(backend: int) -> str:
    return (
        "static_resources:\n  listeners:\n" + _tcp_listener("hop", "backend")
        + "  clusters:\n" + _backend_cluster(backend)
    )


def internal_hop_config(backend: int) -> str:
    return (
        INTERNAL_EXTENSION + "static_resources:\n  listeners:\n"
        + _tcp_listener("hop", "to_internal")
        + f"""\
  - name: internal
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP_PROXY_TYPE}
          stat_prefix: internal
          cluster: backend
  clusters:
  - name: to_internal
    load_assignment:
      cluster_name: to_internal
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {{server_listener_name: internal}}
"""
        + _backend_cluster(backend)
    )


# --- the backend process ---------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    """Echo with backpressure: stop reading while the write buffer is full; EOF after EOF."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=4 * CHUNK)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.transport.write_eof()  # flushed first; closes once the peer closes too
        return True


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", 0)
    print(f"backend listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


# --- processes -------------------------------------------------------------------------------


class Child:
    """A child process whose output lines we scan until one matches."""

    def __init__(self, argv: list[str], cwd: Path, name: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._buffer = b""

    def wait_for(self, pattern: re.Pattern[str], count: int = 1) -> list[re.Match[str]]:
        deadline = time.monotonic() + START_TIMEOUT
        found: list[re.Match[str]] = []
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        scanned = 0
        while True:
            for line in self.lines[scanned:]:
                m = pattern.search(line)
                if m:
                    found.append(m)
                    if len(found) == count:
                        return found
            scanned = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: no {pattern.pattern!r} "
                    f"({'exited' if self.proc.poll() is not None else 'timed out'}):\n"
                    + "\n".join(self.lines[-30:])
                )
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                *complete, self._buffer = (self._buffer + data).split(b"\n")
                self.lines.extend(x.decode("utf-8", "replace") for x in complete)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_backend(workdir: Path) -> tuple[Child, int]:
    child = Child([sys.executable, __file__, "--backend"], workdir, "backend")
    [m] = child.wait_for(re.compile(r"backend listening on (\d+)"))
    return child, int(m[1])


def start_proxy(workdir: Path, name: str, config: str) -> tuple[Child, int]:
    path = workdir / f"{name}.yaml"
    path.write_text(config)
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--logfile=-", "hbone-client", "--config", path.name]
    child = Child(argv, workdir, name)
    [m] = child.wait_for(LISTEN_RE)
    return child, int(m[2])


# --- measurements ----------------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def throughput(port: int, size: int) -> float:
    """
    Send ``size`` bytes and read the echo at the same time, then half-close and read to EOF;
    MB/s (10^6 bytes per second) in each direction.  The echo must be complete and equal.
    """
    block = os.urandom(CHUNK)
    s = _connect(port)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            left = size
            view = memoryview(block)
            while left > 0:
                n = min(left, CHUNK)
                s.sendall(view[:n])
                left -= n
            s.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported below
            errors.append(e)

    started = time.perf_counter()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = 0
    mismatch = False
    offset = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    twice = memoryview(block + block)  # any CHUNK-long window of the repeating stream
    while True:
        n = s.recv_into(buf)
        if not n:
            break
        mismatch |= view[:n] != twice[offset : offset + n]
        received += n
        offset = (offset + n) % CHUNK
    elapsed = time.perf_counter() - started
    sender.join(IO_TIMEOUT)
    s.close()
    if errors:
        raise RuntimeError(f"sending to port {port} failed: {errors[0]}")
    if received != size or mismatch:
        raise RuntimeError(f"port {port}: echoed {received} of {size} bytes (mismatch {mismatch})")
    return size / elapsed / 1e6


def round_trips(port: int, count: int, warmup: int = 200) -> tuple[float, float]:
    """p50 and p99 in microseconds of ``count`` 64-byte echoes (after ``warmup``)."""
    s = _connect(port)
    samples: list[float] = []
    for i in range(warmup + count):
        message = i.to_bytes(8, "big") * 8
        started = time.perf_counter_ns()
        s.sendall(message)
        got = b""
        while len(got) < len(message):
            chunk = s.recv(len(message) - len(got))
            if not chunk:
                raise RuntimeError(f"port {port}: closed during round trip {i}")
            got += chunk
        elapsed = time.perf_counter_ns() - started
        if got != message:
            raise RuntimeError(f"port {port}: round trip {i} echoed {got!r}")
        if i >= warmup:
            samples.append(elapsed / 1000)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


@dataclass
class Result:
    path: str
    mbps: list[float]
    p50: list[float]
    p99: list[float]


def measure(ports: dict[str, int], size: int, count: int, repeats: int) -> list[Result]:
    results = {name: Result(name, [], [], []) for name in ports}
    for repeat in range(repeats):
        for name, port in ports.items():
            mbps = throughput(port, size)
            p50, p99 = round_trips(port, count)
            r = results[name]
            r.mbps.append(mbps)
            r.p50.append(p50)
            r.p99.append(p99)
            print(f"  repeat {repeat + 1}/{repeats} {name:8s} {mbps:8.1f} MB/s  "
                  f"p50 {p50:7.1f} µs  p99 {p99:7.1f} µs", flush=True)
    return list(results.values())


# --- report ----------------------------------------------------------------------------------

LABELS = {
    "direct": "direct TCP (reference)",
    "tcp_hop": "TCP listener → backend",
    "internal": "TCP listener → internal listener → backend",
}


def table(results: list[Result], size: int, count: int) -> list[str]:
    med: Callable[[list[float]], float] = statistics.median
    by_name = {r.path: r for r in results}
    hop = by_name.get("tcp_hop")
    lines = [
        f"| path | echo MB/s each way ({size // MiB} MiB) | round trip p50 (µs) | "
        f"p99 (µs) | throughput vs TCP hop | p50 vs TCP hop |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio_t = ratio_l = "—"
        if hop is not None and r.path != "direct":
            ratio_t = f"{med(r.mbps) / med(hop.mbps):.2f}×"
            ratio_l = f"{med(r.p50) / med(hop.p50):.2f}×"
        lines.append(
            f"| {LABELS[r.path]} | {med(r.mbps):,.0f} | {med(r.p50):,.0f} | "
            f"{med(r.p99):,.0f} | {ratio_t} | {ratio_l} |"
        )
    lines.append("")
    lines.append(f"Round trips: {count} × 64 bytes after 200 warm-up, TCP_NODELAY.")
    return lines


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def section(results: list[Result], args: argparse.Namespace, load: tuple[str, str]) -> str:
    import twisted

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    samples = []
    for r in results:
        samples.append(
            f"* {LABELS[r.path]}: MB/s " + ", ".join(f"{x:,.0f}" for x in r.mbps)
            + "; p50 µs " + ", ".join(f"{x:,.0f}" for x in r.p50)
            + "; p99 µs " + ", ".join(f"{x:,.0f}" for x in r.p99)
        )
    return "\n".join([
        SECTION,
        "",
        f"Generated by `benchmarks/internal_listener.py` on {now} (Python "
        f"{platform.python_version()}, Twisted {twisted.__version__}, {os.cpu_count()} CPUs; "
        "regenerate with `.venv/bin/python benchmarks/internal_listener.py --markdown "
        "docs/benchmarks.md`).",
        "",
        "What the user-space hop costs: the same `twistd -n hbone-client --config` process "
        "with a TCP listener whose `tcp_proxy` goes straight to the backend, or to an internal "
        "listener whose own `tcp_proxy` goes to the backend. The backend is an asyncio echo "
        "server in its own process; the client uses blocking sockets. Throughput: "
        f"{args.mib} MiB sent while the echo is read, then half-close, every byte checked; MB/s "
        f"= 10^6 bytes/s in each direction. Medians of {args.repeats} repeats; each repeat "
        "measures the three paths in turn. Load average at start / end: "
        f"{load[0]} / {load[1]} (throughput on a busy machine varies a lot between samples; "
        "the round-trip times are steadier).",
        "",
        *table(results, args.mib * MiB, args.round_trips),
        "",
        "Samples:",
        "",
        *samples,
        "",
    ])


def write_markdown(path: Path, text: str) -> None:
    """Replace the "Internal listener" section of ``path`` (re-read now) or append it."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = current.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        prefix = current if not current or current.endswith("\n\n") else (
            current + ("\n" if current.endswith("\n") else "\n\n"))
        path.write_text(prefix + text, encoding="utf-8")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    after = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text + ("\n" + after if after else ""),
                    encoding="utf-8")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--mib", type=int, default=128, help="MiB per throughput run (128)")
    parser.add_argument("--round-trips", type=int, default=2000, help="round trips (2000)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (3)")
    parser.add_argument("--markdown", type=Path, help="replace/append the section in FILE")
    parser.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backend:
        asyncio.run(_serve())
        return 0
    if not (1 <= args.mib <= 4096 and 1 <= args.round_trips <= 100_000
            and 1 <= args.repeats <= 20):
        parser.error("--mib 1..4096, --round-trips 1..100000, --repeats 1..20")

    children: list[Child] = []
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="hbonex-bench-internal-") as tmp:
        workdir = Path(tmp)
        try:
            backend, backend_port = start_backend(workdir)
            children.append(backend)
            hop, hop_port = start_proxy(workdir, "tcp_hop", direct_hop_config(backend_port))
            children.append(hop)
            internal, internal_port = start_proxy(
                workdir, "internal", internal_hop_config(backend_port)
            )
            children.append(internal)
            ports = {"direct": backend_port, "tcp_hop": hop_port, "internal": internal_port}
            print(f"measuring {', '.join(ports)}: {args.mib} MiB echo, {args.round_trips} "
                  f"round trips, {args.repeats} repeat(s)", flush=True)
            results = measure(ports, args.mib * MiB, args.round_trips, args.repeats)
        finally:
            for child in reversed(children):
                child.stop()
    print()
    print("\n".join(table(results, args.mib * MiB, args.round_trips)))
    if args.markdown is not None:
        write_markdown(args.markdown, section(results, args, (load_start, load_average())))
        print(f"\nwrote the {SECTION[3:]!r} section of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
