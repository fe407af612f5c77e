"""
Soak: mixed traffic through real hbonex processes for N minutes, and whether anything grows.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--interval 30] [--workdir DIR]

Processes (all on 127.0.0.1): the target (benchmarks/hashtarget.py: duplex, echo, HTTP/1.1);
`twistd -n hbone-server` and `twistd -n hbone-client --forward` (mutual TLS 1.3, defaults); and
an Envoy-YAML pair from tests/configs (seed-encapsulate-http-in-h2-connect.yaml: an HTTP
connection manager routes HTTP/1.1 requests to an internal listener whose tcp_proxy tunnels them
over HTTP/2 CONNECT to seed-terminate-h2-connect.yaml, which relays to the target's HTTP port).

Traffic, in threads of this process, every byte checked:

* bulk: one tunnel at a time moving 16 MiB each way at once (SHA-256 at both ends);
* round trips: two tunnels doing 64-byte echoes (about 100/s each), each reopened every 30 s;
* new tunnels: connect, 4 KiB each way (hashed), close, back to back;
* HTTP: two persistent HTTP/1.1 connections through the YAML pair, GET of 1 B–512 KiB and POST
  echoes of 1 B–256 KiB (bodies hashed against what the target sent), a new connection every
  50 requests;
* hostile, every 15 s against hbone-server: 50 half-sent TLS ClientHellos (must be cut at the
  handshake timeout), mutual TLS connections sending a bad preface, a rapid-reset burst (150
  CONNECT + RST_STREAM), a CONTINUATION flood past the header limit, empty DATA frames (each
  must get its GOAWAY), and a TLS client without a certificate (must be refused).

Phases: 30 s warm-up of the same mix, traffic stops, 15 s settle, baseline; then N minutes of
traffic with a sample every --interval seconds; traffic stops, 15 s settle, final sample. For
each hbonex process: RSS, open fds, ESTABLISHED TCP sockets (tunnels, connections). It fails
(exit 1) if any check of the traffic failed, any process logged a crash, or from baseline to
final RSS grew more than --rss-bound-mib, fds more than --fd-bound, or ESTABLISHED sockets
more than --socket-bound. Every loop stops by itself at its deadline; children run in their own
process groups and are killed on exit, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import hashlib
import http.client
import os
import random
import select
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from faults import (  # noqa: E402
    REPO,
    CheckFailed,
    Duplex,
    Proc,
    established,
    install_cleanup,
    make_pki,
    open_fds,
    raise_fd_limit,
    rss_kib,
    source_info,
    start_target,
    start_tunnel,
    twistd,
)
from hashtarget import chunks, stream_sha256  # noqa: E402

MiB = 1024 * 1024
CONFIGS = REPO / "tests" / "configs"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x7, 0x9
END_HEADERS = 0x4
PROTOCOL_ERROR, ENHANCE_YOUR_CALM = 0x1, 0xB
TIMEOUT = 30.0


# ---------------------------------------------------------------- bookkeeping


class Stats:
    """Operations done and failed per kind, with the first few failure messages."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.messages: list[str] = []
        self.rtt_us: list[float] = []

    def done(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.ok[kind] += n

    def fail(self, kind: str, message: str) -> None:
        with self.lock:
            self.failed[kind] += 1
            if len(self.messages) < 20:
                self.messages.append(f"{kind}: {message}")
        print(f"  FAILED {kind}: {message}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        with self.lock:
            return ", ".join(f"{k} {self.ok[k]}" + (f" ({self.failed[k]} failed)"
                                                     if self.failed[k] else "")
                             for k in sorted(set(self.ok) | set(self.failed)))


class Workers:
    """Threads that each run ``step`` until the phase's deadline (or ``stop``)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, kind: str, step: Callable[[int, threading.Event], None], n: int = 1,
              pause: float = 0.0) -> None:
        for i in range(n):
            self.threads.append(threading.Thread(target=self._loop, args=(kind, step, i, pause),
                                                 daemon=True, name=f"{kind}-{i}"))
            self.threads[-1].start()

    def _loop(self, kind: str, step: Callable[[int, threading.Event], None], i: int,
              pause: float) -> None:
        while not self.stop.is_set():
            try:
                step(i, self.stop)
            except (CheckFailed, OSError, ssl.SSLError, http.client.HTTPException,
                    asyncio.TimeoutError, ValueError) as e:
                self.stats.fail(kind, f"{type(e).__name__}: {e}")
                self.stop.wait(1)  # a failure is not retried in a tight loop
            if pause:
                self.stop.wait(pause)

    def finish(self, timeout: float = 90) -> list[str]:
        """Stop and join; the names of threads that did not end in time."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]


# ---------------------------------------------------------------- traffic


@contextlib.contextmanager
def connect(port: int) -> Any:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield s
    finally:
        s.close()


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise CheckFailed(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Traffic:
    def __init__(self, stats: Stats, ports: dict[str, int], pki_dir: Path) -> None:
        self.stats = stats
        self.ports = ports
        self.pki_dir = pki_dir
        self.seed = 0
        self.lock = threading.Lock()

    def next_seed(self) -> int:
        with self.lock:
            self.seed += 1
            return self.seed

    def duplex(self, size: int) -> None:
        asyncio.run(asyncio.wait_for(
            Duplex(self.ports["duplex"], size, size, 2 * self.next_seed()).run(), 120))

    def bulk(self, i: int, stop: threading.Event) -> None:
        self.duplex(16 * MiB)
        self.stats.done("bulk 16 MiB×2")

    def new_tunnel(self, i: int, stop: threading.Event) -> None:
        self.duplex(4096)
        self.stats.done("new tunnels")

    def round_trips(self, i: int, stop: threading.Event) -> None:
        """One tunnel for 30 s: a 64-byte echo every 10 ms, each compared."""
        samples = []
        with connect(self.ports["echo"]) as s:
            ends = time.monotonic() + 30
            n = 0
            while time.monotonic() < ends and not stop.is_set():
                msg = (b"%08d" % n) * 8
                started = time.perf_counter()
                s.sendall(msg)
                if recv_exact(s, len(msg)) != msg:
                    raise CheckFailed("echo differs from request")
                samples.append((time.perf_counter() - started) * 1e6)
                n += 1
                stop.wait(0.01)
            s.shutdown(socket.SHUT_WR)
            if s.recv(1) != b"":
                raise CheckFailed("bytes after the echo")
        self.stats.done("round trips", n)
        with self.stats.lock:
            self.stats.rtt_us += samples

    def http(self, i: int, stop: threading.Event) -> None:
        """50 requests on one persistent HTTP/1.1 connection through the YAML pair."""
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["http"], timeout=TIMEOUT)
        rng = random.Random(self.next_seed())
        try:
            for _ in range(50):
                if stop.is_set():
                    break
                if rng.random() < 0.5:
                    size, seed = rng.randint(1, 512 * 1024), rng.randint(0, 10**9)
                    conn.request("GET", f"/bytes/{size}/{seed}")
                    response = conn.getresponse()
                    body = response.read()
                    expected = stream_sha256(seed, size)
                else:
                    body_out = b"".join(chunks(rng.randint(0, 10**9), rng.randint(1, 256 * 1024)))
                    conn.request("POST", "/echo", body=body_out,
                                 headers={"content-type": "application/octet-stream"})
                    response = conn.getresponse()
                    body = response.read()
                    expected = hashlib.sha256(body_out).hexdigest()
                if response.status != 200:
                    raise CheckFailed(f"HTTP {response.status}")
                if hashlib.sha256(body).hexdigest() != expected or \
                        response.getheader("x-sha256") != expected:
                    raise CheckFailed("HTTP body differs from what the target sent")
                self.stats.done("HTTP requests")
        finally:
            conn.close()

    # -------------------------------------------------------------- hostile clients

    def tls(self, cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(self.pki_dir / "ca.pem"))
        if cert:
            ctx.load_cert_chain(str(self.pki_dir / "client" / "cert.pem"),
                                str(self.pki_dir / "client" / "key.pem"))
        ctx.set_alpn_protocols(["h2"])
        return ctx

    def h2(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.ports["hbone"]), timeout=TIMEOUT)
        return self.tls().wrap_socket(raw, server_hostname="127.0.0.1")

    @staticmethod
    def goaway_code(s: ssl.SSLSocket, timeout: float = 15) -> int | None:
        """Read frames until a GOAWAY (its error code) or the end of the connection (None)."""
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                if buf[3] == GOAWAY:
                    return int.from_bytes(buf[13:17], "big")
                buf = buf[9 + length:]
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = s.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not data:
                return None
            buf += data
        raise CheckFailed(f"no GOAWAY within {timeout:.0f} s")

    def attack(self, name: str, payload: bytes, code: int) -> None:
        with contextlib.closing(self.h2()) as s:
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # cut while we were still sending: the GOAWAY should be there
            got = self.goaway_code(s)
        if got != code:
            raise CheckFailed(f"{name}: GOAWAY {got}, expected {code}")
        self.stats.done(f"hostile: {name}")

    def hostile(self, i: int, stop: threading.Event) -> None:
        import hpack

        target = f"127.0.0.1:{self.ports['echo_target']}".encode()
        block = hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", target)])
        start = PREFACE + frame(SETTINGS, 0, 0)
        # 50 TLS handshakes that never finish: the server must cut each one.
        partial = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40
        half_open = []
        try:
            for _ in range(50):
                s = socket.create_connection(("127.0.0.1", self.ports["hbone"]), timeout=5)
                s.sendall(partial)
                half_open.append(s)
            self.attack("bad preface", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PROTOCOL_ERROR)
            burst = b"".join(frame(HEADERS, END_HEADERS, 2 * k + 1, block)
                             + frame(RST_STREAM, 0, 2 * k + 1, (8).to_bytes(4, "big"))
                             for k in range(150))
            self.attack("rapid reset", start + burst, ENHANCE_YOUR_CALM)
            flood = frame(HEADERS, 0, 1, b"\x00" * 16384) + b"".join(
                frame(CONTINUATION, 0, 1, b"\x00" * 65536) for _ in range(4))
            self.attack("CONTINUATION flood", start + flood, ENHANCE_YOUR_CALM)
            empty = frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1) * 3
            self.attack("empty DATA frames", start + empty, ENHANCE_YOUR_CALM)
            self.no_certificate()
            # The handshake timeout (10 s) cuts every half-sent ClientHello.
            deadline = time.monotonic() + 20
            left = list(half_open)
            while left and time.monotonic() < deadline:
                readable, _, _ = select.select(left, [], [], 0.5)
                for s in readable:
                    with contextlib.suppress(OSError):
                        if s.recv(4096):
                            continue  # an alert first, then the close
                    left.remove(s)
            if left:
                raise CheckFailed(f"{len(left)} of 50 half-sent handshakes still open after "
                                  "20 s")
            self.stats.done("hostile: half-sent ClientHello", len(half_open))
        finally:
            for s in half_open:
                s.close()

    def no_certificate(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.ports["hbone"]), timeout=TIMEOUT)
        try:
            s = self.tls(cert=False).wrap_socket(raw, server_hostname="127.0.0.1")
        except (ssl.SSLError, ConnectionResetError):
            self.stats.done("hostile: no client certificate")
            return
        with contextlib.closing(s):
            try:
                s.sendall(PREFACE + frame(SETTINGS, 0, 0))
                data = s.recv(4096)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                data = b""
        if data:
            raise CheckFailed("a client without a certificate got HTTP/2 frames")
        self.stats.done("hostile: no client certificate")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream_id.to_bytes(4, "big") + payload)


def run_traffic(traffic: Traffic, seconds: float, stats: Stats) -> list[str]:
    """The whole mix for ``seconds``; names of workers that did not stop."""
    workers = Workers(stats)
    workers.start("bulk", traffic.bulk, pause=0.5)
    workers.start("round trips", traffic.round_trips, n=2)
    workers.start("new tunnels", traffic.new_tunnel)
    workers.start("HTTP", traffic.http, n=2)
    workers.start("hostile", traffic.hostile, pause=15)
    workers.stop.wait(seconds)
    return workers.finish()


# ---------------------------------------------------------------- processes


def yaml_pair(workdir: Path, backend: int) -> tuple[Proc, Proc, int]:
    """The tests/configs HTTP pair on free ports: (tunnel server, HTTP client, HTTP port)."""
    server_yaml = (CONFIGS / "seed-terminate-h2-connect.yaml").read_text()
    server_yaml = server_yaml.replace("port_value: 10001", "port_value: 0")
    server_yaml = server_yaml.replace("port_value: 8080", f"port_value: {backend}")
    (workdir / "http-server.yaml").write_text(server_yaml)
    server, ports = twistd(workdir, "http-tunnel-server", "hbone-server",
                           ["--config", "http-server.yaml"])
    client_yaml = (CONFIGS / "seed-encapsulate-http-in-h2-connect.yaml").read_text()
    client_yaml = client_yaml.replace("port_value: 10000", "port_value: 0")
    client_yaml = client_yaml.replace("port_value: 10001",
                                      f"port_value: {ports['listener_0']}")
    (workdir / "http-client.yaml").write_text(client_yaml)
    client, ports = twistd(workdir, "http-client", "hbone-client",
                           ["--config", "http-client.yaml"])
    return server, client, ports["http"]


def sample(procs: list[Proc]) -> dict[str, tuple[int, int, int]]:
    """Per process: (RSS KiB, open fds, ESTABLISHED sockets)."""
    return {p.name: (rss_kib(p.pid), open_fds(p.pid), established(p.pid)) for p in procs}


def show(label: str, values: dict[str, tuple[int, int, int]], stats: Stats | None = None) -> str:
    cells = "  ".join(f"{name} {rss / 1024:.1f} MiB/{fds} fds/{est} est"
                      for name, (rss, fds, est) in values.items())
    line = f"{label:>9}  {cells}"
    if stats is not None:
        line += f"\n{'':>9}  {stats.summary()}"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="traffic time (10)")
    parser.add_argument("--warmup", type=float, default=30, help="warm-up seconds (30)")
    parser.add_argument("--interval", type=float, default=30, help="seconds between samples")
    parser.add_argument("--settle", type=float, default=15,
                        help="seconds after traffic stops before the baseline/final sample")
    parser.add_argument("--rss-bound-mib", type=float, default=32,
                        help="allowed RSS growth per process, baseline to final (32)")
    parser.add_argument("--fd-bound", type=int, default=16, help="allowed fd growth (16)")
    parser.add_argument("--socket-bound", type=int, default=8,
                        help="allowed growth of ESTABLISHED sockets per process (8)")
    parser.add_argument("--workdir", help="keep PKI and process logs in DIR")
    args = parser.parse_args()
    install_cleanup()
    raise_fd_limit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    source = source_info()  # what the processes import, before HEAD moves on
    started = time.monotonic()
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hbonex-s-")))
        stack.callback(Proc.stop_all)
        make_pki(workdir / "pki")
        target, tports = start_target(workdir)
        server, client, (duplex, echo), hbone = start_tunnel(
            workdir, "hbone", [tports["duplex"], tports["echo"]])
        http_server, http_client, http_port = yaml_pair(workdir, tports["http"])
        procs = [server, client, http_server, http_client]
        ports = {"duplex": duplex, "echo": echo, "http": http_port, "hbone": hbone,
                 "echo_target": tports["echo"]}
        traffic = Traffic(Stats(), ports, workdir / "pki")
        print(show("started", sample(procs)), file=sys.stderr, flush=True)

        stuck = run_traffic(traffic, args.warmup, traffic.stats)
        time.sleep(args.settle)
        baseline = sample(procs)
        print(show("baseline", baseline, traffic.stats), file=sys.stderr, flush=True)
        warm_failures = sum(traffic.stats.failed.values())

        stats = Stats()
        traffic.stats = stats
        workers = Workers(stats)
        samples = [(0.0, baseline)]
        phase_start = time.monotonic()
        ends = phase_start + args.minutes * 60
        workers.start("bulk", traffic.bulk, pause=0.5)
        workers.start("round trips", traffic.round_trips, n=2)
        workers.start("new tunnels", traffic.new_tunnel)
        workers.start("HTTP", traffic.http, n=2)
        workers.start("hostile", traffic.hostile, pause=15)
        while (left := ends - time.monotonic()) > 0:
            if workers.stop.wait(min(args.interval, left)):
                break
            now = sample(procs)
            samples.append((time.monotonic() - phase_start, now))
            print(show(f"{(time.monotonic() - phase_start) / 60:.1f} min", now, stats),
                  file=sys.stderr, flush=True)
        stuck += workers.finish()
        traffic_seconds = time.monotonic() - phase_start
        time.sleep(args.settle)
        final = sample(procs)
        print(show("final", final, stats), file=sys.stderr, flush=True)

        if warm_failures:
            failures.append(f"{warm_failures} failure(s) during the warm-up")
        if stuck:
            failures.append(f"workers did not stop: {stuck}")
        failures += [f"traffic: {m}" for m in stats.messages]
        for p in [*procs, target]:
            if p.proc.poll() is not None:
                failures.append(f"{p.name} exited with {p.proc.returncode}")
        for p in procs:
            for crash in p.crashes()[:1]:
                failures.append(f"{p.name} logged a crash: {crash}")
        rows = []
        for p in procs:
            (r0, f0, e0), (r1, f1, e1) = baseline[p.name], final[p.name]
            peak = max(s[p.name][0] for _, s in samples)
            ok = (r1 - r0 <= args.rss_bound_mib * 1024 and f1 - f0 <= args.fd_bound
                  and e1 - e0 <= args.socket_bound)
            if not ok:
                failures.append(f"{p.name} grew: RSS {r0 / 1024:.1f} → {r1 / 1024:.1f} MiB, "
                                f"fds {f0} → {f1}, ESTABLISHED {e0} → {e1}")
            rows.append(f"| {p.name} | {r0 / 1024:.1f} | {peak / 1024:.1f} | {r1 / 1024:.1f} | "
                        f"{(r1 - r0) / 1024:+.1f} | {f0} → {f1} | {e0} → {e1} | "
                        f"{'ok' if ok else 'FAILED'} |")
        Proc.stop_all()

    rtt = sorted(stats.rtt_us)
    print(f"\nbenchmarks/soak.py, {date}, hbonex {source}, {os.cpu_count()} CPUs, "
          f"{args.minutes:g} min of traffic ({traffic_seconds:.0f} s; {args.warmup:g} s "
          f"warm-up), load average {load} at start, "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end, "
          f"{time.monotonic() - started:.0f} s in all\n")
    print(f"Traffic (all checked): {stats.summary()}")
    if rtt:
        print(f"Round trips: p50 {statistics.median(rtt):,.0f} µs, "
              f"p99 {rtt[int(0.99 * (len(rtt) - 1))]:,.0f} µs (under the whole mix)")
    print(f"\nBounds, baseline → final: RSS +{args.rss_bound_mib:g} MiB, fds "
          f"+{args.fd_bound}, ESTABLISHED sockets +{args.socket_bound} per process.\n")
    print("| process | RSS baseline MiB | RSS peak MiB | RSS final MiB | growth MiB | fds | "
          "ESTABLISHED | result |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nSamples (RSS MiB / fds / ESTABLISHED):\n")
    for t, values in samples + [(traffic_seconds + args.settle, final)]:
        print(f"* {t / 60:4.1f} min: " + "; ".join(
            f"{name} {rss / 1024:.1f}/{fds}/{est}" for name, (rss, fds, est) in values.items()))
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
